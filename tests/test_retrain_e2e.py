"""The manifests' own commands and configs, run locally against the loopback S3 server, end to end:
label, retrain (v0001), retrain with nothing new, label more, retrain killed mid-fine-tune and rerun.

Each command is the one the RayJob or the CronJob runs, with the config file of the rendered
ConfigMap; only the data URLs and the sizes are overridden, and the S3 endpoint and keys come from the
environment, as the Secret gives them to the pods.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import k8s_checks as k8s
import pytest
from retrain_helpers import listing

from pipeline.data.shapeworld_shards import write_dataset
from pipeline.io import fs
from pipeline.retrain import versions

ROOT = Path(__file__).resolve().parents[1]
CLIPDENSE = str(Path(sys.executable).with_name("clipdense"))
SMALL_FINETUNE = [  # minutes of CPU, not hours: a fine-tune of 8 steps, checkpoints every 2
    "finetune.optim.steps=8",
    "finetune.optim.batch_size=4",
    "finetune.optim.warmup=2",
    "finetune.data.loader_workers=0",
    "finetune.checkpoint_every=2",
    "finetune.log_every=2",
    "lease_seconds=3",
    "eval_batch_size=8",
]


def command(argv: list[str], configs: dict[str, str], folder: Path, *overrides: str) -> list[str]:
    """The manifest's argv with its /config file written locally from the ConfigMap, then `overrides`."""
    local = folder / Path(argv[2]).name
    local.write_text(configs[argv[2]])
    assert argv[0] == "clipdense"
    return [CLIPDENSE, argv[1], str(local), *argv[3:], *overrides]


def resumable(models: str, storage_options: dict) -> set[str]:
    """Steps whose fine-tune has a checkpoint to resume from (a checkpoint's `latest.json` is written last)."""
    filesystem, path = fs.url_to_fs(fs.join(models, versions.STEPS_DIR), storage_options)
    filesystem.invalidate_cache()
    return set(filesystem.glob(f"{path}/*/train/checkpoints/latest.json"))


@pytest.mark.s3
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_manifest_commands_label_then_retrain_on_s3(s3, s3_root, tmp_path):
    so = dict(s3.storage_options)
    objects = k8s.render(ROOT / "k8s" / "overlays" / "cpu")
    configs = k8s.mounted_configs(objects)
    label, retrain = k8s.manifest_commands(objects)
    env = {**os.environ, "AWS_ENDPOINT_URL": s3.endpoint_url, "CUDA_VISIBLE_DEVICES": ""}
    for batch, seed, shards in (("images-1", 3, 2), ("images-2", 4, 1)):
        write_dataset(fs.join(s3_root, batch), shards, 8, size=64, seed=seed, storage_options=so)
    write_dataset(fs.join(s3_root, "truth"), 1, 8, size=96, seed=99, storage_options=so)
    models = fs.join(s3_root, "models")
    # The shipped config gates a first version on beating the teacher (test_k8s checks it), which a few
    # steps of training cannot: here the publishing steps are under test, not the gate.
    retrain_args = [
        f"labels=[{s3_root}/labels/]",
        f"models={models}",
        f"truth=[{s3_root}/truth]",
        "gate_first=false",
        *SMALL_FINETUNE,
    ]

    def run(argv: list[str], *overrides: str) -> subprocess.CompletedProcess:
        out = subprocess.run(
            command(argv, configs, tmp_path, *overrides), env=env, capture_output=True, text=True, timeout=600
        )
        assert out.returncode == 0, out.stdout + out.stderr[-3000:]
        return out

    def label_run(batch: str, run_name: str) -> None:
        run(label, f"input={s3_root}/{batch}", f"output={s3_root}/labels/{run_name}", "distribute.num_actors=1")

    label_run("images-1", "run-0001")
    first = run(retrain, *retrain_args)
    assert first.stdout.startswith("published: first version"), first.stdout
    v1 = versions.read_latest(models, so)
    assert v1["version"] == "v0001" and sorted(v1["watermark"]) == [f"{s3_root}/labels/run-0001"]

    before = listing(models, so)
    again = run(retrain, *retrain_args)
    assert again.stdout.startswith("nothing-new"), again.stdout
    assert listing(models, so) == before

    label_run("images-2", "run-0002")
    earlier = resumable(models, so)  # the first step's fine-tune
    killed = subprocess.Popen(command(retrain, configs, tmp_path, *retrain_args), env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not resumable(models, so) - earlier and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert killed.poll() is None, "the step ended before its first checkpoint: nothing was killed mid-fine-tune"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert versions.read_latest(models, so)["version"] == "v0001"

    rerun = run(retrain, *retrain_args)
    assert "taking over from a dead step" in rerun.stderr and "resuming" in rerun.stderr, rerun.stderr[-3000:]
    outcome = rerun.stdout.split(":", 1)[0]
    record = fs.read_json(rerun.stdout.rsplit("record: ", 1)[1].strip(), so)
    assert record["outcome"] == outcome and record["finetune"]["final_step"] == 8
    assert record["compared_with"] == "v0001" and record["trained_from"] == fs.join(models, "v0001", "model")
    better = record["mIoU"]["candidate"] - record["mIoU"]["current"] > 0.005  # the ConfigMap's min_gain
    assert outcome == ("published" if better else "not-better"), record
    assert versions.list_versions(models, so) == ([1, 2] if better else [1])
    assert versions.read_latest(models, so)["version"] == ("v0002" if better else "v0001")
