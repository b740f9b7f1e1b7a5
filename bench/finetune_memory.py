"""Peak memory of a fine-tune worker must not grow with the number of label shards it reads.

Labels 100 small ShapeWorld shards and their first 10 (`bench/label_memory.py`, which also checks the
labeling job), then fine-tunes a `shapes-clip` student (`examples/finetune-shapes.yaml`) on each run,
in-process and with `data.loader_workers=0`, so that reading, joining, shuffling and augmenting run
in the measured process, each in a fresh Python process. `--steps` defaults to one pass over the 100-shard run (the
10-shard run is read ten times over). Reports each child's peak RSS (VmHWM); the check passes when
the 100-shard peak is within `--limit-mb` of the 10-shard one.

    python bench/finetune_memory.py [--shards 10 100] [--per-shard 4] [--steps 0] [--batch 8] [--dir DIR]

Exit status 0 when the check passes, 1 when it fails.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
EXAMPLE = str(BENCH.parent / "examples" / "finetune-shapes.yaml")
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

from label_memory import _peak_kb  # noqa: E402


def run_child(work: Path, n_shards: int, steps: int, batch: int) -> dict:
    """Child side: `clipdense finetune` on `work/out-N` (the command line, so its imports count)."""
    from jobs.cli import main

    out = work / f"student-{n_shards}"
    overrides = [
        f"labels=[{work / f'out-{n_shards}'}]", f"output={out}", "model.name=shapes-clip", "eval.truth=",
        f"optim.steps={steps}", f"optim.batch_size={batch}", f"checkpoint_every={steps}", f"log_every={steps}",
        "data.loader_workers=0", "data.shuffle_buffer=32",
    ]  # fmt: skip
    main(["finetune", EXAMPLE, *overrides])
    summary = json.loads((out / "_run/summary.json").read_text())
    return {
        "shards": n_shards,
        "samples": summary["n_samples"],
        "steps": steps,
        "peak_mb": round(_peak_kb() / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, nargs=2, default=[10, 100], metavar=("FEW", "MANY"))
    parser.add_argument("--per-shard", type=int, default=4)
    parser.add_argument("--steps", type=int, default=0, help="fine-tune steps (0: one pass over MANY shards)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--limit-mb", type=float, default=50.0, help="allowed growth from FEW to MANY shards")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()

    work = Path(args.dir or tempfile.mkdtemp(prefix="finetune-memory-"))
    steps = args.steps or math.ceil(max(args.shards) * args.per_shard / args.batch)
    if args.child:
        print(json.dumps(run_child(work, args.child, steps, args.batch)))
        return 0
    try:
        label = [sys.executable, str(BENCH / "label_memory.py"), "--dir", str(work), "--per-shard", str(args.per_shard)]
        subprocess.run([*label, "--shards", *map(str, args.shards)], capture_output=True, text=True, check=False)
        reports = []
        for n in args.shards:
            cmd = [sys.executable, __file__, "--child", str(n), "--dir", str(work), "--steps", str(steps)]
            done = subprocess.run([*cmd, "--batch", str(args.batch)], capture_output=True, text=True, check=True)
            reports.append(json.loads(done.stdout.strip().splitlines()[-1]))
        few, many = reports
        growth = round(many["peak_mb"] - few["peak_mb"], 1)
        ok = abs(growth) <= args.limit_mb
        print(json.dumps({"runs": reports, "growth_mb": growth, "limit_mb": args.limit_mb, "ok": ok}, indent=1))
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
