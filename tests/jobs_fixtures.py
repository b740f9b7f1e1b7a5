"""Shared pieces of the labeling-job tests: a tiny fixed-weight CLIP, ShapeWorld inputs, a local Ray.

The tiny model is a real open_clip CLIP (one-layer towers, width 32) saved as a model folder with
fixed weights, so every actor of a run, and every run, labels with the same model, as a shipped
model would; it labels 48 px images in milliseconds on a CPU.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import RunCfg, load_config
from pipeline.data.shapeworld_shards import write_dataset
from pipeline.io import fs

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}

# Small, fast settings every job test shares (one actor: model start-up dominates on a 2-core machine);
# the vocabulary comes from beside the ShapeWorld shards.
FAST = [
    "prompts.templates=single",
    "infer.batch_size=4",
    "distribute.num_actors=1",
    "distribute.num_cpus=1",
    "distribute.log_interval=0",
]


def tiny_model(folder: Path) -> str:
    """Write a model folder (config.json + weights.safetensors, seed 0) and return its path."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "weights.safetensors"))
    return str(folder)


def shapes(root: str, n_shards: int, per_shard: int, size: int = 48, storage_options: dict | None = None) -> list[str]:
    """ShapeWorld shards (and vocabulary.json) under `root`."""
    return write_dataset(root, n_shards, per_shard, size=size, seed=7, storage_options=storage_options)


def job_config(
    inputs: str | list[str], output: str, model: str, *overrides: str, storage_options: dict | None = None
) -> RunCfg:
    """A run config with the FAST settings, the tiny `model` folder and dotted `overrides`."""
    cfg = load_config(None, [f"model.name={model}", *FAST, *overrides])
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    return dataclasses.replace(cfg, input=inputs, output=output, storage_options=dict(storage_options or {}))


def replace_image(shard: str, key: str, size: tuple[int, int] | None = None) -> None:
    """Replace the image of sample `key` in the local tar `shard`: with a JPEG of `size` (H, W), or,
    without a size, with bytes no decoder accepts."""
    if size is None:
        data = b"\xff\xd8 this is not a jpeg"
    else:
        buf = io.BytesIO()
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="JPEG")
        data = buf.getvalue()
    replace_member(shard, f"{key}.jpg", data)


def replace_member(shard: str, name: str, data: bytes) -> None:
    """Replace the content of member `name` of the local tar `shard` by `data`."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    if name not in {m.name for m, _ in members}:
        raise KeyError(f"{shard} has no member {name!r}")
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, content in members:
            if member.name == name:
                content, member.size = data, len(data)
            tar.addfile(member, io.BytesIO(content))


def corrupt_image(shard: str, key: str) -> None:
    replace_image(shard, key)


def read_labels(output: str, shard: str, storage_options: dict | None = None) -> dict[str, bytes]:
    """Members of `output/labels/<shard>.tar` by name."""
    data = fs.read_bytes(fs.join(output, f"labels/{shard}.tar"), storage_options)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def read_rows(output: str, shard: str, storage_options: dict | None = None) -> list[dict]:
    data = fs.read_bytes(fs.join(output, f"meta/{shard}.parquet"), storage_options)
    return pq.read_table(io.BytesIO(data)).to_pylist()


def label_bytes(output: str, shard: str, storage_options: dict | None = None) -> dict[str, bytes]:
    """The label and confidence PNGs of a shard (the JSON members carry timings, which differ per run)."""
    return {k: v for k, v in read_labels(output, shard, storage_options).items() if k.endswith(".png")}


def rows_without_timing(output: str, shard: str, storage_options: dict | None = None) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in read_rows(output, shard, storage_options)]


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A fresh local Ray instance with 2 CPUs for one test module (never a cluster found on the machine)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()
