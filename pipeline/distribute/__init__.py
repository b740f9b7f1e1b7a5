"""Distributed execution of the labeling job on Ray: the only package that imports `ray`.

`job.run_label_job(cfg)` is the entry point: it plans the shards, checks the output for a resume,
and runs `driver.run_pool`, which hands shards to `actor.LabelActor`s (one model each).
"""

from pipeline.distribute.driver import ModelStartError, StopRequest
from pipeline.distribute.job import run_label_job

__all__ = ["ModelStartError", "StopRequest", "run_label_job"]
