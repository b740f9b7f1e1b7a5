"""What a student can learn from its pseudo-labels: the classes the labels (nearly) never get right,
and the student's IoU on them and on the rest.

    python bench/label_ceiling.py LABELS.json STUDENT.json [STUDENT.json ...] [--below 0.05] [--target 0.40]

LABELS.json: `clipdense eval --truth TRAIN_TRUTH --pred LABEL_RUN --json LABELS.json`, the pseudo-labels
scored against the truth of the scenes they label. STUDENT.json: `clipdense eval --truth HELDOUT --head
denseclip ... --json STUDENT.json`, a student trained on those labels. Prints the classes whose
pseudo-label IoU is below `--below`, then per student its highest IoU among them, its mean IoU over the
other classes, and the mean over the other classes that an mIoU of `--target` needs with those at zero.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("labels", help="eval JSON of the pseudo-labels against their scenes' truth")
    parser.add_argument("students", nargs="+", help="eval JSONs of students trained on them")
    parser.add_argument("--below", type=float, default=0.05, help="a class the labels score below this is unlearnt")
    parser.add_argument("--target", type=float, default=0.40, help="the student mIoU aimed for")
    args = parser.parse_args()
    labels = json.loads(Path(args.labels).read_text())["per_class"]
    unlearnt = [name for name, iou in labels.items() if iou is not None and iou < args.below]
    print(f"{len(unlearnt)} of {len(labels)} classes score below {args.below} in the labels: {', '.join(unlearnt)}")
    for path in args.students:
        scored = {k: v for k, v in json.loads(Path(path).read_text())["per_class"].items() if v is not None}
        rest = [v for k, v in scored.items() if k not in unlearnt]
        top = max((scored.get(k, 0.0) for k in unlearnt), default=0.0)
        needed = args.target * len(scored) / len(rest)
        print(
            f"{path}: at most {top:.3f} on those, {sum(rest) / len(rest):.3f} mean over the other {len(rest)}; "
            f"mIoU {args.target} needs {needed:.3f} over them"
        )


if __name__ == "__main__":
    main()
