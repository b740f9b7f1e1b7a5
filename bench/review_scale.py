"""The review report's size must follow `--n`, not the run: a run of a million images is no larger a report.

Builds, for each run size, a labeling run's output as `clipdense label` lays it out: one real shard
(ShapeWorld scenes as input, their true class maps written as labels through the job's own
`LabelShardSink`, confidences below 0.5 so the report's default order shows them) and synthetic
committed shards of 1,000 Parquet rows each (confidences 0.6-1.0, random classes) up to the run
size. Then the report is written (`write_report`, what `clipdense review` runs) in a fresh process,
which reports its seconds, peak RSS and the report's bytes and files. The check passes when the largest run's report is within
`--limit` (10%) of the smallest's size and has the same number of files.

    python bench/review_scale.py [--rows 10000 1000000] [--n 48] [--dir DIR]

Exit status 0 when the check passes, 1 when it fails.
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import schema  # noqa: E402

PER_SHARD = 1000


def build_run(out: Path, rows: int, n: int) -> None:
    """A run output of `rows` samples under `out` (see the module docstring)."""
    # Imported here, in the parent only: the writer's package loads torch, which the measured child must not.
    from pipeline.config import RunCfg, dump_yaml
    from pipeline.data.shapeworld_shards import write_dataset
    from pipeline.io.decode import decode_label_png
    from pipeline.io.read import Sample, iter_samples
    from pipeline.stages.write import LabelShardSink, RowContext, rows_table

    (url,) = write_dataset(str(out / "in"), 1, n, size=96, seed=5)
    vocab = json.loads((out / "in/vocabulary.json").read_text())
    k = len(vocab["classes"])
    (out / "run/_run").mkdir(parents=True)
    (out / "run/_run/config.yaml").write_text(dump_yaml(RunCfg(input=[str(out / "in")], output=str(out / "run"))))
    (out / "run/_run/vocabulary.json").write_text(json.dumps(vocab))
    rng = np.random.default_rng(0)
    sink = LabelShardSink(str(out / "run"), schema.shard_name(url), k, RowContext("maskclip", "bench", "0"))
    for index, sample in enumerate(iter_samples(url)):
        assert isinstance(sample, Sample)
        labels = decode_label_png(sample.extra[schema.TRUTH_EXT])
        sink.add(index, sample.key, labels, rng.uniform(0.0, 0.5, labels.shape).astype(np.float32))
    sink.commit({"input": url, "committed_at": time.time(), "wall_s": 1.0})
    for shard in range((rows - n + PER_SHARD - 1) // PER_SHARD):
        name, count = f"synthetic-{shard:06d}", min(PER_SHARD, rows - n - shard * PER_SHARD)
        present = [sorted(rng.choice(k, size=3, replace=False).tolist()) for _ in range(count)]
        table = rows_table(
            [
                {
                    "key": f"{name}_{i:06d}",
                    "shard": name,
                    "status": "ok",
                    "width": 640,
                    "height": 480,
                    "n_classes_present": 3,
                    "class_ids": ids,
                    "class_pixels": [102400, 102400, 102400],
                    "mean_confidence": float(rng.uniform(0.6, 1.0)),
                    "ignored_fraction": 0.0,
                    "zoom_regions": [],
                }  # fmt: skip
                for i, ids in enumerate(present)
            ]
        )
        buf = io.BytesIO()
        pq.write_table(table, buf)
        (out / "run" / schema.meta_path(name)).write_bytes(buf.getvalue())
        marker = {"shard": name, "samples": count, "ok": count, "failed": 0}
        marker["stats"] = {"input": "", "committed_at": time.time() + shard, "wall_s": 10.0}
        (out / "run" / schema.commit_path(name)).write_text(json.dumps(marker))


def review(out: Path, n: int) -> dict:
    """Child side: write the report of `out/run` (what `clipdense review` runs) and measure it."""
    from pipeline.review import write_report

    started = time.perf_counter()
    write_report(str(out / "run"), n=n)
    files = [p for p in (out / "run/review").rglob("*") if p.is_file()]
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "report_kb": round(sum(p.stat().st_size for p in files) / 1024, 1),
        "files": len(files),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs=2, default=[10_000, 1_000_000], metavar=("FEW", "MANY"))
    parser.add_argument("--n", type=int, default=48, help="samples in the report's gallery")
    parser.add_argument("--limit", type=float, default=0.10, help="allowed relative growth of the report's size")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(review(Path(args.child), args.n)))
        return 0
    work = Path(args.dir or tempfile.mkdtemp(prefix="review-scale-"))
    try:
        reports = []
        for rows in args.rows:
            started = time.perf_counter()
            build_run(work / str(rows), rows, args.n)
            built = round(time.perf_counter() - started, 1)
            cmd = [sys.executable, __file__, "--child", str(work / str(rows)), "--n", str(args.n)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            reports.append({"rows": rows, "build_s": built, **json.loads(done.stdout.strip().splitlines()[-1])})
        few, many = reports
        ok = many["files"] == few["files"] and many["report_kb"] <= (1 + args.limit) * few["report_kb"]
        print(json.dumps({"runs": reports, "limit": args.limit, "ok": ok}, indent=1))
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
