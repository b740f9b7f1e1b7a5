"""ViT internals shared by the heads, written against open_clip's parameters, never its forward.

The embedding step is redone here so the positional embedding can be interpolated to any patch
grid; blocks before the last run through open_clip's own modules; the last block is rebuilt from
its parameters (`ln_1`, `attn.in_proj_weight/in_proj_bias`, `attn.out_proj`, `ls_1`, `ln_2`, `mlp`,
`ls_2`, and the optional extras of open_clip's custom block) so its attention can be swapped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.backbone import Backbone
from pipeline.models.heads._base import Encoded, attend

_IDENTITY = nn.Identity()


def embed(backbone: Backbone, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Tokens entering the first block, (B, 1 + h*w, D) in the model dtype, and the patch grid (h, w)."""
    vis = backbone.visual
    x = vis.conv1(images.to(backbone.dtype))
    grid = (x.shape[-2], x.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = vis.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + backbone.positional_embedding(grid).to(x.dtype)
    return vis.ln_pre(x), grid


def run_blocks(vis: nn.Module, x: torch.Tensor, blocks: list[nn.Module] | nn.ModuleList) -> torch.Tensor:
    """Unmodified open_clip blocks on (B, N, D) tokens (sequence-first models are transposed around them)."""
    batch_first = getattr(vis.transformer, "batch_first", False)
    if not batch_first:
        x = x.transpose(0, 1)
    for blk in blocks:
        x = blk(x)
    return x if batch_first else x.transpose(0, 1)


def split_heads(blk: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of the block's attention for normed tokens h (B, N, D), each (B, heads, N, D/heads)."""
    attn = blk.attn
    b, n, d = h.shape
    q, k, v = (
        t.reshape(b, n, attn.num_heads, d // attn.num_heads).transpose(1, 2)
        for t in F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    )
    return getattr(attn, "ln_q", _IDENTITY)(q), getattr(attn, "ln_k", _IDENTITY)(k), v


def merge_heads(blk: nn.Module, o: torch.Tensor) -> torch.Tensor:
    """Attention output (B, heads, N, d) through the block's output projection: (B, N, D)."""
    attn = blk.attn
    if getattr(attn, "head_scale", None) is not None:
        o = o * attn.head_scale
    o = o.transpose(1, 2).flatten(2)
    o = attn.out_proj(getattr(attn, "ln_inner", _IDENTITY)(o))
    return getattr(blk, "ln_attn", _IDENTITY)(o)


def modified_block(
    blk: nn.Module, x: torch.Tensor, mode: str, residual: bool, mlp: bool, grid: tuple[int, int], sigma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The last block with attention variant `mode`; returns its output tokens and the patch keys (B, h*w, D)."""
    q, k, v = split_heads(blk, blk.ln_1(x))
    y = blk.ls_1(merge_heads(blk, attend(q, k, v, mode, grid, sigma)))
    if residual:
        y = x + y
    if mlp:
        y = y + blk.ls_2(blk.mlp(blk.ln_2(y)))
    return y, k[:, :, 1:].transpose(1, 2).flatten(2)


def project(vis: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Final norm and projection into CLIP space, the projection in float32: (B, N, E) float32."""
    return vis.ln_post(tokens).float() @ vis.proj.float()


def to_grid(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, E) patch tokens to (B, E, h, w)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)


def encode(
    backbone: Backbone, images: torch.Tensor, mode: str, residual: bool, mlp: bool, sigma: float, with_keys: bool
) -> Encoded:
    vis = backbone.visual
    blocks = vis.transformer.resblocks
    x, grid = embed(backbone, images)
    x = run_blocks(vis, x, blocks[:-1])
    if mode == "qk" and residual and mlp and not with_keys:
        y, keys = run_blocks(vis, x, blocks[-1:]), None  # the untouched block, exactly as open_clip runs it
    else:
        y, keys = modified_block(blocks[-1], x, mode, residual, mlp, grid, sigma)
    return Encoded(pooled(vis, y), to_grid(project(vis, y[:, 1:]), grid), keys if with_keys else None)


def pooled(vis: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """The image embedding open_clip's VisionTransformer pools from the last tokens: (B, E) float32."""
    pool = (lambda t: t[:, 1:].mean(dim=1)) if vis.pool_type == "avg" else (lambda t: t[:, 0])
    out = vis.ln_post(pool(y)) if vis.final_ln_after_pool else pool(vis.ln_post(y))
    return out.float() @ vis.proj.float()
