"""The label shard's PNG encoder, read back by two independent decoders: Pillow and libpng (torchvision)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import decode_png

from pipeline.io.png import encode_png


def _maps() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    blocks = np.zeros((37, 53), np.uint8)
    blocks[5:20, 10:40] = 7
    blocks[25:, :9] = 255
    return [
        rng.integers(0, 256, (31, 17), dtype=np.uint8),  # every byte value: Up wraps around modulo 256
        blocks,
        rng.integers(0, 65536, (9, 23), dtype=np.uint16),  # 16-bit: both bytes of a value, big-endian
        np.array([[0, 300, 65535, 254]], dtype=np.uint16),  # one row
        np.arange(11, dtype=np.uint8)[:, None],  # one column
        np.asfortranarray(rng.integers(0, 256, (13, 7), dtype=np.uint8)),  # column-major memory
        rng.integers(0, 65536, (20, 30), dtype=np.uint16)[::3, 1::2],  # a strided view
        rng.integers(0, 65536, (5, 6), dtype=np.uint16).astype(">u2"),  # big-endian in memory
    ]


def _chunks(data: bytes) -> list[bytes]:
    """The chunk types of a PNG, in order, after checking the signature, each chunk's CRC and that
    nothing follows IEND."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    kinds, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length : at + 12 + length])
        assert crc == zlib.crc32(kind + body), kind
        kinds.append(kind)
        at += 12 + length
    assert at == len(data)
    return kinds


@pytest.mark.parametrize("up_filter", [False, True])
@pytest.mark.parametrize("index", range(8))
def test_pillow_and_libpng_read_back_the_exact_pixels(index, up_filter):
    array = _maps()[index]
    data = encode_png(array, up_filter=up_filter)
    assert _chunks(data) == [b"IHDR", b"IDAT", b"IEND"]
    image = Image.open(io.BytesIO(data))
    assert image.size == (array.shape[1], array.shape[0])
    assert image.mode == "L" if array.itemsize == 1 else image.mode.startswith("I")
    np.testing.assert_array_equal(np.array(image), array)
    libpng = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8))  # checks every chunk's CRC
    np.testing.assert_array_equal(libpng[0].numpy().astype(np.int64), array.astype(np.int64))


def test_label_maps_compress():
    labels = _maps()[1]
    assert len(encode_png(labels)) < labels.size // 4


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.zeros((2, 2, 3), np.uint8), r"\(H, W\) array, got shape \(2, 2, 3\)"),
        (np.zeros((0, 4), np.uint8), r"non-empty"),
        (np.zeros((2, 2), np.float32), r"uint8 or uint16, got float32"),
    ],
)
def test_refuses_what_is_no_grey_map(array, match):
    with pytest.raises(ValueError, match=match):
        encode_png(array)
