"""Tiny random-init open_clip models for the dense-engine tests (no weights are ever downloaded).

`tests/data/tiny-vit.json`: ViT, width 64, 3 blocks of 4 heads, patch 8, input 64 (8 x 8 grid).
`tests/data/tiny-rn.json`: ModifiedResNet [1, 1, 1, 1], width 8, input 64 (2 x 2 grid at stride 32).
Both have a 1-block text tower of width 32 and embed_dim 32. Weights are drawn from a fixed seed,
so two loads of the same model are equal.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from pipeline.config import ModelCfg
from pipeline.models.backbone import Backbone, load_backbone

DATA = Path(__file__).resolve().parent / "data"
CONFIGS = {"vit": str(DATA / "tiny-vit.json"), "resnet": str(DATA / "tiny-rn.json")}


def fresh_backbone(kind: str = "vit", precision: str = "fp32", seed: int = 0, **kwargs) -> Backbone:
    return load_backbone(ModelCfg(name=CONFIGS[kind], precision=precision, device="cpu", seed=seed, **kwargs))


@functools.cache
def tiny_backbone(kind: str = "vit", precision: str = "fp32") -> Backbone:
    """One shared model per (kind, precision) for tests that only read it."""
    return fresh_backbone(kind, precision)


def blocky_images(n: int, size: int, seed: int = 0, blocks: int = 4) -> torch.Tensor:
    """(n, 3, size, size) normalised-range images of flat colour blocks plus a little noise, so the
    patches of a random-init model differ and its label maps are not degenerate."""
    g = torch.Generator().manual_seed(seed)
    cell = size // blocks
    colours = torch.randn(n, 3, blocks, blocks, generator=g)
    images = colours.repeat_interleave(cell, dim=2).repeat_interleave(cell, dim=3)
    return images + 0.1 * torch.randn(images.shape, generator=g)


def blocky_uint8(n: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """(H, W, 3) uint8 RGB images of colour blocks, as a reader would decode them."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        colours = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        ys = np.arange(height) * 4 // height
        xs = np.arange(width) * 4 // width
        noise = rng.integers(-8, 9, (height, width, 3))
        out.append(np.clip(colours[ys][:, xs].astype(int) + noise, 0, 255).astype(np.uint8))
    return out
