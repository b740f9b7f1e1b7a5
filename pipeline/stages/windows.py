"""Sliding windows: cut a resized image into fixed-size crops and stitch their score maps back.

Windows start every `stride` pixels along each axis, plus one flush with the far edge so the
image is covered without running past it. An image smaller than the crop gets one window padded
at the bottom/right (with zeros, i.e. the mean colour after normalisation). `crop = 0` means one
window holding the whole image, padded up to a multiple of the patch size. Window scores are
upsampled (bilinear) to the window's pixels and averaged where windows overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Window:
    y0: int
    x0: int
    y1: int  # exclusive; the window's pixels past the image (padding) are not part of it
    x1: int


def starts(length: int, crop: int, stride: int) -> list[int]:
    if length <= crop:
        return [0]
    out = list(range(0, length - crop + 1, stride))
    return out if out[-1] == length - crop else [*out, length - crop]


def plan(height: int, width: int, crop: int, stride: int, multiple: int) -> tuple[tuple[int, int], list[Window]]:
    """Window size (rounded up to `multiple`) and the windows of a height x width image."""
    if crop <= 0:
        return (_ceil_to(height, multiple), _ceil_to(width, multiple)), [Window(0, 0, height, width)]
    stride = stride or crop // 2
    if not 0 < stride <= crop:
        raise ValueError(f"infer.stride {stride} must be in (0, infer.crop={crop}] so windows cover the image")
    size = _ceil_to(crop, multiple)
    windows = [
        Window(y, x, min(y + size, height), min(x + size, width))
        for y in starts(height, size, stride)
        for x in starts(width, size, stride)
    ]
    return (size, size), windows


def _ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def cut(image: torch.Tensor, windows: list[Window], size: tuple[int, int]) -> torch.Tensor:
    """Crops (n, C, *size) of an image (C, H, W), zero-padded at the bottom/right where they run past it."""
    crops = []
    for win in windows:
        crop = image[:, win.y0 : win.y1, win.x0 : win.x1]
        crops.append(F.pad(crop, (0, size[1] - crop.shape[2], 0, size[0] - crop.shape[1])))
    return torch.stack(crops)


def stitch(
    scores: torch.Tensor, windows: list[Window], size: tuple[int, int], out_size: tuple[int, int]
) -> torch.Tensor:
    """Average of window scores (n, K, h, w), each upsampled to `size`, over an image of `out_size`: (K, H, W)."""
    canvas = scores.new_zeros((scores.shape[1], *out_size))
    count = scores.new_zeros(out_size)
    for score, win in zip(scores, windows, strict=True):
        up = F.interpolate(score[None], size=size, mode="bilinear", align_corners=False)[0]
        canvas[:, win.y0 : win.y1, win.x0 : win.x1] += up[:, : win.y1 - win.y0, : win.x1 - win.x0]
        count[win.y0 : win.y1, win.x0 : win.x1] += 1
    return canvas / count
