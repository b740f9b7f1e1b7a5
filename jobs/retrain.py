"""`clipdense retrain CONFIG [k=v ...]`: one idempotent retraining step (what the k8s CronJob runs).

Also `python -m jobs.retrain CONFIG [k=v ...]`. A config names the labeling runs, the models folder
and the held-out truth::

    labels: [s3://bucket/labels/]      # runs, or a prefix holding them
    models: s3://bucket/models
    truth: s3://bucket/truth/

Exit status 0 when the step did its work or had none to do (no new shards, no committed shard yet,
this watermark already tried, another step holds it); 2 for a bad config or input (a local `labels`
folder that does not exist, listed runs the fine-tune cannot train on such as one run with
`finetune.data.combine: agree`, a `truth` that holds no truth set), all found before the lease;
1 when the step failed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from jobs.label import split_config_args
from pipeline.config import load_config


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "retrain",
        help="one retraining step: fine-tune on new label shards, publish a version only if it is better",
        description="List the committed label shards; if they differ from what the live model version was "
        "trained on, fine-tune from it, score both on the held-out truth, and publish MODELS/vNNNN/ and move "
        "MODELS/latest.json only if the new model wins. Safe to rerun, kill and run twice at once.",
    )
    parser.add_argument("config", nargs="?", default=None, help="YAML config file or URL (optional with overrides)")
    parser.add_argument("overrides", nargs="*", metavar="k=v", help="dotted overrides, e.g. min_gain=0.01")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline.retrain import RetrainCfg, retrain_step
    from pipeline.retrain.train import finetune_trainer

    file, overrides = split_config_args(args)
    cfg = load_config(file, overrides, cls=RetrainCfg)
    record = retrain_step(cfg, finetune_trainer(cfg.finetune))
    print(format_record(record))
    return 0


def format_record(record: dict[str, Any]) -> str:
    lines = [f"{record['outcome']}: {record.get('reason', '')}".rstrip(": ")]
    lines.append(f"shards: {record['shards']} committed, {record['new_shards']} new since {record['live_version']}")
    if "mIoU" in record:
        scores = record["mIoU"]
        lines.append(f"mIoU on truth: {record['compared_with']} {scores['current']:.4f}, new {scores['candidate']:.4f}")
    if record.get("record"):
        lines.append(f"record: {record['record']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["retrain", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
