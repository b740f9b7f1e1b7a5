"""Evaluation of an exported student with the engine's parts, the same path as `clipdense eval --head`."""

from __future__ import annotations

from pipeline.config import ModelCfg, RunCfg, ZoomCfg
from pipeline.eval.diagnostics import DEFAULT_TOP_K
from pipeline.eval.evaluate import evaluate_labelers
from pipeline.eval.truth import open_truth
from pipeline.stages.infer import DenseLabeler
from pipeline.stages.zoom import ZoomLabeler


def evaluate_folder(folder: str, truth_url: str, model: ModelCfg, storage_options: dict | None = None) -> dict:
    """The `pipeline.eval` report (`mIoU`, ...) of the model folder on a truth set (ShapeWorld shards or a
    VOC folder), with the default config otherwise, as `clipdense eval --head denseclip model.name=FOLDER
    --no-random-baseline` computes it."""
    truth = open_truth(truth_url, storage_options=storage_options)
    cfg = RunCfg(model=ModelCfg(name=folder, precision=model.precision, device=model.device))
    labeler = DenseLabeler(cfg, truth.vocab, storage_options)
    return evaluate_labelers(truth, ZoomLabeler(labeler, ZoomCfg()), {}, DEFAULT_TOP_K, cfg.infer.batch_size)
