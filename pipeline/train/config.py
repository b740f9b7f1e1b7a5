"""Config of the fine-tuning job (`clipdense finetune`): YAML plus dotted overrides, like `RunCfg`.

Only `labels` (labeling-run outputs) and `output` are required. The model defaults to the first
labeling run's own CLIP (its `_run/config.yaml`), the schedule and the DenseCLIP options to the
official DenseCLIP recipe (AdamW lr 1e-4, wd 1e-4, image encoder lr x0.1, poly 0.9 decay, linear
warm-up, context decoder 3 x 256, auxiliary loss 0.4 at tau 0.07), scaled down where a default must
fit a CPU (steps, batch, warm-up, FPN width).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import ModelCfg, StudentCfg, to_dict
from pipeline.outputs import canonical_model, local_path

logger = logging.getLogger(__name__)

# Keys that change how a run executes but never what it computes: a resume may differ in them.
EXECUTION_KEYS = ("output", "storage_options", "log_every", "checkpoint_every", "eval")
COMBINE = ("each", "agree")  # data.combine


@dataclass(frozen=True, slots=True)
class DataCfg:
    crop: int = 0  # training crop side in pixels; 0 = the model's input size
    short_side: int = 0  # images are resized so their short side is this x a random scale; 0 = crop
    scale: list[float] = field(default_factory=lambda: [0.5, 2.0])  # random scale range
    flip: bool = True  # random horizontal flip
    jitter: float = 0.2  # brightness/contrast/saturation jitter strength; 0 = off
    shuffle_buffer: int = 256  # samples held for shuffling
    loader_workers: int = 1  # processes decoding and augmenting beside training; 0 = in the training process
    conf_threshold: float = 0.0  # pixels whose pseudo-label confidence (conf.png) is below are ignored
    conf_weight: bool = False  # weight each pixel's loss by its pseudo-label confidence
    # Several label runs: each = every run's labels, each input sample once per run; agree = each
    # input sample once, pixels the runs label differently ignored (a second round: the student's
    # labels and its teacher's), its confidence the lowest of theirs.
    combine: str = "each"


@dataclass(frozen=True, slots=True)
class OptimCfg:
    steps: int = 2000  # optimiser steps (the schedule is fixed in steps)
    batch_size: int = 8  # images per step over all workers
    lr: float = 1e-4  # peak AdamW learning rate
    weight_decay: float = 1e-4
    backbone_lr_mult: float = 0.1  # learning-rate multiplier of the image encoder
    warmup: int = 100  # linear warm-up steps from ~0
    power: float = 0.9  # poly decay exponent
    min_lr: float = 1e-6  # lr at the last step
    aux_weight: float = 0.4  # weight of the auxiliary score-map loss
    grad_clip: float = 0.0  # > 0: clip the gradient norm


@dataclass(frozen=True, slots=True)
class EvalCfg:
    truth: str = ""  # ShapeWorld shards or a VOC folder; "" = no evaluation
    every: int = 0  # steps between evaluations (0 = only at the end)
    max_images: int = 0  # evaluate on at most this many truth images; 0 = all


@dataclass(frozen=True, slots=True)
class TrainDistributeCfg:
    num_workers: int = 0  # 0 = train in this process; N = Ray Train with N workers (DDP)
    address: str = ""  # Ray address to join; "" = an embedded local Ray instance
    use_gpu: bool = False  # one GPU per Ray Train worker (nccl), else CPU (gloo)
    cpus_per_worker: float = 1.0


@dataclass(frozen=True, slots=True)
class FinetuneCfg:
    labels: list[str] = field(default_factory=list)  # labeling-run outputs (any fsspec URL), same vocabulary
    output: str = ""  # checkpoints, metrics, the exported model
    storage_options: dict[str, Any] = field(default_factory=dict)
    model: ModelCfg = field(default_factory=lambda: ModelCfg(name=""))  # name "" = the labeling run's model
    student: StudentCfg = field(default_factory=StudentCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    distribute: TrainDistributeCfg = field(default_factory=TrainDistributeCfg)
    seed: int = 0  # model init, data order and augmentation
    # when the model is an exported student (a second self-training round), its own parts (contexts,
    # context decoder, FPN) start from its weights, not afresh; its student options must equal `student`
    warm_start: bool = True
    checkpoint_every: int = 200  # steps between checkpoints (and always at the end)
    log_every: int = 20  # steps between progress lines


def check(cfg: FinetuneCfg, warn: bool = True) -> None:
    """ValueError naming the key when a value cannot work; a warning when one works against another,
    unless `warn` is False (a caller checking early whose fine-tune checks, and warns, again when it starts)."""
    if not cfg.labels:
        raise ValueError("labels is empty: name at least one labeling run's output")
    if not cfg.output:
        raise ValueError("output is empty: name a folder for checkpoints and the exported model")
    o = cfg.optim
    if o.steps < 1 or o.batch_size < 1 or o.lr <= 0 or o.warmup < 0:
        raise ValueError("optim.steps, optim.batch_size and optim.lr must be positive, optim.warmup >= 0")
    if warn and o.warmup >= o.steps:
        logger.warning(
            "optim.warmup (%d) is not shorter than optim.steps (%d): the learning rate never reaches optim.lr",
            o.warmup,
            o.steps,
        )
    if len(cfg.data.scale) != 2 or not 0 < cfg.data.scale[0] <= cfg.data.scale[1]:
        raise ValueError(f"data.scale must be [low, high] with 0 < low <= high, got {cfg.data.scale}")
    if cfg.checkpoint_every < 1 or cfg.log_every < 1:
        raise ValueError("checkpoint_every and log_every must be positive")
    if cfg.data.combine not in COMBINE:
        raise ValueError(f"data.combine must be one of {', '.join(COMBINE)}, got {cfg.data.combine!r}")
    if cfg.data.combine == "agree" and len(cfg.labels) < 2:
        raise ValueError("data.combine=agree needs two or more labeling runs in labels")
    workers = max(1, cfg.distribute.num_workers)
    if o.batch_size % workers:
        raise ValueError(f"optim.batch_size {o.batch_size} is not divisible by distribute.num_workers {workers}")


def canonical_finetune_config(cfg: FinetuneCfg) -> FinetuneCfg:
    """`cfg` with its local paths absolute (`pipeline.outputs.local_path`), taken from the current folder.

    Ray Train workers run in folders of their own, so a relative path would name another place there
    (or nothing); made absolute here, in the driver, every worker reads and writes where it was meant.
    `labels`, `output` and `eval.truth` are paths; `model.name` and `model.pretrained` change only when
    they name an existing local file or folder (otherwise they are an architecture or a tag).
    """
    return dataclasses.replace(
        cfg,
        labels=[local_path(url) for url in cfg.labels],
        output=local_path(cfg.output),
        model=canonical_model(cfg.model),
        eval=dataclasses.replace(cfg.eval, truth=local_path(cfg.eval.truth)),
    )


def finetune_hash(cfg: FinetuneCfg) -> str:
    """Hash of everything that decides the trained weights (a resume must match it)."""
    data = {k: v for k, v in to_dict(cfg).items() if k not in EXECUTION_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
