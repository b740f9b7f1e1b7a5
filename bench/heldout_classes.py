"""A student on classes it was not trained on: IoU on held-out classes against the trained ones.

The student's labeling run (its `_run/vocabulary.json`) left some classes out; the truth set has them
all. `clipdense eval` scores the student and the teacher head on the whole vocabulary of the truth
(the student prompts every name with its learned contexts), and this script splits the per-class IoU
into the classes the student was trained on and the held-out ones, for both.

    python bench/heldout_classes.py STUDENT_OUT --truth bench-out/quality/heldout-1000 [--teacher HEAD]

The teacher is the labeling run's model with `--teacher` (default: the head that labelled the run,
from the fine-tune summary).

STUDENT_OUT is a `clipdense finetune` output (its `model/` is scored and its summary names the
labeling run). Prints one JSON report.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.cli import main as clipdense  # noqa: E402


def per_class(truth: str, head: str, *overrides: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "eval.json"
        argv = ["eval", "--truth", truth, "--head", head, "--no-random-baseline", "--json", str(report)]
        if clipdense([*argv, *overrides]) != 0:
            raise SystemExit(f"clipdense {' '.join([*argv, *overrides])} failed (its error is above)")
        return json.loads(report.read_text())["per_class"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("student", help="clipdense finetune output folder")
    parser.add_argument("--truth", required=True, help="ShapeWorld truth shards with the whole vocabulary")
    parser.add_argument("--teacher", default=None, help="teacher head (default: the one that labelled the run)")
    args = parser.parse_args()

    out = Path(args.student)
    summary = json.loads((out / "_run/summary.json").read_text())
    labels = Path(summary["labels"][0])
    trained = set(json.loads((labels / "_run/vocabulary.json").read_text())["classes"])
    scores = {
        "student": per_class(args.truth, "denseclip", f"model.name={out / 'model'}"),
        "teacher": per_class(
            args.truth,
            args.teacher or summary["teacher"]["head"],
            f"model.name={summary['teacher']['model']}",
            f"model.pretrained={summary['teacher']['pretrained']}",
        ),
    }
    held_out = sorted(set(scores["student"]) - trained)
    report: dict = {"held_out": held_out, "trained": len(trained), "steps": summary["final_step"]}
    for who, ious in scores.items():
        seen = [v for k, v in ious.items() if k in trained]
        unseen = [ious[k] for k in held_out]
        report[who] = {
            "mIoU_held_out": round(sum(unseen) / len(unseen), 4),
            "mIoU_trained": round(sum(seen) / len(seen), 4),
            "held_out_iou": {k: ious[k] for k in held_out},
        }
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
