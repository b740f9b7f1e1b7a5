"""What every dense head shares: the output record, the base class and the attention variants.

All the training-free methods here (MaskCLIP, SCLIP, ClearCLIP, NACLIP) change only the last
attention layer of the image encoder (the last transformer block of a ViT, the attention pool of a
ResNet), replacing its attention by one of these variants:

- `qk`: the unmodified attention (the naive CLIP baseline);
- `identity`: each token attends only to itself, i.e. the value path (MaskCLIP);
- `qq`, `kk`, `qq+kk`: query-query / key-key self-correlation (ClearCLIP, SCLIP);
- `kk+gauss`: key-key plus a Gaussian prior over the patch grid (NACLIP).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.models.backbone import Backbone
from pipeline.models.prompts import TextClassifier

MODES = ("qk", "identity", "qq", "kk", "qq+kk", "kk+gauss")


@dataclass
class Encoded:
    """Dense output of an image encoder whose last attention layer was replaced."""

    pooled: torch.Tensor  # (B, E) float32: the [CLS] / pooled token in CLIP space (not normalised)
    dense: torch.Tensor  # (B, E, h, w) float32: patch embeddings in CLIP space (not normalised)
    keys: torch.Tensor | None = None  # (B, h*w, C): patch keys of the last attention layer, when asked for


class DenseHead:
    """Base of the heads: `head(backbone, text, images)` -> class scores (B, K, h, w) float32 cosine."""

    def encode(self, backbone: Backbone, images: torch.Tensor) -> Encoded:
        raise NotImplementedError

    @torch.inference_mode()
    def __call__(self, backbone: Backbone, text: TextClassifier, images: torch.Tensor) -> torch.Tensor:
        return text.scores(self.encode(backbone, images).dense)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str, grid: tuple[int, int], sigma: float = 5.0
) -> torch.Tensor:
    """Attention variant `mode` over (B, heads, N, d) tensors whose last h*w tokens form `grid`.

    Computed in float32 whatever the model dtype (the softmax is the sensitive part); returns v's dtype.
    """
    dtype = v.dtype
    q, k, v = q.float(), k.float(), v.float()
    sdpa = F.scaled_dot_product_attention
    if mode == "identity":
        out = v
    elif mode == "qk":
        out = sdpa(q, k, v)
    elif mode == "qq":
        out = sdpa(q, q, v)
    elif mode == "kk":
        out = sdpa(k, k, v)
    elif mode == "qq+kk":
        # SCLIP sums the two softmaxed maps: (A_qq + A_kk) v = A_qq v + A_kk v.
        out = sdpa(q, q, v) + sdpa(k, k, v)
    elif mode == "kk+gauss":
        bias = gaussian_bias(tuple(grid), float(sigma), q.shape[-2] - grid[0] * grid[1], str(q.device))
        out = sdpa(k, k, v, attn_mask=bias)
    else:
        raise ValueError(f"attention mode {mode!r} is unknown; use one of {', '.join(MODES)}")
    return out.to(dtype)


@functools.lru_cache(maxsize=16)
def gaussian_bias(grid: tuple[int, int], sigma: float, prefix: int, device: str) -> torch.Tensor:
    """NACLIP's spatial prior: exp(-d^2 / 2 sigma^2) between patches, added to attention logits.

    (N, N) float32 with N = prefix + h*w; rows and columns of prefix tokens ([CLS]) get 0.
    """
    ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1).float()
    gauss = torch.exp(-torch.cdist(pos, pos).square() / (2 * sigma**2))
    return F.pad(gauss, (prefix, 0, prefix, 0)).to(device)
