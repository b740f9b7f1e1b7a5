"""Pixel-adaptive mask refinement (PAMR; Araslanov & Roth, CVPR'20), NACLIP's default post-processing.

Each iteration replaces every pixel's class scores by a weighted average of its neighbours' scores
at a few dilations (8 neighbours per dilation), the weights being a softmax over neighbours of how
similar their colour is, measured in units of the local colour spread. Scores thus diffuse inside
regions of similar colour and stop at colour edges. Memory is a few copies of the score map; the
neighbour weights are computed once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_SPREAD_SCALE = 0.1  # colour differences are measured in tenths of the local standard deviation


def _offsets(dilations: tuple[int, ...]) -> list[tuple[int, int]]:
    return [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def _shift(padded: torch.Tensor, dy: int, dx: int, pad: int, size: tuple[int, int]) -> torch.Tensor:
    """The value at (y + dy, x + dx) for every pixel (y, x) of a border-replicated tensor."""
    return padded[..., pad + dy : pad + dy + size[0], pad + dx : pad + dx + size[1]]


def neighbour_weights(image: torch.Tensor, dilations: tuple[int, ...] = (8, 16)) -> torch.Tensor:
    """Weights (B, 8 * len(dilations), H, W) summing to 1 over neighbours, from an image (B, 3, H, W)."""
    size, pad = image.shape[-2:], max(dilations)
    padded = F.pad(image.float(), (pad,) * 4, mode="replicate")
    logits = []
    for d in dilations:
        ring = [_shift(padded, dy * d, dx * d, pad, size) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        spread = torch.stack(ring).std(dim=0)  # (B, 3, H, W): colour spread around each pixel at this dilation
        for dy, dx in [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]:
            diff = (image - _shift(padded, dy * d, dx * d, pad, size)).abs()
            logits.append(-(diff / (_SPREAD_SCALE * spread + 1e-8)).mean(dim=1))
    return torch.stack(logits, dim=1).softmax(dim=1)


def pamr(
    scores: torch.Tensor, image: torch.Tensor, steps: int = 10, dilations: tuple[int, ...] = (8, 16)
) -> torch.Tensor:
    """Refine class scores (B, K, H, W) with the colours of `image` (B, 3, H, W, any range); float32 out."""
    weights = neighbour_weights(image, dilations)
    size, pad = scores.shape[-2:], max(dilations)
    out = scores.float()
    for _ in range(steps):
        padded = F.pad(out, (pad,) * 4, mode="replicate")
        acc = torch.zeros_like(out)
        for j, (dy, dx) in enumerate(_offsets(dilations)):
            acc += weights[:, j : j + 1] * _shift(padded, dy, dx, pad, size)
        out = acc
    return out
