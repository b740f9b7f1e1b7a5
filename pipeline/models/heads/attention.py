"""Last-block heads: the shared `LastBlockHead`, and the self-correlation heads SCLIP, ClearCLIP, NACLIP.

- `sclip` (SCLIP, ECCV'24): correlative self-attention softmax(qq^T s) + softmax(kk^T s); the last
  block's residual and feed-forward network are kept, as in the official code.
- `clearclip` (ClearCLIP, ECCV'24): softmax(qq^T s), residual and feed-forward network dropped.
- `naclip` (NACLIP, WACV'25): softmax(kk^T s + Gaussian prior, sigma = 5 patches), residual and
  feed-forward network dropped.
"""

from __future__ import annotations

import torch

from pipeline.models.backbone import Backbone
from pipeline.models.heads import _resnet, _vit
from pipeline.models.heads._base import MODES, DenseHead, Encoded
from pipeline.models.heads._registry import register_head


class LastBlockHead(DenseHead):
    """Replaces the last attention layer by the variant `mode` (see `pipeline.models.heads._base`).

    `residual` / `mlp` keep the last block's residual connection and feed-forward network (ViT only:
    a ResNet's attention pool has neither). `sigma` is the Gaussian prior's width in patches.
    `with_keys` also returns the last layer's patch keys (for key smoothing).
    """

    def __init__(self, mode: str, residual: bool, mlp: bool, sigma: float = 5.0, with_keys: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"attention mode {mode!r} is unknown; use one of {', '.join(MODES)}")
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.mode, self.residual, self.mlp, self.sigma, self.with_keys = mode, residual, mlp, sigma, with_keys

    def encode(self, backbone: Backbone, images: torch.Tensor) -> Encoded:
        if backbone.kind == "vit":
            return _vit.encode(backbone, images, self.mode, self.residual, self.mlp, self.sigma, self.with_keys)
        return _resnet.encode(backbone, images, self.mode, self.sigma, self.with_keys)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r}, residual={self.residual}, mlp={self.mlp})"


@register_head
def sclip(residual: bool = True, mlp: bool = True) -> LastBlockHead:
    return LastBlockHead("qq+kk", residual, mlp)


@register_head
def clearclip(residual: bool = False, mlp: bool = False) -> LastBlockHead:
    return LastBlockHead("qq", residual, mlp)


@register_head
def naclip(sigma: float = 5.0, residual: bool = False, mlp: bool = False) -> LastBlockHead:
    return LastBlockHead("kk+gauss", residual, mlp, sigma=sigma)
