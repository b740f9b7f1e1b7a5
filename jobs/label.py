"""`clipdense label CONFIG [k=v ...]`: label image shards with the dense engine on a pool of Ray actors.

Also `python -m jobs.label CONFIG [k=v ...]`. The smallest config is two lines::

    input: s3://bucket/shards/train-{000000..000099}.tar
    output: s3://bucket/labels/run1

By default an embedded local Ray instance runs the job; `--address` joins a running cluster. A rerun
into the same output resumes (committed shards are skipped) when the config is equal, and is refused
otherwise unless `--overwrite`. Exit status: 0 when every shard is committed, 1 when some failed
or every actor died while loading the model (one line, no summary), 2 for a bad config or input,
130/143 when interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from pipeline import schema
from pipeline.config import RunCfg, load_config
from pipeline.io import fs


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "label",
        help="label image shards with dense CLIP on Ray (labels tar + Parquet per shard)",
        description="Read image shards from any fsspec URL, label every pixel with the dense engine on a pool "
        "of Ray actors, and write OUT/labels/<shard>.tar, OUT/meta/<shard>.parquet and OUT/_commits/<shard>.json.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None, help="YAML config file or URL (optional with overrides)")
    parser.add_argument("overrides", nargs="*", metavar="k=v", help="dotted overrides, e.g. infer.batch_size=32")
    parser.add_argument("--address", default=None, help="Ray cluster to join (host:port, auto); default: embedded")
    parser.add_argument("--overwrite", action="store_true", help="replace an output written with another config")


def split_config_args(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """(config file, overrides): a first positional holding `=` is an override, not a file."""
    file, overrides = args.config, list(args.overrides)
    if file is not None and "=" in file:
        file, overrides = None, [file, *overrides]
    return file, overrides


def with_head_option(head: str | None, overrides: list[str]) -> list[str]:
    """`overrides` with a command's `--head NAME` added as `head.name=NAME`; a ValueError when the
    overrides name another head too (a config file's head is overridden, as any key)."""
    if head is None:
        return overrides
    named = load_config(None, overrides).head.name
    if named and named != head:
        raise ValueError(f"--head {head} and head.name={named} name different heads: give one")
    return [*overrides, f"head.name={head}"]


def check_head_before_start(cfg: RunCfg) -> None:
    """Raise ValueError (`pipeline.stages.infer.check_head`) before any Ray start when the config's
    head cannot label with its model: an unknown head or option, or another head than the model's own
    (a fine-tuned student's). Reads the model's meta.json only when the config names a head or head
    options; a model this machine cannot reach (the cluster may) is left to the workers, which refuse
    the same way."""
    if not cfg.head.name and not cfg.head.options:
        return
    from pipeline.models.backbone import model_meta
    from pipeline.stages.infer import check_head

    try:
        meta = model_meta(cfg.model.name, cfg.storage_options)
    except (ValueError, OSError):
        return
    check_head(cfg, meta)


def run(args: argparse.Namespace) -> int:
    from pipeline.distribute import ModelStartError, run_label_job

    file, overrides = split_config_args(args)
    cfg = load_config(file, overrides)
    check_head_before_start(cfg)
    if args.address is not None:  # set as given, not parsed as YAML
        cfg = dataclasses.replace(cfg, distribute=dataclasses.replace(cfg.distribute, address=args.address))
    try:
        summary = run_label_job(cfg, overwrite=args.overwrite)
    except ModelStartError as exc:  # the cluster could not run the model: a failed run, not bad input (2)
        print(f"clipdense label: error: {exc}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return int(summary["exit_code"])


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the terminal; the full summary is in OUT/_run/summary.json."""
    shards, samples = summary["shards"], summary["samples"]
    lines = [
        f"shards: {shards['committed']}/{shards['total']} committed ({shards['labelled']} labelled now, "
        f"{shards['skipped']} already done), {shards['failed']} failed"
        + (f", {shards['abandoned']} abandoned, {shards['not_started']} not started" if summary["interrupted"] else ""),
        f"images: {samples['ok']} labelled, {samples['failed']} failed rows in the output "
        f"({summary['labelled_now']['ok']} labelled now); {summary['images_per_s']:.1f} img/s, "
        f"{summary['seconds']:.1f}s in all",
    ]
    reasons = list(samples["errors"].items())
    for reason, n in reasons[:5]:
        lines.append(f"  {n} x {reason}")
    if len(reasons) > 5:
        lines.append(f"  ... {len(reasons) - 5} more reasons (samples.errors in the summary)")
    if cut := summary["cut_shards"]:
        more = f" and {len(cut) - 3} more" if len(cut) > 3 else ""
        lines.append(
            f"input shards not read to their end (cut, corrupt or joined): {', '.join(cut[:3])}{more} (cut_shards)"
        )
    if skipped := summary["zoom_skipped"]:
        lines.append("zoom: " + "; ".join(f"{n} x {reason}" for reason, n in skipped.items()))
    for failed in summary["failed_shards"]:
        lines.append(f"failed shard {failed['shard']} after {failed['attempts']} attempts: {failed['error']}")
    if summary["interrupted"]:
        lines.append("interrupted: rerun the same command to finish the remaining shards")
    lines.append(f"summary: {fs.join(summary['output'], schema.SUMMARY_FILE)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["label", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
