"""`clipdense config show FILE [k=v ...]`: print the resolved config a job would run with."""

from __future__ import annotations

import argparse

import yaml

from pipeline.config import RunCfg, dump_yaml, load_config
from pipeline.train.config import FinetuneCfg


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("config", help="inspect configs")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="print the resolved config (file + overrides + defaults)")
    show.add_argument("file", nargs="?", default=None, help="YAML config file or URL (optional)")
    show.add_argument("overrides", nargs="*", metavar="k=v", help="dotted overrides, e.g. model.name=ViT-B-16")
    show.add_argument(
        "--job",
        choices=("label", "finetune"),
        default=None,
        help="whose config (default: finetune when the file has a `labels` key, else label)",
    )
    show.set_defaults(func=_show)


def _show(args: argparse.Namespace) -> int:
    file, overrides = args.file, list(args.overrides)
    if file is not None and "=" in file:
        file, overrides = None, [file, *overrides]
    cls = {"label": RunCfg, "finetune": FinetuneCfg}[args.job] if args.job else config_class(file, overrides)
    print(dump_yaml(load_config(file, overrides, cls=cls)), end="")
    return 0


def config_class(file: str | None, overrides: list[str]) -> type:
    """FinetuneCfg for a fine-tune's config, RunCfg for a labeling run's."""
    return FinetuneCfg if _has_labels_key(file, overrides) else RunCfg


def _has_labels_key(file: str | None, overrides: list[str]) -> bool:
    """A fine-tune config names `labels` (labeling runs); a labeling config never does."""
    if any(o.split("=", 1)[0].strip() == "labels" for o in overrides):
        return True
    if not file:
        return False
    from pipeline.io.fs import read_text

    data = yaml.safe_load(read_text(file)) or {}
    return isinstance(data, dict) and "labels" in data
