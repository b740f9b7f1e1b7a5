"""Arrays → PNG bytes for the maps a label shard holds: one fixed filter per map, chosen by the caller.

Pillow and libpng (torchvision's `encode_png`) choose each row's filter adaptively, trying the
filters on every row, with no way to switch it off; on small maps that search is much of the
encoding time, and the writer of a label shard must keep pace with the model. A map whose
structure is known needs no search: class maps are runs along rows (no filter, with zlib's
run-length strategy), confidence maps are smooth from one row to the next (filter Up). On 96 px
ShapeWorld maps the two encodings of a sample took 0.25 ms of CPU with Pillow and 0.12-0.15 ms with this
(`side_cpu_ms_per_image.encode` of `bench/label_speed.py`; README, "Small images"). The files are
plain PNGs (PNG specification, ISO/IEC 15948: one IHDR, one IDAT, IEND) that any decoder reads.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

__all__ = ["encode_png"]

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_FILTER_NONE, _FILTER_UP = 0, 2


def encode_png(array: np.ndarray, *, up_filter: bool = False, level: int = 1) -> bytes:
    """PNG of an (H, W) grey map, uint8 (8-bit) or uint16 (16-bit), pixels exactly as given.

    Every row gets filter Up (the row above subtracted) when `up_filter`, none otherwise; the image
    data is deflated at zlib `level` with the run-length strategy, which finds the runs of equal
    values that label maps are made of without the default match search.

    Raises:
        ValueError: `array` is not 2-D, is empty, or is neither uint8 nor uint16.
    """
    if array.ndim != 2 or not array.size:
        raise ValueError(f"a PNG map must be a non-empty (H, W) array, got shape {array.shape}")
    if array.dtype.kind != "u" or array.itemsize not in (1, 2):  # either byte order
        raise ValueError(f"a PNG map must be uint8 or uint16, got {array.dtype}")
    height, width = array.shape
    raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder(">")).view(np.uint8).reshape(height, -1)
    rows = np.empty((height, raw.shape[1] + 1), dtype=np.uint8)  # each row: its filter byte, then its bytes
    if up_filter:
        rows[:, 0] = _FILTER_UP
        rows[0, 1:] = raw[0]  # the row above the first is zeros
        np.subtract(raw[1:], raw[:-1], out=rows[1:, 1:])  # modulo 256, as the filter is defined
    else:
        rows[:, 0] = _FILTER_NONE
        rows[:, 1:] = raw
    deflate = zlib.compressobj(level, zlib.DEFLATED, zlib.MAX_WBITS, 8, zlib.Z_RLE)
    data = deflate.compress(rows.data) + deflate.flush()
    header = struct.pack(">IIBBBBB", width, height, 8 * array.itemsize, 0, 0, 0, 0)  # grey, no interlace
    return _SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))
