"""Text side of the dense engine: prompt templates and the per-class text classifier.

Template sets are named (`list_template_sets()`): `openai80` (the 80 OpenAI ImageNet templates,
from open_clip), `maskclip85` (those 80 plus MaskCLIP's 5 scene templates), `single`
("a photo of a {}."), or any file `pipeline/models/templates/<name>.txt`; or a user file (path or
fsspec URL) with one template per line, `{}` marking the class name, `#` starting a comment.

A class's embedding is the normalised mean of its normalised per-template embeddings (CLIP's
prompt ensembling). Synonyms ("tv, monitor") are separate rows; a class scores the max over them.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

from pipeline.io import fs
from pipeline.models.backbone import Backbone
from pipeline.vocab import Vocabulary

logger = logging.getLogger(__name__)

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
_CACHE: weakref.WeakKeyDictionary[Backbone, dict] = weakref.WeakKeyDictionary()


def _openai80() -> tuple[str, ...]:
    return tuple(t("{}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES)


def list_template_sets() -> list[str]:
    return sorted({"openai80", "maskclip85", *(p.stem for p in TEMPLATES_DIR.glob("*.txt"))})


def load_templates(spec: str, storage_options: dict | None = None) -> tuple[str, ...]:
    """Templates of a named set or of a file (see module docstring); each holds one `{}`."""
    if spec == "openai80":
        return _openai80()
    if spec == "maskclip85":
        return _openai80() + _parse_templates((TEMPLATES_DIR / "scene5.txt").read_text(), "scene5")
    if (TEMPLATES_DIR / f"{spec}.txt").is_file():
        return _parse_templates((TEMPLATES_DIR / f"{spec}.txt").read_text(), spec)
    if "/" not in spec and "." not in spec:
        raise ValueError(f"unknown template set {spec!r}; named sets: {', '.join(list_template_sets())}, or a file")
    return _parse_templates(fs.read_text(spec, storage_options), spec)


def _parse_templates(text: str, where: str) -> tuple[str, ...]:
    templates = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "{}" not in line:
            raise ValueError(f"{where} line {number}: template {line!r} has no {{}} for the class name")
        templates.append(line)
    if not templates:
        raise ValueError(f"{where}: no templates (one per line, with {{}} for the class name)")
    return tuple(templates)


@dataclass(frozen=True, eq=False)
class TextClassifier:
    """Text embeddings of a vocabulary: one row per class name, rows of one class share `class_index`."""

    weights: torch.Tensor  # (N, E) float32, L2-normalised, on the backbone's device
    class_index: torch.Tensor  # (N,) int64, class id of each row
    n_classes: int
    names: tuple[str, ...] = ()  # (N,) the class name of each row (for heads that prompt names themselves)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of dense features (B, E, h, w) with every class: (B, K, h, w) float32."""
        feats = F.normalize(features.float(), dim=1)
        return self.reduce(torch.einsum("behw,ne->bnhw", feats, self.weights))

    def reduce(self, name_scores: torch.Tensor) -> torch.Tensor:
        """Per-name scores (B, N, ...) to per-class scores (B, K, ...): the max over a class's names."""
        return reduce_names(name_scores, self.class_index, self.n_classes)


def reduce_names(name_scores: torch.Tensor, class_index: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Per-name scores (B, N, ...) to per-class scores (B, K, ...): the max over each class's names,
    `class_index` (N,) int64 giving each name's class. Differentiable (gradients reach the best name)."""
    if len(class_index) == n_classes:
        return name_scores
    shape = (name_scores.shape[0], n_classes, *name_scores.shape[2:])
    index = class_index.view(1, -1, *[1] * (name_scores.dim() - 2)).expand_as(name_scores)
    out = name_scores.new_full(shape, float("-inf"))
    return out.scatter_reduce(1, index, name_scores, "amax")


def build_text_classifier(backbone: Backbone, vocab: Vocabulary, templates: tuple[str, ...]) -> TextClassifier:
    """The classifier of `vocab` under `templates`, built once per (model, vocabulary, templates)."""
    cache = _CACHE.setdefault(backbone, {})
    key = (vocab, tuple(templates))
    if key not in cache:
        names = [(cls, name) for cls, class_names in enumerate(vocab.names) for name in class_names]
        prompts = [t.replace("{}", name) for _, name in names for t in templates]
        emb = backbone.encode_text(prompts).view(len(names), len(templates), -1)
        weights = F.normalize(emb.mean(dim=1), dim=-1)
        index = torch.tensor([cls for cls, _ in names], dtype=torch.long, device=weights.device)
        cache[key] = TextClassifier(weights, index, len(vocab), tuple(name for _, name in names))
        logger.info("text classifier: %d classes, %d names, %d templates", len(vocab), len(names), len(templates))
    return cache[key]
