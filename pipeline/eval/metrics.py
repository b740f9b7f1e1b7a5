"""Segmentation scores accumulated one label map at a time: confusion-matrix IoU and small-object IoU.

Nothing here holds more than one image: a benchmark over millions of pixels keeps a (K, K+1) count
matrix and a few sums, so an evaluation streams like a labeling run does.

Conventions (the README's evaluation section repeats them):
- Truth pixels whose value is not a class id (VOC's 255 border, or any id >= K) are left out.
- A prediction pixel that is not a class id (the ignore value 255/65535 of low-confidence pixels,
  or a class the truth vocabulary lacks) counts as a miss for the true class and as a false positive
  for none: abstaining is never rewarded, and never punished twice.
- IoU of class c = TP / (TP + FP + FN); classes absent from both truth and prediction have no IoU
  and are excluded from the mean (they would otherwise add a free 1 or an undeserved 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SMALL_OBJECT_FRACTION = 0.03  # an object covering less than this fraction of the image is "small"
OBJECT_MARGIN = 0.5  # an object's region is its box grown by this fraction of its size on every side


# What `confused_with` names for pixels predicted as the ignore value or as a class the truth lacks.
NOT_A_CLASS = "(ignored or not a truth class)"


class ConfusionMatrix:
    """Pixel counts `counts[t, p]`: rows are true classes, columns predicted classes, column K = ignored.

    `counts` is int64 with shape (K, K + 1).
    """

    def __init__(self, n_classes: int) -> None:
        if n_classes < 1:
            raise ValueError(f"a confusion matrix needs at least one class, got {n_classes}")
        self.n_classes = n_classes
        self.counts = np.zeros((n_classes, n_classes + 1), dtype=np.int64)

    def update(self, truth: np.ndarray, pred: np.ndarray) -> None:
        """Add one image. `truth` and `pred` are (H, W) integer maps of the same shape."""
        if truth.shape != pred.shape:
            raise ValueError(f"truth {truth.shape} and prediction {pred.shape} differ in size")
        k = self.n_classes
        t = truth.reshape(-1).astype(np.int64)
        p = pred.reshape(-1).astype(np.int64)
        valid = (t >= 0) & (t < k)
        t, p = t[valid], p[valid]
        p = np.where((p >= 0) & (p < k), p, k)
        self.counts += np.bincount(t * (k + 1) + p, minlength=k * (k + 1)).reshape(k, k + 1)

    def merge(self, other: ConfusionMatrix) -> None:
        if other.n_classes != self.n_classes:
            raise ValueError(f"cannot merge {other.n_classes}-class counts into {self.n_classes}-class counts")
        self.counts += other.counts

    def iou(self) -> np.ndarray:
        """(K,) float64 IoU per class in [0, 1]; NaN where the class is in neither truth nor prediction."""
        tp = np.diag(self.counts[:, : self.n_classes]).astype(np.float64)
        true_pixels = self.counts.sum(axis=1)  # includes ignored predictions: they are misses
        pred_pixels = self.counts[:, : self.n_classes].sum(axis=0)
        union = true_pixels + pred_pixels - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / np.maximum(union, 1), np.nan)

    def most_confused(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, shares): per true class, the other prediction that took most of its pixels, (K,) int64 (K:
        ignored, or a class the truth lacks), and that prediction's share of the class's true pixels, (K,)
        float64 in [0, 1]; a tie goes to the lower id. id -1 and share 0 where a class has no true pixels
        or none predicted as anything else."""
        k = self.n_classes
        wrong = self.counts.copy()
        wrong[np.arange(k), np.arange(k)] = 0
        ids = wrong.argmax(axis=1)
        taken = wrong[np.arange(k), ids]
        true_pixels = self.counts.sum(axis=1)
        shares = np.divide(taken, true_pixels, out=np.zeros(k), where=true_pixels > 0)
        return np.where(taken > 0, ids, -1), np.where(taken > 0, shares, 0.0)

    def miou(self) -> float:
        """Mean IoU over classes present in truth or prediction; NaN when nothing was counted."""
        iou = self.iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def pixel_accuracy(self) -> float:
        total = self.counts.sum()
        return float(np.trace(self.counts[:, : self.n_classes]) / total) if total else float("nan")

    def ignored_fraction(self) -> float:
        """Fraction of valid truth pixels whose prediction was the ignore value (or an unknown class)."""
        total = self.counts.sum()
        return float(self.counts[:, -1].sum() / total) if total else float("nan")

    def grouped(self, groups: Sequence[int]) -> ConfusionMatrix:
        """The same counts with classes merged: `groups[c]` is the new id of class c (e.g. by colour)."""
        lut = np.asarray(groups, dtype=np.int64)
        if lut.shape != (self.n_classes,):
            raise ValueError(f"need one group id per class ({self.n_classes}), got {lut.shape[0]}")
        n = int(lut.max()) + 1
        out = ConfusionMatrix(n)
        cols = np.append(lut, n)  # the ignored column stays the ignored column
        np.add.at(out.counts, (lut[:, None], cols[None, :]), self.counts)
        return out


@dataclass(frozen=True, slots=True)
class TruthObject:
    """One object of a truth image: its class id, tight box (x0, y0, x1, y1; x1/y1 exclusive), pixel area."""

    class_id: int
    box: tuple[int, int, int, int]
    area: int


class SmallObjectIoU:
    """IoU over objects covering less than `fraction` of their image, where a whole-image mIoU hides them.

    For each small object, the region is its box grown by `margin` of its width/height on every side
    (clipped to the image), and IoU is taken between `truth == c` and `pred == c` inside that region, c
    being the object's class. The margin lets spill-over (a blob twice the object's size) count as false
    positives, while the rest of the image, dominated by large regions, does not dilute the score.
    `mean` averages the per-object IoUs (each small object weighs the same); `pixel` pools the
    intersections and unions of all small objects (bigger small objects weigh more).
    """

    def __init__(self, fraction: float = SMALL_OBJECT_FRACTION, margin: float = OBJECT_MARGIN) -> None:
        self.fraction = fraction
        self.margin = margin
        self.count = 0
        self._iou_sum = 0.0
        self._inter = 0
        self._union = 0

    def update(self, truth: np.ndarray, pred: np.ndarray, objects: Sequence[TruthObject]) -> None:
        """Add the small objects among `objects` of one image; `truth`/`pred` are (H, W) integer maps."""
        if truth.shape != pred.shape:
            raise ValueError(f"truth {truth.shape} and prediction {pred.shape} differ in size")
        h, w = truth.shape
        for obj in objects:
            if obj.area <= 0 or obj.area >= self.fraction * h * w:
                continue
            y0, y1, x0, x1 = self._region(obj.box, h, w)
            t = truth[y0:y1, x0:x1] == obj.class_id
            if not t.any():
                continue  # the object is hidden in the truth map (fully occluded or cropped away)
            p = pred[y0:y1, x0:x1] == obj.class_id
            inter, union = int(np.count_nonzero(t & p)), int(np.count_nonzero(t | p))
            self.count += 1
            self._iou_sum += inter / union
            self._inter += inter
            self._union += union

    def _region(self, box: tuple[int, int, int, int], h: int, w: int) -> tuple[int, int, int, int]:
        x0, y0, x1, y1 = box
        mx, my = int(round(self.margin * (x1 - x0))), int(round(self.margin * (y1 - y0)))
        return max(0, y0 - my), min(h, y1 + my), max(0, x0 - mx), min(w, x1 + mx)

    @property
    def mean(self) -> float:
        return self._iou_sum / self.count if self.count else float("nan")

    @property
    def pixel(self) -> float:
        return self._inter / self._union if self._union else float("nan")


class Scores:
    """Everything one prediction setting accumulates over a benchmark: the confusion matrix and small objects."""

    def __init__(self, n_classes: int) -> None:
        self.confusion = ConfusionMatrix(n_classes)
        self.small = SmallObjectIoU()

    def update(self, truth: np.ndarray, pred: np.ndarray, objects: Sequence[TruthObject] = ()) -> None:
        self.confusion.update(truth, pred)
        self.small.update(truth, pred, objects)

    def summary(self, class_names: Sequence[str], background: int | None) -> dict:
        """JSON-ready scores; NaN (undefined) values become null."""
        iou = self.confusion.iou()
        return {
            "mIoU": _num(self.confusion.miou()),
            "pixel_accuracy": _num(self.confusion.pixel_accuracy()),
            "ignored_fraction": _num(self.confusion.ignored_fraction()),
            "background_iou": _num(iou[background]) if background is not None else None,
            "small_object_iou": _num(self.small.mean),
            "small_object_pixel_iou": _num(self.small.pixel),
            "small_object_count": self.small.count,
            "per_class": {name: _num(v) for name, v in zip(class_names, iou, strict=True)},
            "confused_with": self.confused_with(class_names),
        }

    def confused_with(self, class_names: Sequence[str]) -> dict[str, dict]:
        """Per true class that was ever mislabelled, what it was most often taken for (`ConfusionMatrix.
        most_confused`): {name: {"class": other name, or `NOT_A_CLASS`, "share": fraction of its pixels}}.
        Classes never mislabelled are left out."""
        ids, shares = self.confusion.most_confused()
        names = [*class_names, NOT_A_CLASS]
        return {
            name: {"class": names[j], "share": _num(share)}
            for name, j, share in zip(class_names, ids, shares, strict=True)
            if j >= 0
        }


def _num(value: float) -> float | None:
    return None if value != value else round(float(value), 6)
