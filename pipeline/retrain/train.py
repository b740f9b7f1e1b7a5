"""The fine-tune a retraining step runs: `pipeline.train.finetune` (the `clipdense finetune` job) in-process.

The step decides what to train on, where from and where to; the retrain config's `finetune:` section
carries every other fine-tune setting. The same output folder and an equal config resume the
fine-tune from its last checkpoint (the fine-tune job's contract), which is what makes a rerun of a
killed step continue instead of starting over. `stop` (the step's lease check) ends the fine-tune
before its next write once another step took the lease.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.config import ModelCfg, from_dict
from pipeline.retrain.step import Trainer


def finetune_trainer(settings: dict[str, Any]) -> Trainer:
    """A Trainer running `pipeline.train.finetune` with `settings` (FinetuneCfg keys) plus the step's
    labels, start model and output. From a published version the fine-tune loads the version's CLIP
    weights (its model folder) and continues its student (`warm_start`, unless `settings` turn it off)."""

    def train(
        start: ModelCfg, runs: list[str], output: str, storage_options: dict | None, stop: Callable[[], bool]
    ) -> dict:
        from pipeline.train import FinetuneCfg, finetune

        model = {**settings.get("model", {}), "name": start.name, "pretrained": start.pretrained}
        data = {**settings, "labels": runs, "output": output, "model": model}
        if storage_options:
            data["storage_options"] = dict(storage_options)
        return finetune(from_dict(FinetuneCfg, data), stop)

    return train
