"""Calibrate the background offset: the one number that decides whether maps collapse to background.

With raw cosine scores the background prompt either wins nearly everywhere or nowhere, so an additive
offset on the background class's score (`vocab.background_offset`, plus the model's `meta.json`
value) is essential. It is found by a 1-D grid search maximising mIoU on a calibration split, which
must be kept apart from the evaluation split (e.g. ShapeWorld shards written with another `--seed`),
or the reported mIoU is tuned on its own test set.

Each image goes through the model once: every candidate offset is applied to the same score maps and
scored into its own streaming confusion matrix. The candidate is added to the background row of the
score map the labeler produced (which already holds the labeler's own offset), so the result is the
labeler's offset plus the best shift. That is exact with sub-patch shifts and PAMR too: both average
scores with weights that sum to one, so a constant added to one class passes through them unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np

from pipeline.eval import counted
from pipeline.eval.evaluate import ScoreModel, batches
from pipeline.eval.metrics import ConfusionMatrix
from pipeline.eval.truth import TruthSample, TruthSet
from pipeline.vocab import Vocabulary

logger = logging.getLogger(__name__)

# Shifts tried, in cosine-similarity units (the units of score maps and of vocab.background_offset).
DEFAULT_SHIFTS = tuple(np.round(np.arange(-0.5, 0.5001, 0.01), 4).tolist())


def calibrate_background_offset(
    labeler: ScoreModel,
    truth: TruthSet,
    base_offset: float,
    shifts: Sequence[float] = DEFAULT_SHIFTS,
    batch_size: int = 16,
) -> dict:
    """Best background offset for `labeler` on the calibration split `truth` (see `best_background_offset`)."""
    return best_background_offset(
        labeler, truth.samples(images=True), truth.vocab, base_offset, shifts, batch_size, where=truth.url
    )


def best_background_offset(
    labeler: ScoreModel,
    samples: Iterable[TruthSample],
    vocab: Vocabulary,
    base_offset: float,
    shifts: Sequence[float] = DEFAULT_SHIFTS,
    batch_size: int = 16,
    where: str = "calibration samples",
) -> dict:
    """Best background offset for `labeler` on `samples` (with images) whose class ids are `vocab`'s.

    `base_offset` is the offset already inside the labeler's score maps (DenseLabeler.background_offset).
    Returns `background_offset` (= base + best shift), its `mIoU`, the whole `curve` of
    (offset, mIoU) pairs, `n_images` and `truth` (= `where`). Ties go to the smallest shift.
    """
    bg = vocab.background
    if bg is None:
        raise ValueError(f"{where}: the vocabulary has no background class, so there is no offset to calibrate")
    if not shifts:
        raise ValueError("no background offsets to try")
    k = len(vocab)
    matrices = [ConfusionMatrix(k) for _ in shifts]
    n = 0
    for batch in batches(samples, batch_size):
        for sample, score_map in zip(batch, labeler.score_maps([s.image for s in batch]), strict=True):
            for shift, matrix in zip(shifts, matrices, strict=True):
                shifted = score_map.clone()
                shifted[bg] += shift
                matrix.update(sample.truth, labeler.finalize(shifted, sample.truth.shape).labels)
        n += len(batch)
        logger.info("calibration: %s scored at %s", counted(n, "image"), counted(len(shifts), "offset"))
    if n == 0:
        raise ValueError(f"{where}: no calibration samples with ground truth")
    mious = np.array([m.miou() for m in matrices])
    order = np.lexsort((np.abs(np.asarray(shifts)), -np.nan_to_num(mious, nan=-1.0)))
    best = int(order[0])
    if len(shifts) > 1 and shifts[best] in (min(shifts), max(shifts)):
        logger.warning("the best background offset lies at the edge of the searched range: widen the range")
    return {
        "background_offset": round(base_offset + shifts[best], 6),
        "mIoU": float(mious[best]),
        "curve": [(round(base_offset + s, 6), float(v)) for s, v in zip(shifts, mious, strict=True)],
        "n_images": n,
        "truth": where,
    }
