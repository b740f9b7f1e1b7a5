"""`python -m jobs.demo OUT`: the labeling factory end to end on one machine, with nothing to download.

1. writes a few ShapeWorld shards (synthetic scenes with exact class maps) to `OUT/shapes/`;
2. labels them with the smallest possible config, `OUT/label.yaml`, two lines (`input:`, `output:`),
   so the shipped default model and the vocabulary beside the shards are used, on an embedded Ray;
3. prints the run summary and the mIoU of the label maps against the scenes' true class maps;
4. fine-tunes a DenseCLIP student on those labels for a short schedule (`examples/finetune-shapes.yaml`,
   `--finetune-steps`) and prints its mIoU beside the teacher's.
5. writes the review report (`OUT/labels/review/index.html`, `clipdense review`) and prints its path.

Run it again into the same OUT and the job resumes: every shard is already committed. `k=v`
arguments are config overrides for the labeling run (e.g. `zoom.enabled=true`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.label import format_summary
from pipeline.io import fs

EXAMPLE_FINETUNE = str(Path(__file__).resolve().parents[1] / "examples" / "finetune-shapes.yaml")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="demo folder (any fsspec URL)")
    parser.add_argument("overrides", nargs="*", metavar="k=v", help="config overrides for the labeling run")
    parser.add_argument("--shards", type=int, default=4, help="ShapeWorld shards to write (default 4)")
    parser.add_argument("--per-shard", type=int, default=16, help="scenes per shard (default 16)")
    parser.add_argument("--size", type=int, default=96, help="scene side in pixels (default 96)")
    parser.add_argument("--finetune-steps", type=int, default=100, help="student fine-tune steps (0 = skip)")
    args = parser.parse_args(argv)

    from pipeline.config import load_config
    from pipeline.data.shapeworld_shards import write_dataset
    from pipeline.distribute import run_label_job
    from pipeline.eval.evaluate import evaluate_run_output
    from pipeline.eval.predictions import RunOutputPredictions
    from pipeline.eval.truth import open_truth
    from pipeline.obs import setup_logging
    from pipeline.review import write_report

    setup_logging()
    shapes, labels, config = fs.join(args.out, "shapes"), fs.join(args.out, "labels"), fs.join(args.out, "label.yaml")
    if not fs.exists(fs.join(shapes, "vocabulary.json")):
        write_dataset(shapes, args.shards, args.per_shard, size=args.size)
    fs.put_atomic(config, f"input: {shapes}\noutput: {labels}\n".encode())
    summary = run_label_job(load_config(config, args.overrides))
    print(format_summary(summary))
    if summary["shards"]["committed"]:
        report = evaluate_run_output(open_truth(shapes), RunOutputPredictions(labels))
        floor = report["baselines"].get("all_background", {}).get("mIoU")
        floor_text = f" (all-background baseline {floor:.3f})" if floor is not None else ""
        print(f"mIoU against the ShapeWorld truth: {report['mIoU']:.3f}{floor_text} over {report['n_images']} images")
    print(f"config: {config}\nlabels: {labels}")
    if summary["shards"]["committed"] and args.finetune_steps:
        _finetune(args.out, labels, shapes, args.finetune_steps, report["mIoU"])
    if summary["shards"]["committed"]:
        print(f"review: {write_report(labels)}")  # open it in a browser to look at the labels
    return int(summary["exit_code"])


def _finetune(out: str, labels: str, shapes: str, steps: int, teacher_miou: float) -> None:
    """4. fine-tune a DenseCLIP student on the labels (a short schedule) and score it on the same scenes."""
    from pipeline.config import load_config
    from pipeline.train import FinetuneCfg, finetune

    where = [f"labels=[{labels}]", f"output={fs.join(out, 'student')}", f"eval.truth={shapes}"]
    summary = finetune(load_config(EXAMPLE_FINETUNE, [*where, f"optim.steps={steps}"], cls=FinetuneCfg))
    print(
        f"student ({steps} steps, {summary['train_seconds']:.0f} s): mIoU {summary['mIoU']:.3f} against the same "
        f"truth; teacher (maskclip labels) {teacher_miou:.3f}\nstudent model: {summary['model']}"
    )


def _main_or_error() -> int:
    try:
        return main()
    except (ValueError, FileNotFoundError) as exc:  # bad input or config (ConfigError is a ValueError)
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(_main_or_error())
