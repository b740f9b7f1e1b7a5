"""Training checkpoints on any fsspec URL, written atomically.

`OUT/checkpoints/step-<step>.pt` holds a `torch.save` dict (model, optimiser, step, RNG states, data
position, and whatever else the trainer puts in); `OUT/checkpoints/latest.json` names the newest and is
written after it, so a run killed at any moment leaves the previous checkpoint intact and named.
Older checkpoints beyond `keep` are removed.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import torch

from pipeline.io import fs

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.json"


def save(output: str, step: int, state: dict[str, Any], storage_options: dict | None = None, keep: int = 2) -> str:
    """Write `state` as the checkpoint of `step`; returns its URL."""
    buf = io.BytesIO()
    torch.save(state, buf)
    name = f"step-{step:08d}.pt"
    url = fs.join(output, CHECKPOINT_DIR, name)
    fs.put_atomic(url, buf.getvalue(), storage_options)
    fs.put_json(fs.join(output, CHECKPOINT_DIR, LATEST), {"step": step, "file": name}, storage_options)
    filesystem, folder = fs.url_to_fs(fs.join(output, CHECKPOINT_DIR), storage_options)
    old = sorted(p for p in filesystem.ls(folder, detail=False) if p.rsplit("/", 1)[-1].startswith("step-"))
    for path in old[:-keep]:
        if not path.endswith(name):
            filesystem.rm(path)
    logger.info("checkpoint %s", url)
    return url


def load_latest(output: str, storage_options: dict | None = None) -> dict[str, Any] | None:
    """The newest checkpoint under `output`, or None when there is none yet."""
    latest = fs.join(output, CHECKPOINT_DIR, LATEST)
    if not fs.exists(latest, storage_options):
        return None
    return load(fs.join(output, CHECKPOINT_DIR, fs.read_json(latest, storage_options)["file"]), storage_options)


def load(url: str, storage_options: dict | None = None) -> dict[str, Any]:
    """A checkpoint's dict; ValueError (one line, naming the URL) when it cannot be read."""
    try:
        data = fs.read_bytes(url, storage_options)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as exc:  # a missing file, a truncated or foreign file: all mean "cannot resume from it"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"checkpoint {url} is unreadable: {reason}") from None
