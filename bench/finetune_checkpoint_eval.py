"""mIoU of a fine-tune's latest checkpoint (a run still training, or one stopped early), on a truth set.

Builds the student from the run's `_run/config.yaml`, loads its latest checkpoint, exports it to a
temporary model folder and scores that folder as `clipdense eval --head denseclip` does.

    python bench/finetune_checkpoint_eval.py FINETUNE_OUTPUT --truth SHARDS_OR_VOC [--truth ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from pipeline.config import from_dict  # noqa: E402
from pipeline.io import fs  # noqa: E402
from pipeline.models.backbone import model_config  # noqa: E402
from pipeline.train import checkpoint  # noqa: E402
from pipeline.train.config import FinetuneCfg  # noqa: E402
from pipeline.train.evaluate import evaluate_folder  # noqa: E402
from pipeline.train.export import export  # noqa: E402
from pipeline.train.runs import open_runs  # noqa: E402
from pipeline.train.student import build  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", help="a clipdense finetune output")
    parser.add_argument("--truth", action="append", required=True, help="truth set (repeat for several)")
    args = parser.parse_args()
    cfg = from_dict(FinetuneCfg, yaml.safe_load(fs.read_text(fs.join(args.output, "_run/config.yaml"))))
    state = checkpoint.load_latest(args.output)
    if state is None:
        raise SystemExit(f"{args.output} has no checkpoint yet")
    model, backbone = build(cfg)
    model.load_state_dict(state["model"])
    folder = export(model, tempfile.mkdtemp(prefix="ckpt-model-"), model_config(cfg.model.name), backbone,
                    open_runs(cfg.labels)[0].vocab)  # fmt: skip
    out = {"step": state["step"], "train_seconds": round(state["train_seconds"], 1)}
    for truth in args.truth:
        report = evaluate_folder(folder, truth, cfg.model)
        out[truth] = {"mIoU": report["mIoU"], "n_images": report["n_images"]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
