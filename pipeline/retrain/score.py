"""The publishing gate: a model's mIoU on the held-out truth, through the labeler the label job would build.

The current version and the candidate are scored by the same code as `clipdense eval --head`
(`pipeline.eval.evaluate.evaluate_labelers`), on the same truth, in the same step, so the comparison
never mixes scores from different truth sets or code versions.
"""

from __future__ import annotations

import dataclasses
import logging

from pipeline.config import HeadCfg, ModelCfg, RunCfg, VocabCfg
from pipeline.eval.truth import TruthSet

logger = logging.getLogger(__name__)


def labeler_cfg(run: RunCfg, model_folder: str | None) -> RunCfg:
    """The labeling run's config scoring `model_folder` (an exported model), or the run's own model
    when None. An exported model brings its head, templates and settings in its meta.json, so the head
    goes back to the default (which defers to meta.json). The truth's classes replace the run's."""
    vocab = VocabCfg(background=run.vocab.background)
    cfg = dataclasses.replace(run, vocab=vocab, input=[], output="")
    if model_folder is None:
        return cfg
    model = ModelCfg(name=model_folder, precision=run.model.precision, device=run.model.device)
    return dataclasses.replace(cfg, model=model, head=HeadCfg())


def score(cfg: RunCfg, truth: TruthSet, batch_size: int, storage_options: dict | None = None) -> float:
    """mIoU (0-1) of the labeler built from `cfg` on every sample of `truth`."""
    from pipeline.eval.evaluate import evaluate_labelers
    from pipeline.stages.infer import DenseLabeler
    from pipeline.stages.zoom import ZoomLabeler

    labeler = ZoomLabeler(DenseLabeler(cfg, truth.vocab, storage_options), cfg.zoom)
    report = evaluate_labelers(truth, labeler, batch_size=batch_size)
    logger.info("%s: mIoU %.4f on %d images of %s", cfg.model.name, report["mIoU"], report["n_images"], truth.url)
    return float(report["mIoU"])
