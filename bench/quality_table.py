"""The README's quality table: mIoU of every registered dense head on held-out ShapeWorld scenes.

Writes held-out shards (a seed no training stream uses), then runs `clipdense eval --head NAME` for
each head, exactly as a user would, and prints one Markdown row per head with the command that
reproduces it. Extra `k=v` arguments are config overrides passed to every eval (for example
`zoom.enabled=true`).

    python bench/quality_table.py --out bench-out/quality [--heads maskclip,clip] [k=v ...]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from jobs.cli import main as clipdense
from pipeline.models.heads import list_heads


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-out/quality", help="folder for the shards and the JSON reports")
    parser.add_argument("--heads", default=",".join(list_heads()), help="comma-separated heads (default: all)")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--per-shard", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1000, help="held-out dataset seed (training uses seed 0)")
    parser.add_argument("--small-objects", action="store_true", help="scenes with objects under 3%% of the image")
    parser.add_argument("overrides", nargs="*", metavar="k=v")
    args = parser.parse_args(argv)

    out = Path(args.out)
    truth = out / (f"heldout-{args.seed}" + ("-small" if args.small_objects else ""))
    shapes = ["shapes", str(truth), "--shards", str(args.shards), "--per-shard", str(args.per_shard)]
    shapes += ["--seed", str(args.seed)] + (["--small-objects"] if args.small_objects else [])
    if not (truth / "vocabulary.json").exists() and clipdense(shapes) != 0:
        return 1
    print(f"truth: clipdense {shlex.join(shapes)}\n")
    print("| head | mIoU | small-object IoU | background IoU | mIoU, true classes given | colour mIoU | command |")
    print("|---|---|---|---|---|---|---|")
    for head in args.heads.split(","):
        report_path = out / f"{head}.json"
        command = ["eval", "--truth", str(truth), "--head", head, "--no-random-baseline", *args.overrides]
        if clipdense([*command, "--json", str(report_path)]) != 0:
            print(f"| {head} | failed | | | | | `clipdense {shlex.join(command)}` |")
            continue
        report = json.loads(report_path.read_text())
        given = (report.get("diagnostics") or {}).get("true_classes", {}).get("mIoU")
        cells = [report["mIoU"], report["small_object_iou"], report["background_iou"], given, report["colour_mIoU"]]
        shown = " | ".join("-" if v is None else f"{v:.3f}" for v in cells)
        print(f"| {head} | {shown} | `clipdense {shlex.join(command)}` |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
