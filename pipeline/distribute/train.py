"""Ray Train wrapper of the fine-tuning job: N workers (`TorchTrainer`, DDP), gloo on CPU, nccl on GPU.

Every worker runs the same `train_worker(cfg, rank, world)` as an in-process run, after Ray Train has
set up the default torch.distributed process group; rank 0 writes checkpoints, metrics, the model and the
summary to the job's own output (Ray Train's checkpointing is not used: the output URL is the single
place a run resumes from). Needs the `ray[train]` extra.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from typing import Any

import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from pipeline.distribute.job import connect, disconnect

logger = logging.getLogger(__name__)


def run_train_workers(cfg: Any, worker: Callable[[Any, int, int], dict]) -> None:
    """Run `worker(cfg, rank, world)` on `cfg.distribute.num_workers` Ray Train workers; RuntimeError
    (naming the first worker error) when the run fails."""
    dist = cfg.distribute
    shutdown = connect(dist.address)
    try:
        # Ray Train keeps experiment state under storage_path; the run's own state is in cfg.output, so
        # this is scratch, removed with the run (a retrain pod runs many fine-tunes in one process).
        with tempfile.TemporaryDirectory(prefix="clipdense-train-") as scratch:
            trainer = TorchTrainer(
                lambda _config: worker(
                    cfg, ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
                ),
                scaling_config=ScalingConfig(
                    num_workers=dist.num_workers,
                    use_gpu=dist.use_gpu,
                    resources_per_worker={"CPU": dist.cpus_per_worker},
                ),
                torch_config=TorchConfig(backend="nccl" if dist.use_gpu else "gloo"),
                run_config=RunConfig(storage_path=scratch, name="finetune"),
            )
            try:
                result = trainer.fit()  # Ray Train v2 raises a worker's error; v1 returns it in result.error
                error = result.error
            except Exception as exc:  # any worker error, in Ray's own types
                error = exc
        if error is not None:
            message = str(error).strip()
            raise RuntimeError(
                f"fine-tune workers failed: {message.splitlines()[-1] if message else type(error).__name__}"
            ) from None
    finally:
        if shutdown:
            disconnect()  # also releases the reaper that `connect` started for the embedded instance
