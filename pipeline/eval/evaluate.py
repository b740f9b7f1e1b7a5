"""Score label maps against ground truth, streaming: one truth sample (or one batch) in memory at a time.

Two sources of predictions share one report layout:
- a labeling run's output (`evaluate_run_output`): its committed label maps, open-vocabulary scores;
- models run on the fly (`evaluate_labelers`): one forward pass per image and model, from which the
  open-vocabulary scores and the recognition/localisation diagnostics are all read.
Every report also scores the all-background map, the floor any useful model must clear.

Report layout (JSON): `truth`, `truth_kind`, `n_images`, `classes`, `background`, then the scores of
the evaluated predictions at the top level (`mIoU`, `per_class`, `confused_with`, `background_iou`,
`small_object_iou`, `small_object_pixel_iou`, `small_object_count`, `pixel_accuracy`, `ignored_fraction`,
`colour_mIoU`, `diagnostics`), and the same fields per baseline under `baselines`.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from pipeline.eval.diagnostics import DEFAULT_TOP_K, Finalize, ModelScores
from pipeline.eval.predictions import RunOutputPredictions
from pipeline.eval.truth import TruthSample, TruthSet

if TYPE_CHECKING:
    from pipeline.stages.infer import DenseResult

logger = logging.getLogger(__name__)

ALL_BACKGROUND = "all_background"
_LOG_EVERY = 500


class ScoreModel(Protocol):
    """What evaluation needs of a dense labeler (pipeline.stages.infer.DenseLabeler has it)."""

    def score_maps(self, images: list[np.ndarray]) -> list[torch.Tensor]: ...

    def finalize(self, score_map: torch.Tensor, size: tuple[int, int]) -> DenseResult: ...


def evaluate_run_output(truth: TruthSet, preds: RunOutputPredictions) -> dict:
    """Scores of a labeling run's committed label maps. A truth sample without a committed map counts as
    all-ignored (every pixel a miss), so a partial run scores what it delivered, not what it skipped."""
    if truth.kind != "shards":
        raise ValueError(f"a run output is matched to its input shards by name; {truth.url} is not a set of shards")
    vocab = truth.vocab
    preds.align_to(vocab)
    k = len(vocab)
    model = ModelScores(k, vocab.background)
    baseline = _AllBackground(k, vocab.background)
    n = missing = 0
    for sample in truth.samples(images=False):
        labels = preds.get(sample.shard, sample.key)
        if labels is None:
            missing += 1
            labels = np.full(sample.truth.shape, k, dtype=np.int64)  # k = not a class: a miss everywhere
        model.add_labels(sample, labels)
        baseline.add(sample)
        n += 1
        _progress(n)
    if n and missing == n:
        raise ValueError(f"{preds.url} has no label map for any sample of {truth.url}: was it labelled from them?")
    if missing:
        logger.warning(
            "truth samples without a committed label map in %s (scored as misses): %d of %d", preds.url, missing, n
        )
    report = _report(truth, n, model, baseline.scores)
    report["predictions"] = {"run_output": preds.url, "committed_shards": len(preds.committed), "missing": missing}
    return report


def evaluate_labelers(
    truth: TruthSet,
    model: ScoreModel,
    baselines: Mapping[str, ScoreModel] | None = None,
    top_k: int = DEFAULT_TOP_K,
    batch_size: int = 16,
) -> dict:
    """Scores of `model` (and of each baseline model, e.g. a random-init one) run on the truth images.

    Each image goes through each model once; the diagnostics reuse that image's score maps.
    """
    vocab = truth.vocab
    k = len(vocab)
    models = {"model": model, **(baselines or {})}
    scores = {name: ModelScores(k, vocab.background, top_k) for name in models}
    constant = _AllBackground(k, vocab.background)
    n = 0
    for batch in batches(truth.samples(images=True), batch_size):
        images = [sample.image for sample in batch]
        for name, labeler in models.items():
            for sample, score_map in zip(batch, labeler.score_maps(images), strict=True):
                scores[name].add_scores(sample, score_map, _label_fn(labeler))
        for sample in batch:
            constant.add(sample)
        n += len(batch)
        _progress(n, len(batch))
    other = {name: s for name, s in scores.items() if name != "model"}
    return _report(truth, n, scores["model"], {**constant.scores, **other})


def _label_fn(labeler: ScoreModel) -> Finalize:
    return lambda score_map, size: labeler.finalize(score_map, size).labels


class _AllBackground:
    """The all-background baseline (only when the vocabulary has a background class)."""

    def __init__(self, n_classes: int, background: int | None) -> None:
        self.background = background
        self.scores = {ALL_BACKGROUND: ModelScores(n_classes, background)} if background is not None else {}

    def add(self, sample: TruthSample) -> None:
        if self.scores:
            self.scores[ALL_BACKGROUND].add_labels(sample, np.full(sample.truth.shape, self.background, np.int64))


def _report(truth: TruthSet, n_images: int, model: ModelScores, baselines: Mapping[str, ModelScores]) -> dict:
    if n_images == 0:
        raise ValueError(f"{truth.url}: no samples with ground truth to evaluate")
    vocab = truth.vocab
    return {
        "truth": truth.url,
        "truth_kind": truth.kind,
        "n_images": n_images,
        "classes": vocab.display_names,
        "background": vocab.background,
        **model.summary(vocab),
        "baselines": {name: scores.summary(vocab) for name, scores in baselines.items()},
    }


def batches(samples: Iterable[TruthSample], size: int) -> Iterator[list[TruthSample]]:
    """Consecutive lists of `size` samples (the last one shorter)."""
    it = iter(samples)
    while batch := list(itertools.islice(it, size)):
        yield batch


def _progress(n: int, step: int = 1) -> None:
    if n // _LOG_EVERY != (n - step) // _LOG_EVERY:
        logger.info("evaluated %d images", n)
