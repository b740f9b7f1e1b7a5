"""`clip`: the unmodified image encoder read densely, the naive baseline every method improves on.

ViT: the patch tokens of the untouched last block, through `ln_post` and `proj`. ResNet: the
attention pool applied at every position (each position a query, DenseCLIP-style). Its pooled
output equals `model.encode_image`, which the tests use to pin the dense path to open_clip's.
"""

from __future__ import annotations

from pipeline.models.heads._registry import register_head
from pipeline.models.heads.attention import LastBlockHead


@register_head
def clip() -> LastBlockHead:
    return LastBlockHead("qk", residual=True, mlp=True)
