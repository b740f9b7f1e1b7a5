"""The fine-tuning job (`clipdense finetune`): a DenseCLIP student trained on pseudo-label shards.

`finetune(cfg)` is the entry point (see `pipeline.train.job`); `FinetuneCfg` its config. `finetune` is
imported on first use, so reading a config (`clipdense config show`) does not load torch.
"""

from __future__ import annotations

from typing import Any

from pipeline.train.config import FinetuneCfg

__all__ = ["FinetuneCfg", "finetune"]


def __getattr__(name: str) -> Any:
    if name == "finetune":
        from pipeline.train.job import finetune

        return finetune
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
