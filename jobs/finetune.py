"""`clipdense finetune CONFIG [k=v ...]` (also `python -m jobs.finetune`): train a DenseCLIP student on
the pseudo-label shards of one or more labeling runs, evaluate it and export it as a model folder."""

from __future__ import annotations

import argparse
import json
import sys

from jobs.label import split_config_args
from pipeline.config import load_config


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "finetune",
        help="fine-tune a DenseCLIP student on pseudo-label shards",
        description=__doc__.split("\n\n")[0].split(": ", 1)[-1],
    )
    parser.add_argument(
        "config",
        nargs="?",
        default=None,
        help="YAML config file or URL (labels: [RUN_OUTPUT, ...], output: URL); optional with overrides",
    )
    parser.add_argument("overrides", nargs="*", metavar="k=v", help="dotted overrides, e.g. optim.steps=500")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pipeline.train import FinetuneCfg, finetune

    file, overrides = split_config_args(args)
    summary = finetune(load_config(file, overrides, cls=FinetuneCfg))
    print(json.dumps(summary, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["finetune", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
