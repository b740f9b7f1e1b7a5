"""Quick quality checks of a ShapeWorld CLIP during and after training, made with the engine's own parts.

- Zero-shot: `pipeline.eval.zeroshot` (single objects of its own held-out seed namespace, 36-way over
  the class prompts; colour and shape accuracies from the same predictions).
- Dense: the engine's labeler (`DenseLabeler`) with its `maskclip` head (MaskCLIP's value path,
  Zhou et al., ECCV'22, with the residual and MLP of its released code, or without them), so the
  trainer measures exactly what labeling runs; mIoU by `pipeline.eval.metrics.ConfusionMatrix`.
- Calibration: `pipeline.eval.calibrate` picks the background offset with the best mIoU on its own
  seed streams, never the evaluation streams, under the inference settings the model will ship with.

`clipdense eval` runs the same parts on written shards.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from jobs.pretrain_shapes_data import TEMPLATE
from pipeline.config import HeadCfg, InferCfg, PromptCfg, RunCfg, VocabCfg
from pipeline.data.shapeworld import BACKGROUND, CLASSES, Scene, render_scene
from pipeline.eval.calibrate import best_background_offset
from pipeline.eval.metrics import ConfusionMatrix
from pipeline.eval.truth import TruthSample
from pipeline.eval.zeroshot import zero_shot_accuracy
from pipeline.models.backbone import Backbone
from pipeline.stages.infer import DenseLabeler
from pipeline.vocab import Vocabulary

DENSE_STREAM, SMALL_STREAM, CALIBRATION_STREAM = 21, 22, 30
OFFSETS = tuple(np.round(np.arange(-1.0, 1.0001, 0.01), 2).tolist())  # background offsets tried (cosine units)
VOCAB = Vocabulary.from_entries(list(CLASSES), BACKGROUND)
_BATCH = 100  # images per labeler call

# Inference settings the model recommends in its meta.json (the engine uses them where a run leaves
# `infer.shifts` / `infer.pamr_steps` unset): sub-patch shifts and PAMR mend the 8x8 grid's coarse
# edges. On the shipped shapes-clip they raised `maskclip` mIoU from 0.18 to 0.32 (README, quality table).
RECOMMENDED_INFER = {"shifts": 2, "pamr_steps": 10}
SINGLE_PASS = {"shifts": 1, "pamr_steps": 0}
# Metric-name suffix -> (inference settings, residual and MLP of the last block kept); "" is what ships.
VARIANTS = {"": (RECOMMENDED_INFER, True), "_single_pass": (SINGLE_PASS, True), "_value_only": (SINGLE_PASS, False)}


def dense_labeler(
    model: nn.Module,
    tokenizer: Callable,
    infer: dict = RECOMMENDED_INFER,
    residual_mlp: bool = True,
    background_offset: float = 0.0,
) -> DenseLabeler:
    """The engine's labeler around the model being trained: `maskclip` head (`residual_mlp` sets its
    `residual` and `mlp` options), the training prompt, the `infer` settings (`shifts`, `pamr_steps`)."""
    cfg = RunCfg(
        head=HeadCfg("maskclip", {"residual": residual_mlp, "mlp": residual_mlp}),
        prompts=PromptCfg(templates="single"),  # TEMPLATE, as in the training captions
        vocab=VocabCfg(background_offset=background_offset),
        infer=InferCfg(batch_size=_BATCH, **infer),
    )
    return DenseLabeler(cfg, VOCAB, backbone=_backbone(model, tokenizer))


def scenes(size: int, seed: int, stream: int, n: int, small_objects: bool = False) -> list[TruthSample]:
    """`n` held-out scenes of one seed stream as truth samples (image and class map)."""
    return [_sample(render_scene((seed, stream, i), size, small_objects), i) for i in range(n)]


def dense_miou(labeler: DenseLabeler, samples: list[TruthSample]) -> float:
    """mIoU of the labeler's label maps over `samples`."""
    confusion = ConfusionMatrix(len(VOCAB))
    for start in range(0, len(samples), _BATCH):
        batch = samples[start : start + _BATCH]
        for sample, result in zip(batch, labeler([s.image for s in batch]), strict=True):
            confusion.update(sample.truth, result.labels)
    return confusion.miou()


def calibrate_background(
    model: nn.Module,
    tokenizer: Callable,
    size: int,
    seed: int,
    infer: dict = RECOMMENDED_INFER,
    residual_mlp: bool = True,
    n: int = 200,
) -> float:
    """The background offset (cosine units) with the best mIoU on the calibration streams (half with small objects)."""
    samples = scenes(size, seed, CALIBRATION_STREAM, n // 2) + scenes(size, seed, CALIBRATION_STREAM + 1, n // 2, True)
    labeler = dense_labeler(model, tokenizer, infer, residual_mlp)
    where = f"ShapeWorld calibration streams {CALIBRATION_STREAM}-{CALIBRATION_STREAM + 1}"
    return best_background_offset(labeler, samples, VOCAB, 0.0, OFFSETS, _BATCH, where)["background_offset"]


@torch.inference_mode()
def evaluate(
    model: nn.Module, tokenizer: Callable, size: int, seed: int, n: int = 500, calibration_n: int = 200
) -> dict:
    """Calibrated background offsets, zero-shot accuracies and dense mIoU on the evaluation streams.

    Dense mIoU is measured for each of `VARIANTS` (`dense_miou`: the recommended settings with the
    engine's default head, as shipped; `_single_pass`: one pass, no PAMR; `_value_only`: one pass with
    the last block's residual and MLP dropped), on plain scenes and on scenes with small objects, each
    variant with its own calibrated offset.
    """
    metrics: dict[str, float] = {}
    evaluation = {"": scenes(size, seed, DENSE_STREAM, n), "_small_objects": scenes(size, seed, SMALL_STREAM, n, True)}
    for variant, (infer, residual_mlp) in VARIANTS.items():
        offset = calibrate_background(model, tokenizer, size, seed, infer, residual_mlp, calibration_n)
        metrics[f"background_offset{variant}"] = offset
        labeler = dense_labeler(model, tokenizer, infer, residual_mlp, offset)
        for kind, samples in evaluation.items():
            metrics[f"dense_miou{variant}{kind}"] = dense_miou(labeler, samples)
    zero_shot = zero_shot_accuracy(_backbone(model, tokenizer), (TEMPLATE,), max(n, 360))
    metrics |= {"zero_shot_accuracy": zero_shot["accuracy"]} | {
        k: zero_shot[k] for k in ("colour_accuracy", "shape_accuracy")
    }
    return {k: round(v, 4) for k, v in metrics.items()}


def _backbone(model: nn.Module, tokenizer: Callable) -> Backbone:
    return Backbone(model, tokenizer, "shapes-clip (training)", "", _device(model), _dtype(model))


def _sample(scene: Scene, i: int) -> TruthSample:
    return TruthSample(shard="", key=f"{i:06d}", truth=scene.seg, image=scene.image)


def _dtype(model: nn.Module) -> torch.dtype:
    return model.visual.conv1.weight.dtype


def _device(model: nn.Module) -> torch.device:
    return model.visual.conv1.weight.device
