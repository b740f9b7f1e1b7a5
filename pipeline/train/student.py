"""The student under training: built around the teacher's CLIP, its optimiser groups and its loss.

Loss (DenseCLIP's, on pseudo-labels): cross-entropy of the FPN's pixel logits (cosine similarity times
the learned `logit_scale`, upsampled bilinearly to the label size) plus `aux_weight` x cross-entropy of
the pixel-text score map divided by tau (also upsampled to the label size). Ignore pixels (255 / 65535)
never reach either term. Options: pixels whose pseudo-label confidence is below `data.conf_threshold`
are ignored too; `data.conf_weight` weights each pixel's main loss by its confidence (MaskCLIP+ has
neither by default; both are measured in the README).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.config import ModelCfg
from pipeline.models.backbone import Backbone, load_backbone
from pipeline.models.heads.denseclip import HEAD_NAME as DENSECLIP_HEAD
from pipeline.models.student import DenseCLIP, exported_options, load_student_state, read_student_state
from pipeline.train.config import DataCfg, FinetuneCfg

_MAX_LOGIT_SCALE = math.log(100)
# Student options a warm start may change: they set initial values (which the loaded weights replace)
# or regularise training; every other option decides what the weights mean.
_INIT_OR_TRAINING = ("context_init", "gamma_init", "dropout")


def build(cfg: FinetuneCfg) -> tuple[DenseCLIP, Backbone]:
    """The fp32 student (train mode) around the teacher's CLIP, its own parts initialised from `cfg.seed`,
    or, when `continues_student` says so, from the teacher's own student weights.

    Raises ValueError as `continues_student` does."""
    backbone = load_backbone(dataclasses.replace(cfg.model, precision="fp32"), cfg.storage_options or None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = DenseCLIP(backbone.model, backbone.tokenizer, cfg.student)
    if continues_student(cfg, backbone.meta):
        load_student_state(model, read_student_state(backbone.folder, backbone.storage_options))
    return model.train(), backbone


def continues_student(cfg: FinetuneCfg, meta: dict[str, Any]) -> bool:
    """True when the fine-tune starts its student's own parts from the teacher's: `cfg.warm_start` and a
    teacher that is an exported student (`meta`: its meta.json, `model_meta`). An option such a student
    was exported without has its default (older exports).

    Raises ValueError naming each option that differs from the student's and changes what its weights
    mean (all but `_INIT_OR_TRAINING`)."""
    if not cfg.warm_start or meta.get("head") != DENSECLIP_HEAD:
        return False
    trained = dataclasses.asdict(exported_options(meta, cfg.model.name))
    differ = [
        f"student.{k}={trained[k]!r} there, {v!r} here"
        for k, v in dataclasses.asdict(cfg.student).items()
        if k not in _INIT_OR_TRAINING and trained[k] != v
    ]
    if differ:
        raise ValueError(
            f"model {cfg.model.name} is a student with other options ({'; '.join(differ)}): set the same "
            "student options to continue it, or warm_start=false to start its own parts afresh"
        )
    return True


def teacher_model(run_model: ModelCfg, wanted: ModelCfg) -> ModelCfg:
    """The model a fine-tune starts from: `wanted` when it names one, else the labeling run's (name and weights)."""
    if wanted.name:
        return wanted
    return dataclasses.replace(wanted, name=run_model.name, pretrained=run_model.pretrained)


def trainable_groups(model: DenseCLIP, weight_decay: float, backbone_lr_mult: float) -> list[dict]:
    """AdamW groups as DenseCLIP's mmcv `custom_keys` resolve them (METHODS.md corrections): the image
    encoder at lr x `backbone_lr_mult` with weight decay (CLIP's `ln_*` norms included), the context
    decoder's norms without decay, everything else (contexts, gamma, FPN) at lr x1 with decay."""
    norms = {
        id(p) for m in model.context_decoder.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()
    }
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            mult = backbone_lr_mult if name.startswith("clip.visual.") else 1.0
            groups.setdefault((mult, 0.0 if id(p) in norms else weight_decay), []).append(p)
    return [{"params": ps, "lr_mult": mult, "weight_decay": wd} for (mult, wd), ps in sorted(groups.items())]


def loss(
    scores: torch.Tensor,
    aux: torch.Tensor,
    logit_scale: torch.Tensor,
    labels: torch.Tensor,
    conf: torch.Tensor,
    data: DataCfg,
    aux_weight: float,
    tau: float,
    ignore: int,
) -> torch.Tensor:
    """Scalar training loss. scores (B, K, h, w) and aux (B, K, h', w') cosine float32; labels (B, H, W)
    int64 with `ignore`; conf (B, H, W) uint8 confidences (255 = 1.0)."""
    size = labels.shape[-2:]
    target = labels
    if data.conf_threshold > 0:
        target = torch.where(conf.float() < data.conf_threshold * 255, ignore, labels)
    scale = logit_scale.float().clamp(max=_MAX_LOGIT_SCALE).exp()
    logits = F.interpolate(scores, size=size, mode="bilinear", align_corners=False) * scale
    valid = target != ignore
    per_pixel = F.cross_entropy(logits, target, ignore_index=ignore, reduction="none")
    weight = (conf.float() / 255) * valid if data.conf_weight else valid.float()
    main = (per_pixel * weight).sum() / weight.sum().clamp_min(1e-6)
    aux_logits = F.interpolate(aux, size=size, mode="bilinear", align_corners=False) / tau
    aux_loss = F.cross_entropy(aux_logits, target, ignore_index=ignore) if valid.any() else aux_logits.sum() * 0
    return main + aux_weight * aux_loss
