"""Peak memory of the labeling job must not grow with the number of shards, in the driver or in an actor.

Writes 100 small ShapeWorld shards, then runs `clipdense label` (embedded Ray, one actor) on the
first 10 and, separately, on all 100, each in a fresh Python process. Reports the driver's peak RSS (the child's
own VmHWM) and the actor's peak RSS (recorded in every commit marker as `peak_rss_mb`): after
its 10th shard and after its last. The check passes when each 100-shard peak is within `--limit-mb`
of the 10-shard one, and the driver, which only schedules shards, never loaded a model library
(torch, open_clip) and peaked below `--driver-limit-mb`.

    python bench/label_memory.py [--shards 10 100] [--per-shard 4] [--size 64] [--model JSON] [--dir DIR]

Exit status 0 when the check passes, 1 when it fails.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# A small random-init CLIP (model-config JSON): memory behaviour, not label quality, is measured here.
SMALL_CLIP = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def run_child(work: Path, n_shards: int, model: str) -> dict:
    """Child side: label the first `n_shards` shards of `work/in` into `work/out-N` as `clipdense label`
    does (the command line, so its imports count); report peak memory."""
    from jobs.cli import main

    inputs = sorted(str(p) for p in (work / "in").glob("*.tar"))[:n_shards]
    config = work / f"run-{n_shards}.yaml"
    config.write_text(json.dumps({"input": inputs, "output": str(work / f"out-{n_shards}")}))  # JSON is YAML
    main(["label", str(config), f"model.name={model}", "prompts.templates=single", "distribute.num_actors=1"])
    summary = json.loads((work / f"out-{n_shards}/_run/summary.json").read_text())
    markers = [json.loads(p.read_text()) for p in (work / f"out-{n_shards}/_commits").glob("*.json")]
    markers.sort(key=lambda m: m["stats"]["committed_at"])
    actor = [m["stats"]["peak_rss_mb"] for m in markers]
    return {
        "shards": n_shards,
        "exit_code": summary["exit_code"],
        "driver_peak_mb": round(_peak_kb() / 1024, 1),
        "driver_loaded": [m for m in ("torch", "open_clip", "pipeline.models") if m in sys.modules],
        "actor_peak_mb_after_10": actor[min(9, len(actor) - 1)],
        "actor_peak_mb_at_end": actor[-1],
    }


def _peak_kb() -> int:
    """Peak RSS of this process (VmHWM, which starts afresh at exec; ru_maxrss keeps the forking parent's)."""
    return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, nargs=2, default=[10, 100], metavar=("FEW", "MANY"))
    parser.add_argument("--per-shard", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--model", default="", help="model.name (default: a small random-init CLIP config)")
    parser.add_argument("--limit-mb", type=float, default=50.0, help="allowed growth from FEW to MANY shards")
    parser.add_argument("--driver-limit-mb", type=float, default=400.0, help="allowed driver peak RSS")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    work = Path(args.dir or tempfile.mkdtemp(prefix="label-memory-"))
    model = args.model or str(work / "small-clip.json")
    if args.child:
        print(json.dumps(run_child(work, args.child, model)))
        return 0
    try:
        from pipeline.data.shapeworld_shards import write_dataset

        write_dataset(str(work / "in"), max(args.shards), args.per_shard, size=args.size, seed=3)
        (work / "small-clip.json").write_text(json.dumps(SMALL_CLIP))
        reports = []
        for n in args.shards:
            cmd = [sys.executable, __file__, "--child", str(n), "--dir", str(work), "--model", model]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            reports.append(json.loads(done.stdout.strip().splitlines()[-1]))
        few, many = reports
        growth = {
            "driver_mb": round(many["driver_peak_mb"] - few["driver_peak_mb"], 1),
            "actor_mb": round(many["actor_peak_mb_at_end"] - few["actor_peak_mb_at_end"], 1),
            "actor_within_run_mb": round(many["actor_peak_mb_at_end"] - many["actor_peak_mb_after_10"], 1),
        }
        ok = all(abs(v) <= args.limit_mb for v in growth.values()) and few["exit_code"] == many["exit_code"] == 0
        ok = ok and all(not r["driver_loaded"] and r["driver_peak_mb"] <= args.driver_limit_mb for r in reports)
        limits = {"limit_mb": args.limit_mb, "driver_limit_mb": args.driver_limit_mb}
        print(json.dumps({"runs": reports, "growth": growth, **limits, "ok": ok}, indent=1))
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
