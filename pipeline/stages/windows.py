"""Sliding windows: cut a resized image into fixed-size crops and stitch their score maps back.

Windows start every `stride` pixels along each axis, plus one flush with the far edge so the
image is covered without running past it. An image smaller than the crop gets one window padded
at the bottom/right (with zeros, i.e. the mean colour after normalisation). `crop = 0` means one
window holding the whole image, padded up to a multiple of the patch size. Window scores are
upsampled (bilinear) to the window's pixels and averaged where windows overlap. From a patch grid
the upsampling and placing of the windows that share rows run as two matrix products
(`resize_matrix`): bilinear resizing is separable, and the products apply the same weights as
`F.interpolate`. On CPUs this is several times faster than resizing window by window for small
images with sub-patch shifts (where many small windows overlap), and about as fast for large ones.
Each row span's product is a temporary of (K, window height, image width).

Sub-patch shifts (`shifts` = n > 1): a ViT scores one vector per patch, so its map can only change
every `multiple` pixels and an object's edge is placed to within a patch. Every window is therefore
also run shifted up and left by each multiple of patch/n pixels (n x n copies in all; the strip a
shifted window gains above and left of the image is padded like the far edges); averaged, the copies
give a map on an n times finer grid. On the shipped shapes-clip, 2 x 2 shifts raised `maskclip` mIoU
from 0.18 to 0.23 (README, quality table) for 4x the forward passes.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Window:
    y0: int  # may be negative: a shifted window starts above / left of the image
    x0: int
    y1: int  # exclusive, at most the image's size; the window's pixels outside the image (padding) are not part of it
    x1: int


def starts(length: int, crop: int, stride: int) -> list[int]:
    if length <= crop:
        return [0]
    out = list(range(0, length - crop + 1, stride))
    return out if out[-1] == length - crop else [*out, length - crop]


def plan(
    height: int, width: int, crop: int, stride: int, multiple: int, shifts: int = 1
) -> tuple[tuple[int, int], list[Window]]:
    """Window size (rounded up to `multiple`) and the windows of a height x width image, each window
    followed by its `shifts` x `shifts` - 1 sub-patch shifted copies."""
    if shifts < 1:
        raise ValueError(f"infer.shifts {shifts} must be at least 1 (1 = no sub-patch shifts)")
    if crop <= 0:
        size = (ceil_to(height, multiple), ceil_to(width, multiple))
        origins = [(0, 0)]
    else:
        stride = stride or crop // 2
        if not 0 < stride <= crop:
            raise ValueError(f"infer.stride {stride} must be in (0, infer.crop={crop}] so windows cover the image")
        size = (ceil_to(crop, multiple),) * 2
        origins = [(y, x) for y in starts(height, size[0], stride) for x in starts(width, size[1], stride)]
    offsets = sorted({round(i * multiple / shifts) for i in range(shifts)})
    windows = [
        Window(y - dy, x - dx, min(y - dy + size[0], height), min(x - dx + size[1], width))
        for y, x in origins
        for dy in offsets
        for dx in offsets
    ]
    return size, windows


def ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def cut(image: torch.Tensor, windows: list[Window], size: tuple[int, int]) -> torch.Tensor:
    """Crops (n, C, *size) of an image (C, H, W), zero-padded where they run past it."""
    crops = []
    for win in windows:
        top, left = max(0, -win.y0), max(0, -win.x0)
        crop = image[:, win.y0 + top : win.y1, win.x0 + left : win.x1]
        pad = (left, size[1] - left - crop.shape[2], top, size[0] - top - crop.shape[1])
        crops.append(F.pad(crop, pad))
    return torch.stack(crops)


# A dense product costs about `w` multiply-adds per output pixel, interpolation a few: on a patch grid
# (tens of cells a side) the product is the faster, on a map near pixel resolution interpolation is.
_PRODUCT_MAX_SIDE = 32


@functools.lru_cache(maxsize=64)
def resize_matrix(src: int, dst: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(dst, src) weights of 1-D linear resizing with `align_corners=False`: `M @ x` resizes `x` (src,)
    as `F.interpolate(mode="linear")` does (it is that function applied to the identity)."""
    eye = torch.eye(src, dtype=torch.float32, device=device)[None]
    return F.interpolate(eye, size=dst, mode="linear", align_corners=False)[0].T.to(dtype).contiguous()


def stitch(
    scores: torch.Tensor,
    windows: list[Window],
    size: tuple[int, int],
    out_size: tuple[int, int],
    finite: bool | None = None,
) -> torch.Tensor:
    """Average of window scores (n, K, h, w), each upsampled to `size`, over an image of `out_size`: (K, H, W).

    `finite`: whether every score is finite, when the caller knows it (one check per batch instead of
    a device sync per image); None: checked here."""
    if len(scores) != len(windows):
        raise ValueError(f"{len(scores)} window scores for {len(windows)} windows")
    h, w = scores.shape[2:]
    canvas = scores.new_zeros((scores.shape[1], *out_size))
    count = scores.new_zeros(out_size)
    # A product mixes every window of a row span: a non-finite score (0 * inf is NaN) would spread
    # to all of them, where the loop keeps it in its own window.
    if uses_products((h, w), size) and (finite if finite is not None else bool(scores.isfinite().all())):
        _add_by_products(canvas, count, scores, windows, size)
        return canvas / count
    for score, win in zip(scores, windows, strict=True):
        if (h, w) == tuple(size):  # a head that scores every pixel (a student)
            up = score
        else:
            up = F.interpolate(score[None], size=size, mode="bilinear", align_corners=False)[0]
        y0, x0 = max(0, win.y0), max(0, win.x0)
        canvas[:, y0 : win.y1, x0 : win.x1] += up[:, y0 - win.y0 : win.y1 - win.y0, x0 - win.x0 : win.x1 - win.x0]
        count[y0 : win.y1, x0 : win.x1] += 1
    return canvas / count


def uses_products(grid: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether `stitch` upsamples window scores on a (h, w) grid to `size` by matrix products (small
    patch grids), which need every score finite, rather than window by window."""
    return max(grid) <= _PRODUCT_MAX_SIDE and tuple(grid) != tuple(size)


def finite_by_image(scores: torch.Tensor, counts: list[int]) -> list[bool]:
    """Whether each image's window scores are all finite, for scores (n, K, h, w) of consecutive
    images with `counts` windows each: one device sync for the whole batch."""
    flags = scores.flatten(1).isfinite().all(1).tolist()
    starts = list(accumulate(counts, initial=0))
    return [all(flags[a:b]) for a, b in zip(starts[:-1], starts[1:], strict=True)]


def _add_by_products(
    canvas: torch.Tensor, count: torch.Tensor, scores: torch.Tensor, windows: list[Window], size: tuple[int, int]
) -> None:
    """Add patch-grid window scores (n, K, h, w), upsampled, to `canvas` (K, H, W) and their coverage to
    `count` (H, W), as two products per row span: the windows that share rows are widened and summed
    by one, `Y = [S_1 ... S_m] [C_1; ...; C_m]` (K, h, W), with `C_i` the column weights placed at the
    window's columns, and their rows are resized by one more, `R Y`, and added at the span's rows."""
    work = torch.float32 if scores.dtype in (torch.float16, torch.bfloat16) else scores.dtype  # products in fp32
    k, h, w = scores.shape[1:]
    row_weights = resize_matrix(h, size[0], work, scores.device)  # (size[0], h)
    col_weights = resize_matrix(w, size[1], work, scores.device).T  # (w, size[1])
    spans: dict[tuple[int, int], list[int]] = {}
    for n, win in enumerate(windows):
        spans.setdefault((win.y0, win.y1), []).append(n)
    for (y0, y1), members in spans.items():
        top = max(0, y0)
        cols = scores.new_zeros((len(members) * w, canvas.shape[2]), dtype=work)
        for m, n in enumerate(members):
            x0, x1 = windows[n].x0, windows[n].x1
            left = max(0, x0)
            cols[m * w : (m + 1) * w, left:x1] = col_weights[:, left - x0 : x1 - x0]
            count[top:y1, left:x1] += 1
        widened = scores[members].to(work).permute(1, 2, 0, 3).reshape(k, h, len(members) * w) @ cols
        canvas[:, top:y1] += row_weights[top - y0 : y1 - y0] @ widened
