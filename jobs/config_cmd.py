"""`clipdense config show FILE [k=v ...]`: print the resolved config a job would run with."""

from __future__ import annotations

import argparse

import yaml

from jobs.label import split_config_args
from pipeline.config import RunCfg, dump_yaml, load_config
from pipeline.train.config import FinetuneCfg

JOBS = ("label", "finetune", "retrain")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("config", help="inspect configs")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="print the resolved config (file + overrides + defaults)")
    show.add_argument("config", nargs="?", default=None, metavar="file", help="YAML config file or URL (optional)")
    show.add_argument("overrides", nargs="*", metavar="k=v", help="dotted overrides, e.g. model.name=ViT-B-16")
    show.add_argument(
        "--job",
        choices=JOBS,
        default=None,
        help="whose config (default: retrain when the config has a `models` key, finetune when it has "
        "`labels`, else label)",
    )
    show.set_defaults(func=_show)


def _show(args: argparse.Namespace) -> int:
    file, overrides = split_config_args(args)
    cls = _job_class(args.job) if args.job else config_class(file, overrides)
    print(dump_yaml(load_config(file, overrides, cls=cls)), end="")
    return 0


def config_class(file: str | None, overrides: list[str]) -> type:
    """RetrainCfg for a retraining step's config, FinetuneCfg for a fine-tune's, RunCfg for a labeling run's."""
    # Both a retrain and a fine-tune config name `labels` (labeling runs); only a retrain config names
    # `models` (where versions are published); a labeling config names neither.
    keys = _top_keys(file, overrides)
    return _job_class("retrain" if "models" in keys else "finetune" if "labels" in keys else "label")


def _job_class(job: str) -> type:
    if job == "retrain":
        # Imported for retrain configs alone: `pipeline.retrain` loads its step, and with it torch.
        from pipeline.retrain.config import RetrainCfg

        return RetrainCfg
    return {"label": RunCfg, "finetune": FinetuneCfg}[job]


def _top_keys(file: str | None, overrides: list[str]) -> set[str]:
    """The top-level keys the config file and the overrides name."""
    keys = {o.split("=", 1)[0].strip().split(".", 1)[0] for o in overrides}
    if file:
        from pipeline.io.fs import read_text

        data = yaml.safe_load(read_text(file)) or {}
        if isinstance(data, dict):
            keys |= set(data)
    return keys
