"""Dense heads: training-free ways to read per-patch CLIP embeddings out of an image encoder.

A head maps normalised images (B, 3, H, W) to class scores (B, K, H/s, W/s) float32 at the
backbone's patch grid (s = `Backbone.stride`): cosine similarity with the text classifier, before
any temperature, max over each class's synonyms. `list_heads()` names them; `create_head(name,
**options)` builds one. Importing this package registers the built-in heads.
"""

from pipeline.models.heads import attention, clip, clsclip, denseclip, maskclip  # noqa: F401  (registers the heads)
from pipeline.models.heads._base import DenseHead, Encoded
from pipeline.models.heads._registry import (
    create_head,
    head_options,
    labelling_head_name,
    list_heads,
    register_head,
)

__all__ = [
    "DenseHead",
    "Encoded",
    "create_head",
    "head_options",
    "labelling_head_name",
    "list_heads",
    "register_head",
]
