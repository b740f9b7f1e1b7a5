"""ModifiedResNet internals shared by the heads: the attention pool plays the role of the last block.

open_clip's `AttentionPool2d` attends from the mean token to all layer4 positions (plus a learned
positional embedding) with `q_proj`, `k_proj`, `v_proj`, then `c_proj`. Densely, every position
becomes a query (DenseCLIP's dense output), with the positional embedding interpolated to the grid.
MaskCLIP's value path is `c_proj(v_proj(layer4))`, i.e. both projections as 1x1 convolutions,
without the positional embedding (its converter discards it).
"""

from __future__ import annotations

import torch

from pipeline.models.backbone import Backbone
from pipeline.models.heads._base import Encoded, attend


def layer4(backbone: Backbone, images: torch.Tensor) -> torch.Tensor:
    """(B, 32*width, H/32, W/32) features in the model dtype."""
    vis = backbone.visual
    x = vis.stem(images.to(backbone.dtype))
    return vis.layer4(vis.layer3(vis.layer2(vis.layer1(x))))


def encode(backbone: Backbone, images: torch.Tensor, mode: str, sigma: float, with_keys: bool) -> Encoded:
    pool = backbone.visual.attnpool
    feats = layer4(backbone, images)
    b, _, h, w = feats.shape
    x = feats.flatten(2).transpose(1, 2)  # (B, h*w, C)
    if mode == "identity":
        out = pool.c_proj(pool.v_proj(torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)))
    else:
        tokens = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)
        tokens = tokens + backbone.positional_embedding((h, w)).to(tokens.dtype)
        q, k, v = (
            proj(tokens).reshape(b, h * w + 1, pool.num_heads, -1).transpose(1, 2)
            for proj in (pool.q_proj, pool.k_proj, pool.v_proj)
        )
        out = pool.c_proj(attend(q, k, v, mode, (h, w), sigma).transpose(1, 2).flatten(2))
    out = out.float()
    dense = out[:, 1:].transpose(1, 2).reshape(b, -1, h, w)
    keys = pool.k_proj(x) if with_keys else None
    return Encoded(out[:, 0], dense, keys)
