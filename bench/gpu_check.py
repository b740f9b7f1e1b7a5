"""One script for a machine with a GPU: the label job, the heads bench and a fine-tune smoke test.

1. `label`: the labeling job (embedded Ray, one actor per GPU) on ShapeWorld shards with a ViT-B/16
   (random init; 448 px scenes, short side 448, windows 224 / stride 112, shapes-clip's recommended
   2x2 shifts and 10 PAMR steps): the run summary's img/s, precision and seconds by phase.
2. `heads`: `bench/heads_speed.py` (engine vs batch-1 loop at the same precision, fraction of the
   matmul rate), fp32, bf16 and auto.
3. `finetune`: a few steps of `pipeline.train.finetune` on the label job's output: steps, img/s,
   seconds, final mIoU.

It prints one JSON report (also written to `--json`): what a GPU run reports. `--small` runs the same
three parts in a minute or two on a CPU (the shipped shapes-clip, 96 px scenes, few images and steps),
so the script is known to work before a GPU is at hand.

    python bench/gpu_check.py [--small] [--json gpu_check.json] [--dir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.data.shapeworld_shards import write_dataset  # noqa: E402
from pipeline.train.config import FinetuneCfg  # noqa: E402

FULL = {
    "model": ["model.name=ViT-B-16", "model.pretrained=random"],
    "scenes": {"shards": 4, "per_shard": 64, "size": 448},
    "infer": ["infer.short_side=448", "infer.crop=224", "infer.stride=112", "infer.batch_size=16"],
    "heads": ["--images", "16", "--batch-size", "16", "--repeats", "2"],
    "steps": 50,
}
SMALL = {
    "model": ["model.name=shapes-clip"],
    "scenes": {"shards": 2, "per_shard": 8, "size": 96},
    "infer": ["infer.batch_size=8"],
    "heads": ["--model", "shapes-clip", "--images", "4", "--heads", "maskclip", "--size", "96x128"]
    + ["--short-side", "64", "--crop", "64", "--stride", "32"],
    "steps": 4,
}
RECOMMENDED = ["infer.shifts=2", "infer.pamr_steps=10", "prompts.templates=single", "distribute.log_interval=10"]


def label(plan: dict, work: Path) -> dict:
    from pipeline.distribute import run_label_job

    write_dataset(str(work / "scenes"), seed=1000, **plan["scenes"])
    cfg = load_config(None, [*plan["model"], *plan["infer"], *RECOMMENDED])
    cfg = dataclasses.replace(cfg, input=[str(work / "scenes")], output=str(work / "labels"))
    summary = run_label_job(cfg)
    keep = ("exit_code", "images_per_s", "labelling_s", "seconds", "precision", "seconds_by_phase", "actors")
    return {"images": summary["labelled_now"]["ok"], **{k: summary[k] for k in keep}}


def heads(plan: dict) -> dict:
    script = Path(__file__).with_name("heads_speed.py")
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, str(script), *plan["heads"], "--precisions", "fp32,bf16,auto", "--json", out.name]
        subprocess.run(command, check=True)
        return json.loads(Path(out.name).read_text())["rows"]


def finetune(plan: dict, work: Path) -> dict:
    from pipeline.train import finetune as run_finetune

    overrides = [f"optim.steps={plan['steps']}", "optim.batch_size=8", "optim.warmup=2", "checkpoint_every=1000"]
    overrides += [f"eval.truth={work / 'scenes'}", "eval.max_images=16", "data.loader_workers=1"]
    cfg = load_config(None, overrides, cls=FinetuneCfg)
    cfg = dataclasses.replace(cfg, labels=[str(work / "labels")], output=str(work / "finetune"))
    start = time.perf_counter()
    summary = run_finetune(cfg)
    lines = [json.loads(x) for x in (work / "finetune" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rates = [m["img_per_s"] for m in lines if m.get("kind") == "train"]
    return {
        "final_step": summary["final_step"],
        "mIoU": summary["mIoU"],
        "train_seconds": summary["train_seconds"],
        "wall_seconds": round(time.perf_counter() - start, 1),
        "img_per_s_last": rates[-1] if rates else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a quick run on any machine (CPU included)")
    parser.add_argument("--json", default="", help="also write the report to this file")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed)")
    args = parser.parse_args()
    plan = SMALL if args.small else FULL
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    report = {"gpu": gpu, "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
    report["small"] = args.small
    work = Path(args.dir or tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        report["label"] = label(plan, work)
        report["heads"] = heads(plan)
        report["finetune"] = finetune(plan, work)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
