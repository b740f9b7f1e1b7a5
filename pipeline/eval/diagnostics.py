"""Diagnostics that tell a model that cannot *recognise* from one that cannot *localise*.

From one forward pass per image (the class score maps), the same scores are read three ways, by
masking class logits before the argmax, never by running the model again:

- open vocabulary: all K classes compete (the number users get);
- true classes: only the classes present in the image's ground truth compete; the gap to the open
  score is the cost of recognition errors, what is left is localisation;
- top-k: only the k classes with the highest image-level score (max over pixels) compete, plus
  background; this is the "recognise first, then segment" pipeline a strong image-level classifier
  would allow.

For ShapeWorld truth, the open-vocabulary confusion matrix is also read with classes merged by colour
(7 classes), which separates getting the colour right from getting the shape right.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from pipeline.data.shapeworld import CLASSES
from pipeline.eval.metrics import Scores
from pipeline.eval.truth import TruthSample
from pipeline.vocab import Vocabulary

# Masked classes get this much less than the lowest score of the map: far below any real score, yet
# finite, so bilinear upsampling never forms 0 * inf = NaN.
_MASK_MARGIN = 1e4

DEFAULT_TOP_K = 3

# finalize(score_map (K, h, w), size (H, W)) -> (H, W) integer label map (ignore value allowed)
Finalize = Callable[[torch.Tensor, tuple[int, int]], np.ndarray]


def restrict(score_map: torch.Tensor, allowed: np.ndarray) -> torch.Tensor:
    """`score_map` (K, h, w) with the classes where `allowed` (K,) bool is False pushed far below the rest."""
    keep = torch.as_tensor(allowed, device=score_map.device).view(-1, 1, 1)
    return torch.where(keep, score_map, score_map.min() - _MASK_MARGIN)


def true_classes(truth: np.ndarray, n_classes: int) -> np.ndarray:
    """(K,) bool: the classes present in an (H, W) truth map (void ids >= K ignored)."""
    ids = truth[truth < n_classes].astype(np.int64)
    return np.bincount(ids, minlength=n_classes)[:n_classes] > 0


def top_k_classes(score_map: torch.Tensor, k: int, background: int | None) -> np.ndarray:
    """(K,) bool: background plus the k other classes with the highest image-level (max-pooled) score.

    Max pooling, not mean pooling, so a small object's class can win on its own pixels.
    """
    image_scores = score_map.flatten(1).amax(dim=1).float().cpu().numpy()
    allowed = np.zeros(score_map.shape[0], dtype=bool)
    if background is not None:
        image_scores[background] = -np.inf
        allowed[background] = True
    allowed[np.argsort(-image_scores, kind="stable")[:k]] = True
    return allowed


def colour_groups(vocab: Vocabulary) -> list[int] | None:
    """Group id per class merging ShapeWorld classes by colour ("red circle" -> "red"), or None.

    Only for the ShapeWorld vocabulary (background + colour x shape), where the first word is a colour.
    """
    if tuple(vocab.display_names) != CLASSES:
        return None
    colours: dict[str, int] = {}
    return [
        colours.setdefault(name if i == vocab.background else name.split()[0], len(colours))
        for i, name in enumerate(vocab.display_names)
    ]


class ModelScores:
    """The scores of one model over a benchmark: open vocabulary, and the diagnostics when score maps exist."""

    def __init__(self, n_classes: int, background: int | None, top_k: int = DEFAULT_TOP_K) -> None:
        self.n_classes = n_classes
        self.background = background
        self.k = top_k
        self.open = Scores(n_classes)
        self.true_classes: Scores | None = None
        self.top_k: Scores | None = None

    def add_labels(self, sample: TruthSample, labels: np.ndarray) -> None:
        """A finished label map only (a run's output, a constant baseline): open-vocabulary scores."""
        self.open.update(sample.truth, labels, sample.objects)

    def add_scores(self, sample: TruthSample, score_map: torch.Tensor, finalize: Finalize) -> None:
        """Class scores (K, h, w) of one image: all three settings, from the same scores."""
        if self.true_classes is None or self.top_k is None:
            self.true_classes, self.top_k = Scores(self.n_classes), Scores(self.n_classes)
        size = tuple(sample.truth.shape)
        self.open.update(sample.truth, finalize(score_map, size), sample.objects)
        present = true_classes(sample.truth, self.n_classes)
        self.true_classes.update(sample.truth, finalize(restrict(score_map, present), size), sample.objects)
        gated = top_k_classes(score_map, self.k, self.background)
        self.top_k.update(sample.truth, finalize(restrict(score_map, gated), size), sample.objects)

    def summary(self, vocab: Vocabulary) -> dict:
        """JSON-ready: the open-vocabulary summary, `colour_mIoU` (ShapeWorld) and `diagnostics`."""
        out = self.open.summary(vocab.display_names, vocab.background)
        groups = colour_groups(vocab)
        out["colour_mIoU"] = _round(self.open.confusion.grouped(groups).miou()) if groups else None
        if self.true_classes is not None and self.top_k is not None:
            out["diagnostics"] = {
                "true_classes": _brief(self.true_classes.summary(vocab.display_names, vocab.background)),
                "top_k": {"k": self.k, **_brief(self.top_k.summary(vocab.display_names, vocab.background))},
            }
        return out


def _brief(summary: dict) -> dict:
    return {key: summary[key] for key in ("mIoU", "background_iou", "small_object_iou")}


def _round(value: float) -> float | None:
    return None if value != value else round(value, 6)
