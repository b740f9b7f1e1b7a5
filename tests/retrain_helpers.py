"""Helpers of tests/test_retrain.py: labeling-run outputs, truth shards, and a step run in a subprocess.

`run_output` writes what the retraining step reads of a labeling run (FORMAT.md): `_run/config.yaml`
and one commit marker per shard. `export_shipped` stands in for the fine-tune where a test is about
the step's bookkeeping, not about training: it exports the shipped, trained `shapes-clip` as the
candidate, which beats a labeler that ran with random-init weights and ties with itself, so the gate
has a known answer both ways.
"""

from __future__ import annotations

import json
import sys

from pipeline import schema
from pipeline.config import ModelCfg, dump_yaml, load_config
from pipeline.data.shapeworld_shards import write_dataset
from pipeline.io import fs
from pipeline.models.backbone import SHIPPED_DIR

MODEL_FILES = ("config.json", "weights.safetensors", "meta.json")


def run_output(
    root: str, name: str, shards: list[str], storage_options: dict | None, pretrained: str = "random"
) -> str:
    """A labeling run `root/name` with committed `shards`; its labeler is shapes-clip with `pretrained`
    weights (random init by default, "" for the shipped trained ones)."""
    out = fs.join(root, name)
    cfg = load_config(None, [f"model.pretrained={pretrained}", f"output={out}", f"input=[{root}/images/x.tar]"])
    fs.put_atomic(fs.join(out, schema.CONFIG_FILE), dump_yaml(cfg).encode(), storage_options)
    for shard in shards:
        commit(out, shard, storage_options)
    return out


def commit(out: str, shard: str, storage_options: dict | None, seed: int = 0) -> None:
    marker = {"shard": shard, "samples": 8, "sha256": f"{seed:064x}"}
    fs.put_json(fs.join(out, schema.commit_path(shard)), marker, storage_options)


def truth(root: str, storage_options: dict | None) -> str:
    """Held-out ShapeWorld truth: one shard of 12 scenes of 96 px and its vocabulary.json."""
    url = fs.join(root, "truth")
    write_dataset(url, 1, 12, size=96, seed=99, storage_options=storage_options)
    return url


def export_shipped(
    start: ModelCfg, runs: list[str], output: str, storage_options: dict | None, stop: object = None
) -> dict:
    """Trainer stand-in: export the shipped shapes-clip as OUT/model and write OUT/_run/summary.json."""
    for name in MODEL_FILES:
        data = (SHIPPED_DIR / "shapes-clip" / name).read_bytes()
        fs.put_atomic(fs.join(output, "model", name), data, storage_options)
    summary = {"final_step": 0, "mIoU": None, "train_seconds": 0.0, "n_samples": 0, "labels": runs}
    fs.put_json(fs.join(output, schema.SUMMARY_FILE), summary, storage_options)
    return summary


def listing(root: str, storage_options: dict) -> dict[str, int]:
    """Every file under `root` with its size: a step that changes nothing leaves it equal."""
    filesystem, path = fs.url_to_fs(root, storage_options)
    filesystem.invalidate_cache()
    return {p: d["size"] for p, d in filesystem.find(path, detail=True).items()}


def main(argv: list[str]) -> None:
    """`python tests/retrain_helpers.py CONFIG_JSON`: one step with `export_shipped`; prints the record."""
    from pipeline.config import from_dict
    from pipeline.obs import setup_logging
    from pipeline.retrain import RetrainCfg, retrain_step

    setup_logging()
    cfg = from_dict(RetrainCfg, json.loads(argv[0]))
    print(json.dumps(retrain_step(cfg, export_shipped)))


if __name__ == "__main__":
    main(sys.argv[1:])
