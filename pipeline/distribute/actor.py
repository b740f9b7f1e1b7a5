"""The worker held by each Ray actor: a model built once from the config, then shard after shard.

The class itself holds no Ray code; the driver turns it into an actor (`ray.remote(LabelActor)`)
with the resources of the config, so the same object also runs in-process. Only the config and the
vocabulary travel from the driver: the model is built here, on the actor's own device.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from typing import Any

import numpy as np

from pipeline import schema
from pipeline.config import RunCfg
from pipeline.obs import setup_logging
from pipeline.vocab import Vocabulary

logger = logging.getLogger(__name__)


class LabelActor:
    """Builds the dense labeler for `cfg` and labels whole shards into `cfg.output`."""

    def __init__(self, cfg: RunCfg, vocab: Vocabulary) -> None:
        # Imported here, in the actor's process: the driver never loads torch or a model.
        from pipeline.stages.shard import ShardLabeler

        setup_logging()
        self.worker = ShardLabeler(cfg, vocab)

    def describe(self) -> dict[str, Any]:
        """Where this worker runs and what it labels with: the head (the model's own when the config names
        none), the run's `_run/vocabulary.json` extras.
        `torch_threads` is its CPU thread pool: Ray sets an actor's OMP_NUM_THREADS to its CPUs unless
        the driver's environment sets it."""
        import torch

        from pipeline.models.precision import describe_precision

        dense = self.worker.dense
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "device": str(dense.device),
            "head": dense.head_name,
            "precision": describe_precision(dense.cfg.model.precision, dense.device, dense.backbone.dtype),
            "torch_threads": torch.get_num_threads(),
            "templates": list(dense.templates),
            "text_embedding_sha256": text_checksum(dense.text_embeddings),
        }

    def label(self, url: str, attempt: int = 1) -> dict[str, Any]:
        """Label and commit the shard at `url` (`attempt` 1 = first try); returns its commit marker.

        A failure whose message names a shard or member that is not UTF-8 (surrogate escapes) is
        raised again with those bytes as `\\xNN`: Ray sends messages as UTF-8, and such a message
        would otherwise kill the worker instead of failing the shard."""
        try:
            return self.worker(url, attempt)
        except Exception as exc:
            text = str(exc)
            if text != schema.text_column(text):
                raise type(exc)(schema.text_column(text)) from None
            raise


def text_checksum(embeddings: Any) -> str:
    """sha256 of the text embeddings rounded to 4 decimals, so the same weights on another device or
    kernel give the same checksum while other weights or prompts do not."""
    array = np.asarray(embeddings.detach().float().cpu().numpy() if hasattr(embeddings, "detach") else embeddings)
    return hashlib.sha256(np.round(array.astype(np.float64), 4).tobytes()).hexdigest()
