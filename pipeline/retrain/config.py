"""Config of `clipdense retrain`: where label runs land, where model versions go, the gate, the fine-tune.

Loaded like every job's config (`pipeline.config.load_config(path, overrides, cls=RetrainCfg)`): YAML,
then dotted `k=v` overrides, unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.config import from_dict
from pipeline.eval import counted
from pipeline.outputs import local_path

if TYPE_CHECKING:
    from pipeline.train.config import FinetuneCfg


@dataclass(frozen=True, slots=True)
class RetrainCfg:
    labels: list[str] = field(default_factory=list)  # labeling run outputs, or prefixes whose sub-folders are runs
    models: str = ""  # where versions are published: vNNNN/, latest.json, records/, _steps/
    truth: list[str] = field(default_factory=list)  # held-out shards with seg.png (+ vocabulary.json): the gate
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for all of the above
    finetune: dict[str, Any] = field(default_factory=dict)  # `clipdense finetune` keys but those the step sets
    min_gain: float = 0.0  # publish only when the candidate's mIoU beats the live version's by more than this
    gate_first: bool = False  # true: the first version must also beat the labeler's own CLIP to be published
    lease_seconds: float = 300.0  # a step that stops renewing its lease this long is taken to be dead
    eval_batch_size: int = 16  # truth images per forward batch when scoring


# Keys that change how a step runs but not what it produces: they are not part of its key.
EXECUTION_KEYS = ("storage_options", "lease_seconds", "eval_batch_size")


def check(cfg: RetrainCfg) -> None:
    """Raise ValueError naming the key when a required key is missing, a value is out of range (the
    fine-tune's values too, as `clipdense finetune` checks them) or a fine-tune key is one the step sets;
    ConfigError for an unknown or mistyped fine-tune key."""
    if not cfg.labels:
        raise ValueError("retrain config: `labels` (labeling run outputs or a prefix holding them) is required")
    if not cfg.models:
        raise ValueError("retrain config: `models` (where versions are published) is required")
    if not cfg.truth:
        raise ValueError("retrain config: `truth` (held-out shards that gate publishing) is required")
    if cfg.lease_seconds <= 0:
        raise ValueError(f"retrain config: lease_seconds must be positive, got {cfg.lease_seconds}")
    # The step trains on the listed runs into its own folder, from the live version (or the labeler's
    # model for the first); the model's other keys (device, precision) stay the config's to choose.
    model = cfg.finetune.get("model")
    set_by_step = [key for key in ("labels", "output") if key in cfg.finetune]
    set_by_step += [f"model.{key}" for key in ("name", "pretrained") if isinstance(model, dict) and key in model]
    if set_by_step:
        raise ValueError(f"retrain config: finetune.{set_by_step[0]} is set by the step; remove it")
    # A mistyped fine-tune key or a value that cannot work fails here, before any listing, lease or
    # training, naming the key. Two placeholder runs, as data.combine=agree needs two and the step's
    # runs are known only once listed (`check_runs` checks them then).
    finetune = _finetune_cfg(cfg, ["-", "-"])
    try:
        _check_finetune(finetune)
    except ValueError as exc:
        raise ValueError(f"retrain config: finetune: {exc}") from exc


def check_runs(cfg: RetrainCfg, runs: list[str]) -> None:
    """Raise ValueError naming `labels` and the listed `runs` when the fine-tune cannot train on them
    (data.combine=agree and one run): the step asks right after listing, as the fine-tune would find
    it only once the step holds the lease."""
    try:
        _check_finetune(_finetune_cfg(cfg, runs))
    except ValueError as exc:
        listed = f"{counted(len(runs), 'labeling run')} listed ({', '.join(runs)})"
        raise ValueError(f"labels: {listed}, but finetune: {exc}") from exc


def _finetune_cfg(cfg: RetrainCfg, runs: list[str]) -> FinetuneCfg:
    """The fine-tune's config the step would run on `runs` (its output a placeholder)."""
    from pipeline.train.config import FinetuneCfg  # dataclasses only: no torch

    return from_dict(FinetuneCfg, {**cfg.finetune, "labels": runs, "output": "-"}, "finetune")


def _check_finetune(finetune: FinetuneCfg) -> None:
    """`clipdense finetune`'s check of `finetune`, without its warnings: the fine-tune warns when it starts."""
    from pipeline.train.config import check

    check(finetune, warn=False)


def canonical_retrain_config(cfg: RetrainCfg) -> RetrainCfg:
    """`cfg` with its local `labels`, `models` and `truth` absolute and normalised
    (`pipeline.outputs.local_path`), taken from the current folder; other stores' URLs as written.

    The lease check goes to Ray Train's rank 0, which runs in a folder of its own: a relative `models`
    lists as empty there, and the step would take its lease for lost. Made absolute here, in the driver,
    `labels`, `./labels/` and the absolute path are also one watermark and one key.
    """
    return dataclasses.replace(
        cfg,
        labels=[local_path(url) for url in cfg.labels],
        models=local_path(cfg.models),
        truth=[local_path(url) for url in cfg.truth],
    )
