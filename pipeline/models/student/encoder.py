"""DenseCLIP's image side: feature maps for the FPN (four, or `levels`) plus CLIP-space global and dense
embeddings.

Follows `CLIPVisionTransformer` / `CLIPResNetWithAttention` of the official DenseCLIP code
(raoyongming/DenseCLIP, `segmentation/denseclip/models.py`), written against open_clip's modules:

- ViT: the tokens after four blocks (`vit_taps`: blocks [3, 5, 7, 11] of a 12-block ViT-B/16, the same
  relative depths for other depths), all at the patch stride, go through the reference adapters
  (each starts with `GroupNorm(1, C)`): fpn1 = GN, ConvT x2, BN, GELU, ConvT x2 (stride step/4);
  fpn2 = GN, ConvT x2 (step/2); fpn3 = GN (step); fpn4 = GN, MaxPool 2 (2 step), where the step is
  the patch size, or `patch_stride` (a change from the reference: patches that overlap). The dense
  embedding is `ln_post(tokens) @ proj` from the standard attention; the global one is the [CLS] token.
- ResNet: layer1-4 (strides 4-32); the attention pool runs with every position as a query
  (full q-k attention), giving the dense embedding; the mean token gives the global one.

`levels` (a change from the reference, which always has 4) keeps the coarsest `levels` of the four maps:
3 leaves out the finest (step/4, or stride 4 for a ResNet), whose adapter and decoding at full
resolution cost more than the whole encoder of a small CLIP. With half-patch steps, 3 levels keep the
reference's output stride of a quarter patch.

`dense="value"` (a change from the reference) takes the dense embedding from MaskCLIP's value path
instead (`pipeline.models.heads.maskclip`: the last attention's query-key mixing dropped, as in the
official MaskCLIP code; ResNet: `c_proj(v_proj(x))`). DenseCLIP fine-tunes the standard path with
human labels; with pseudo-labels, the value path makes the score map start as the teacher's own
(MaskCLIP's) map instead of CLIP's poorly localised standard one. The global embedding and the FPN
features are unchanged.

Left out of the reference: the [CLS] token's second `class_embedding` (a quirk) and drop-path.
The positional embedding is interpolated to the input's grid in every forward, with gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from torch import nn

from pipeline.models.backbone import interpolate_pos_embed
from pipeline.models.heads._base import attend
from pipeline.models.heads._vit import modified_block, project, run_blocks

_REFERENCE_TAPS = (3, 5, 7, 11)  # of the 12 blocks of ViT-B/16


def vit_taps(layers: int) -> list[int]:
    """Block indices (0-based) to tap in a ViT of `layers` blocks: the reference's relative depths."""
    return sorted({max(0, round((t + 1) * layers / 12) - 1) for t in _REFERENCE_TAPS})


class ImageEncoder(nn.Module):
    """`forward(images)` -> (features, global, dense).

    images: (B, 3, H, W) normalised, in the tower's dtype. features: `levels` maps (B, C_i, H/s_i, W/s_i),
    finest first;
    global: (B, E) float32; dense: (B, E, h, w) float32 at the tower's output stride (not normalised).
    """

    def __init__(self, visual: nn.Module, dense: str = "attention", patch_stride: int = 0, levels: int = 4) -> None:
        super().__init__()
        if dense not in ("attention", "value"):
            raise ValueError(f"dense must be 'attention' (DenseCLIP) or 'value' (MaskCLIP's path), got {dense!r}")
        if not 2 <= levels <= 4:
            raise ValueError(f"fpn_levels must be 2, 3 or 4 (the reference), got {levels}")
        self.visual = visual
        self.levels = levels
        self.dense = dense
        self.is_vit = not isinstance(visual, ModifiedResNet)
        if self.is_vit:
            width, patch = visual.transformer.width, visual.patch_size[0]
            self.patch_stride = patch_stride or patch
            if not 0 < self.patch_stride <= patch or patch % self.patch_stride or (patch - self.patch_stride) % 2:
                raise ValueError(
                    f"patch_stride must divide evenly into the patch size {patch}, leaving an even overlap "
                    f"(e.g. {patch // 2}), got {patch_stride}"
                )
            self.taps = vit_taps(len(visual.transformer.resblocks))
            if len(self.taps) != 4:
                raise ValueError(
                    f"a DenseCLIP ViT needs at least 4 blocks, this one has {len(visual.transformer.resblocks)}"
                )
            # All four are built, the unused dropped after: the kept ones draw the same initial weights
            # from a seed whatever `levels` is.
            adapters = (
                [
                    nn.Sequential(
                        nn.GroupNorm(1, width),
                        nn.ConvTranspose2d(width, width, 2, 2),
                        nn.BatchNorm2d(width),
                        nn.GELU(),
                        nn.ConvTranspose2d(width, width, 2, 2),
                    ),
                    nn.Sequential(nn.GroupNorm(1, width), nn.ConvTranspose2d(width, width, 2, 2)),
                    nn.Sequential(nn.GroupNorm(1, width)),
                    nn.Sequential(nn.GroupNorm(1, width), nn.MaxPool2d(2)),
                ]
            )[4 - levels :]
            self.adapters = nn.ModuleList(adapters)
            self.taps = self.taps[4 - levels :]
            self.channels = [width] * levels
            step = self.patch_stride
            self.strides = [step / 4, step / 2, step, step * 2][4 - levels :]
        else:
            if patch_stride:
                raise ValueError("patch_stride applies to a ViT; this image encoder is a ResNet")
            layers = (visual.layer1, visual.layer2, visual.layer3, visual.layer4)
            self.channels = [layer[-1].conv3.out_channels for layer in layers][4 - levels :]
            self.strides = [4, 8, 16, 32][4 - levels :]

    @property
    def output_stride(self) -> int:
        return int(self.strides[-2]) if self.is_vit else 32

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        return self._vit(images) if self.is_vit else self._resnet(images)

    def _vit(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        vis = self.visual
        conv = vis.conv1
        pad = (conv.kernel_size[0] - self.patch_stride) // 2
        x = F.conv2d(images, conv.weight, conv.bias, stride=self.patch_stride, padding=pad)
        b, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls = vis.class_embedding.to(x.dtype).view(1, 1, -1).expand(b, 1, -1)
        native = vis.grid_size if isinstance(vis.grid_size, tuple) else (vis.grid_size,) * 2
        pos = vis.positional_embedding
        if (h, w) != tuple(native):
            pos = interpolate_pos_embed(pos, tuple(native), (h, w))
        x = vis.ln_pre(torch.cat([cls, x], dim=1) + pos.to(x.dtype))
        feats = []
        blocks = vis.transformer.resblocks
        for i, blk in enumerate(blocks):
            before = x
            x = run_blocks(vis, x, [blk])
            if i in self.taps:
                feats.append(x[:, 1:].transpose(1, 2).reshape(b, -1, h, w))
        feats = [adapter(f) for adapter, f in zip(self.adapters, feats, strict=True)]
        out = project(vis, x)  # (B, 1 + h*w, E) float32
        if self.dense == "value":
            value, _ = modified_block(blocks[-1], before, "identity", True, True, (h, w), 0.0)
            dense = project(vis, value[:, 1:])
        else:
            dense = out[:, 1:]
        return feats, out[:, 0], dense.transpose(1, 2).reshape(b, -1, h, w)

    def _resnet(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        vis = self.visual
        x = vis.stem(images)
        feats = []
        for layer in (vis.layer1, vis.layer2, vis.layer3, vis.layer4):
            x = layer(x)
            feats.append(x)
        feats = feats[4 - self.levels :]
        pool = vis.attnpool
        b, _, h, w = x.shape
        patches = x.flatten(2).transpose(1, 2)
        tokens = torch.cat([patches.mean(dim=1, keepdim=True), patches], dim=1)
        native = round((pool.positional_embedding.shape[0] - 1) ** 0.5)
        pos = pool.positional_embedding
        if (h, w) != (native, native):
            pos = interpolate_pos_embed(pos, (native, native), (h, w))
        tokens = tokens + pos.to(tokens.dtype)
        q, k, v = (
            proj(tokens).reshape(b, h * w + 1, pool.num_heads, -1).transpose(1, 2)
            for proj in (pool.q_proj, pool.k_proj, pool.v_proj)
        )
        out = pool.c_proj(attend(q, k, v, "qk", (h, w)).transpose(1, 2).flatten(2)).float()
        dense = pool.c_proj(pool.v_proj(patches)).float() if self.dense == "value" else out[:, 1:]
        return feats, out[:, 0], dense.transpose(1, 2).reshape(b, -1, h, w)


def resize_like(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (B, C, h, w) to `size` (no-op when equal)."""
    return (
        x if tuple(x.shape[-2:]) == tuple(size) else F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    )
