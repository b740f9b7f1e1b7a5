"""`maskclip`: MaskCLIP's value-embedding path (Zhou et al., ECCV'22).

The last attention layer's query-key mixing is dropped: each patch keeps its own value, projected
by the layer's output projection. ViT: `out_proj(v)` of the last block; ResNet: `c_proj(v_proj(x))`
on layer4, both projections acting as 1x1 convolutions.

Two ViT variants: the released code keeps the last block's residual connection and feed-forward
network (`residual=True, mlp=True`, the default); the variant re-implemented by ClearCLIP and
others drops both (`residual=False, mlp=False`). The default is the released code for now: quality
cannot be measured on a random-init model, so the ShapeWorld benchmark is meant to settle it.

Options `pd_thresh` / `ks_thresh` turn on prompt denoising and key smoothing (`refine.py`; MaskCLIP's
configs use 0.5 and 1.0); 0 = off, the plain MaskCLIP setting. MaskCLIP applies them to whole images;
with sliding windows they act within each window.
"""

from __future__ import annotations

import torch

from pipeline.models.backbone import Backbone
from pipeline.models.heads._registry import register_head
from pipeline.models.heads.attention import LastBlockHead
from pipeline.models.heads.refine import key_smooth, prompt_denoise
from pipeline.models.prompts import TextClassifier


class MaskCLIPHead(LastBlockHead):
    def __init__(self, residual: bool, mlp: bool, ks_thresh: float, pd_thresh: float) -> None:
        for name, value in (("ks_thresh", ks_thresh), ("pd_thresh", pd_thresh)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"maskclip option {name} must be a probability in [0, 1], got {value}")
        super().__init__("identity", residual, mlp, with_keys=ks_thresh > 0)
        self.ks_thresh, self.pd_thresh = ks_thresh, pd_thresh

    @torch.inference_mode()
    def __call__(self, backbone: Backbone, text: TextClassifier, images: torch.Tensor) -> torch.Tensor:
        encoded = self.encode(backbone, images)
        scores = text.scores(encoded.dense)
        if self.pd_thresh > 0:
            scores = prompt_denoise(scores, self.pd_thresh)
        if self.ks_thresh > 0:
            scores = key_smooth(scores, encoded.keys, self.ks_thresh)
        return scores


@register_head
def maskclip(residual: bool = True, mlp: bool = True, ks_thresh: float = 0.0, pd_thresh: float = 0.0) -> MaskCLIPHead:
    return MaskCLIPHead(residual, mlp, ks_thresh, pd_thresh)
