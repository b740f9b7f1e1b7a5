"""Semantic FPN decoder (Kirillov et al. 2019) as DenseCLIP uses it: mmseg's `FPN` neck and `FPNHead`.

Neck: 1x1 lateral convolutions to `width` channels, top-down nearest upsampling and addition, a 3x3
convolution per level. Head: per level, `log2(stride / finest stride)` blocks of 3x3 conv-BN-ReLU, each
followed by a 2x bilinear upsampling (at least one block), summed at the finest level, dropout 0.1 and a
1x1 convolution to `out_dim` channels. DenseCLIP's closed-set classifier (a K-way 1x1 convolution) is
replaced by `out_dim` = the CLIP embedding size: the caller classifies pixels by cosine similarity with
text embeddings, so the decoder does not depend on the number of classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SemanticFPN(nn.Module):
    """`forward(features)` -> (B, out_dim, H/s0, W/s0) for maps at `strides` (finest first; DenseCLIP has four)."""

    def __init__(
        self,
        in_channels: list[int],
        strides: list[float],
        out_dim: int,
        width: int = 256,
        head_width: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.lateral = nn.ModuleList([nn.Conv2d(c, width, 1) for c in in_channels])
        self.output = nn.ModuleList([nn.Conv2d(width, width, 3, padding=1) for _ in in_channels])
        heads = []
        for stride in strides:
            n = max(1, round(math.log2(stride / strides[0])))
            layers: list[nn.Module] = []
            for j in range(n):
                layers.append(_conv_bn_relu(width if j == 0 else head_width, head_width))
                if stride != strides[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
            heads.append(nn.Sequential(*layers))
        self.scale_heads = nn.ModuleList(heads)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(head_width, out_dim, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral, features, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest"
            )
        outs = [conv(x) for conv, x in zip(self.output, laterals, strict=True)]
        x = self.scale_heads[0](outs[0])
        for head, level in zip(self.scale_heads[1:], outs[1:], strict=True):
            y = head(level)
            x = x + (
                y
                if y.shape[-2:] == x.shape[-2:]
                else F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
            )
        return self.classifier(self.dropout(x))
