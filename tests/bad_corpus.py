"""Builders for test shards, good and bad, written with the stdlib `tarfile` (not the project's writer).

`bad_corpus()` gives one shard holding every kind of bad input the reader must survive, mixed with
good samples, plus what a correct reader reports for it; any test of a stage that reads shards can
reuse it.
"""

from __future__ import annotations

import io
import struct
import tarfile
import zlib

import numpy as np
from PIL import Image


def image_bytes(array: np.ndarray, fmt: str = "PNG", **save: object) -> bytes:
    """Encode an (H, W[, C]) uint8/uint16 array with Pillow (`fmt` = PNG, JPEG, WEBP)."""
    out = io.BytesIO()
    Image.fromarray(array).save(out, format=fmt, **save)
    return out.getvalue()


def gradient(height: int = 24, width: int = 32) -> np.ndarray:
    """(H, W, 3) uint8 smooth image: JPEG keeps it within a few grey levels."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), np.full_like(x, 128)], -1).astype(
        np.uint8
    )


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width`×`height` RGB pixels but whose data is a few bytes: a decompression bomb
    shape that must be refused from the header alone."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")
    )


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A tar holding `members` (name, data) in order, exactly as given: no name checks."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def member_end(data: bytes, name: str) -> int:
    """Byte offset just past member `name` (header + data + padding) in tar `data`."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        info = tar.getmember(name)
    return info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def corrupt_header(data: bytes, name: str) -> bytes:
    """`data` with the header of member `name` damaged: its checksum field overwritten."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        offset = tar.getmember(name).offset
    damaged = bytearray(data)
    damaged[offset + 148 : offset + 156] = b"0000001\0"  # the checksum field, now wrong
    return bytes(damaged)


def bad_corpus() -> tuple[bytes, list[str], dict[str, str]]:
    """(tar, keys of the good samples in order, {key of each bad sample: text its reason must contain})."""
    jpg = image_bytes(gradient(), "JPEG", quality=90)
    png = image_bytes(gradient())
    noise = image_bytes(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG")
    members = [
        ("good-000.jpg", jpg),
        ("good-000.txt", b"a caption"),
        ("bad-truncated.jpg", noise[: len(noise) * 2 // 3]),  # cut inside the entropy-coded data
        ("bad-notimage.jpg", b"<html>this is not a JPEG</html>"),
        ("bad-empty.jpg", b""),
        ("good-001.png", png),
        ("good-001.json", b'{"boxes": [[0, 0, 4, 4]]}'),
        ("bad-huge.png", png_header_only(40000, 40000)),
        ("../../etc/x.jpg", jpg),
        ("bad-json.jpg", jpg),
        ("bad-json.json", b"{not json"),
        ("bad-noimage.txt", b"caption without an image"),
        ("bad-noimage.json", b"{}"),
        ("nested/dir/good-002.jpg", jpg),
        ("nested/dir/good-002.seg.png", image_bytes(np.zeros((24, 32), np.uint8))),
    ]
    expected_errors = {
        "bad-truncated": "truncated",
        "bad-notimage": "not a readable image",
        "bad-empty": "empty member",
        "bad-huge": "40000x40000",
        "../../etc/x": "unsafe member path",
        "bad-json": "invalid JSON",
        "bad-noimage": "no image member",
    }
    return tar_bytes(members), ["good-000", "good-001", "nested/dir/good-002"], expected_errors
