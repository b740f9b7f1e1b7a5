"""MaskCLIP's test-time refinements: prompt denoising (PD) and key smoothing (KS).

Both work on class probabilities softmax(100 * cosine), MaskCLIP's fixed temperature for them.

- PD removes classes that are nowhere confident: a class whose highest probability over the image
  is below `pd_thresh` gets score -100 (MaskCLIP's value). Unlike the official code, the image's
  most confident class is always kept, so a map never loses every class.
- KS replaces the probabilities of uncertain pixels (max probability below `ks_thresh`; MaskCLIP's
  1.0 means every pixel) by a vote of all pixels weighted by the cosine similarity of their keys in
  the last attention layer, as the paper describes. The official code instead calls
  `F.normalize(k, p=2)` on keys shaped (N, HW, C), whose default `dim=1` normalises over the token
  axis, not the channels, and leaves the weights unnormalised. Here each pixel's vote is divided by
  the sum of its absolute weights, which keeps the argmax and puts the result on the cosine scale
  ([-1, 1]) the rest of the engine expects; refined maps hold these votes and probabilities instead
  of cosines, so a downstream temperature acts on them as on cosines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCALE = 100.0  # MaskCLIP's softmax temperature inside PD and KS
REMOVED = -100.0  # score of a class removed by PD


def prompt_denoise(scores: torch.Tensor, thresh: float, scale: float = SCALE) -> torch.Tensor:
    """Scores (B, K, h, w) with the classes that are nowhere confident set to -100."""
    peak = F.softmax(scale * scores.float(), dim=1).flatten(2).amax(dim=-1)  # (B, K)
    drop = peak < thresh
    drop.scatter_(1, peak.argmax(dim=1, keepdim=True), False)
    return scores.masked_fill(drop[:, :, None, None], REMOVED)


def key_smooth(scores: torch.Tensor, keys: torch.Tensor, thresh: float, scale: float = SCALE) -> torch.Tensor:
    """Scores (B, K, h, w) and patch keys (B, h*w, C) to key-smoothed probabilities (B, K, h, w) float32."""
    b, k, h, w = scores.shape
    prob = F.softmax(scale * scores.float(), dim=1).flatten(2).transpose(1, 2)  # (B, h*w, K)
    unit = F.normalize(keys.float(), dim=-1)  # cosine over channels (the paper), not over tokens
    weight = unit @ unit.transpose(1, 2)  # (B, h*w, h*w)
    voted = (weight @ prob) / weight.abs().sum(dim=-1, keepdim=True).clamp_min(1e-6)
    uncertain = prob.amax(dim=-1, keepdim=True) < thresh
    return torch.where(uncertain, voted, prob).transpose(1, 2).reshape(b, k, h, w)
