"""Quick quality checks of a ShapeWorld CLIP: zero-shot accuracy, MaskCLIP dense mIoU, background calibration.

- Zero-shot: single-object images (held-out seeds), 36-way over "a photo of a {colour shape}." prompts;
  colour and shape accuracies are read off the same predictions.
- Dense: the engine's own labeler (`DenseLabeler`) with its `maskclip` head (MaskCLIP's value path,
  Zhou et al., ECCV'22, with the residual and MLP of its released code, or without them), so the
  trainer measures and calibrates exactly what labeling runs. Score maps against the 37 class prompts
  get `background_offset` on the background class, and the argmax is scored with
  `pipeline.eval.metrics.ConfusionMatrix` (mIoU over classes present in truth or prediction).
- Calibration: the background offset that maximises mIoU on its own seed stream, never the
  evaluation streams, under the inference settings it will ship with.

This is the trainer's own yardstick; `clipdense eval` runs the full engine on written shards.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from jobs.pretrain_shapes_data import TEMPLATE
from pipeline.config import HeadCfg, InferCfg, PromptCfg, RunCfg
from pipeline.data.shapeworld import BACKGROUND, CLASSES, render_scene, render_single
from pipeline.eval.metrics import ConfusionMatrix
from pipeline.models.backbone import Backbone
from pipeline.stages.infer import DenseLabeler
from pipeline.vocab import Vocabulary

ZERO_SHOT_STREAM, DENSE_STREAM, SMALL_STREAM, CALIBRATION_STREAM = 20, 21, 22, 30
MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
OFFSETS = np.round(np.arange(-1.0, 1.0001, 0.01), 2)  # background offsets (cosine units) tried by the calibration

# Inference settings the model recommends in its meta.json (the engine uses them where a run leaves
# `infer.shifts` / `infer.pamr_steps` unset): sub-patch shifts and PAMR mend the 8x8 grid's coarse
# edges. On the shipped shapes-clip they raised `maskclip` mIoU from 0.18 to 0.31 (README, quality table).
RECOMMENDED_INFER = {"shifts": 2, "pamr_steps": 10}
SINGLE_PASS = {"shifts": 1, "pamr_steps": 0}
# Metric-name suffix -> (inference settings, residual and MLP of the last block kept); "" is what ships.
VARIANTS = {"": (RECOMMENDED_INFER, True), "_single_pass": (SINGLE_PASS, True), "_value_only": (SINGLE_PASS, False)}


def to_input(images: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, S, S, 3) uint8 RGB -> (B, 3, S, S) normalised with CLIP's mean and std."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return ((x - MEAN) / STD).to(dtype)


@torch.inference_mode()
def class_embeddings(model: nn.Module, tokenizer: Callable, names: list[str]) -> torch.Tensor:
    """(K, E) float32 L2-normalised text embeddings of TEMPLATE.format(name)."""
    return F.normalize(model.encode_text(tokenizer([TEMPLATE.format(n) for n in names])).float(), dim=-1)


@torch.inference_mode()
def zero_shot(model: nn.Module, tokenizer: Callable, size: int, seed: int, n: int = 1000) -> dict[str, float]:
    """Accuracy of the 36-way colour+shape prediction on `n` single objects, plus colour-only and shape-only."""
    text = class_embeddings(model, tokenizer, list(CLASSES[1:]))
    scenes = [render_single((seed, ZERO_SHOT_STREAM, i), size) for i in range(n)]
    truth = np.array([s.objects[0].class_id for s in scenes]) - 1
    preds = []
    for start in range(0, n, 250):
        images = np.stack([s.image for s in scenes[start : start + 250]])
        feats = model.encode_image(to_input(images, _dtype(model)).to(_device(model)))
        preds.append((F.normalize(feats.float(), dim=-1) @ text.T).argmax(dim=1).cpu().numpy())
    pred = np.concatenate(preds)
    return {
        "zero_shot_accuracy": float((pred == truth).mean()),
        "colour_accuracy": float((pred // 6 == truth // 6).mean()),
        "shape_accuracy": float((pred % 6 == truth % 6).mean()),
    }


def dense_scores(
    model: nn.Module,
    tokenizer: Callable,
    size: int,
    seed: int,
    stream: int,
    n: int,
    small_objects: bool = False,
    infer: dict = RECOMMENDED_INFER,
    residual_mlp: bool = True,
) -> tuple[torch.Tensor, np.ndarray]:
    """Score maps (n, 37, S, S) float32 without any background offset, and truth maps (n, S, S) uint8.

    They come from the engine's `DenseLabeler` with the `maskclip` head (`residual_mlp` sets its
    `residual` and `mlp` options) and the `infer` settings (`shifts`, `pamr_steps`)."""
    backbone = Backbone(model, tokenizer, "shapes-clip (training)", "", _device(model), _dtype(model))
    head = HeadCfg("maskclip", {"residual": residual_mlp, "mlp": residual_mlp})
    cfg = RunCfg(head=head, prompts=PromptCfg(templates="single"), infer=InferCfg(batch_size=100, **infer))
    labeler = DenseLabeler(cfg, Vocabulary.from_entries(list(CLASSES), BACKGROUND), backbone=backbone)
    scenes = [render_scene((seed, stream, i), size, small_objects) for i in range(n)]
    scores = labeler.score_maps([s.image for s in scenes])
    return torch.stack(scores).cpu(), np.stack([s.seg for s in scenes])


def dense_miou(scores: torch.Tensor, truth: np.ndarray, offsets: list[float]) -> list[float]:
    """mIoU of argmax(scores + offset on the background class) against the truth maps, per offset."""
    best, arg = scores[:, 1:].max(dim=1)  # ShapeWorld's background is class 0, objects are 1..36
    arg = arg.numpy() + 1
    margin = (scores[:, BACKGROUND] - best).numpy()
    out = []
    for offset in offsets:
        confusion = ConfusionMatrix(len(CLASSES))
        confusion.update(truth, np.where(margin + offset >= 0, BACKGROUND, arg))
        out.append(confusion.miou())
    return out


def calibrate_background(
    model: nn.Module,
    tokenizer: Callable,
    size: int,
    seed: int,
    infer: dict = RECOMMENDED_INFER,
    residual_mlp: bool = True,
    n: int = 200,
) -> float:
    """The background offset (cosine units) with the best mIoU on the calibration stream (half with small objects)."""
    half = [
        dense_scores(model, tokenizer, size, seed, CALIBRATION_STREAM + k, n // 2, k == 1, infer, residual_mlp)
        for k in (0, 1)
    ]
    scores, truth = torch.cat([h[0] for h in half]), np.concatenate([h[1] for h in half])
    results = dense_miou(scores, truth, [float(o) for o in OFFSETS])
    return float(OFFSETS[int(np.argmax(results))])


def evaluate(model: nn.Module, tokenizer: Callable, size: int, seed: int, n: int = 500) -> dict:
    """Calibrated background offsets, zero-shot accuracies and dense mIoU on the evaluation streams.

    Dense mIoU is measured for each of `VARIANTS` (`dense_miou`: the recommended settings with the
    engine's default head, as shipped; `_single_pass`: one pass, no PAMR; `_value_only`: one pass with
    the last block's residual and MLP dropped), on plain scenes and on scenes with small objects, each
    variant with its own calibrated offset.
    """
    metrics: dict[str, float] = {}
    for variant, (infer, residual_mlp) in VARIANTS.items():
        offset = calibrate_background(model, tokenizer, size, seed, infer, residual_mlp)
        metrics[f"background_offset{variant}"] = offset
        for scenes, stream, small in (("", DENSE_STREAM, False), ("_small_objects", SMALL_STREAM, True)):
            scores, truth = dense_scores(model, tokenizer, size, seed, stream, n, small, infer, residual_mlp)
            (metrics[f"dense_miou{variant}{scenes}"],) = dense_miou(scores, truth, [offset])
    metrics |= zero_shot(model, tokenizer, size, seed, n=max(n, 360))
    return {k: round(v, 4) for k, v in metrics.items()}


def _dtype(model: nn.Module) -> torch.dtype:
    return model.visual.conv1.weight.dtype


def _device(model: nn.Module) -> torch.device:
    return model.visual.conv1.weight.device
