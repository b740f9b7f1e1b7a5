"""`clipdense config show FILE [k=v ...]`: print the resolved config a job would run with."""

from __future__ import annotations

import argparse

from pipeline.config import dump_yaml, load_config


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("config", help="inspect configs")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = actions.add_parser("show", help="print the resolved config (file + overrides + defaults)")
    show.add_argument("file", nargs="?", default=None, help="YAML config file or URL (optional)")
    show.add_argument("overrides", nargs="*", metavar="k=v", help="dotted overrides, e.g. model.name=ViT-B-16")
    show.set_defaults(func=_show)


def _show(args: argparse.Namespace) -> int:
    file, overrides = args.file, list(args.overrides)
    if file is not None and "=" in file:
        file, overrides = None, [file, *overrides]
    print(dump_yaml(load_config(file, overrides)), end="")
    return 0
