"""The label shard's PNG encoder, read back by two independent decoders: Pillow and libpng (torchvision)."""

from __future__ import annotations

import io

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
    ]


@pytest.mark.parametrize("up_filter", [False, True])
@pytest.mark.parametrize("index", range(5))
def test_pillow_and_libpng_read_back_the_exact_pixels(index, up_filter):
    array = _maps()[index]
    data = encode_png(array, up_filter=up_filter)
    image = Image.open(io.BytesIO(data))
    assert image.size == (array.shape[1], array.shape[0])
    assert image.mode == ("L" if array.dtype == np.uint8 else "I;16")
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
