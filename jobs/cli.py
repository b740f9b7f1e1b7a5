"""`clipdense` command line: one subcommand per job, each defined in its own `jobs/` module.

A subcommand module exposes `register(subparsers)`, which adds its parser and sets `func` to a
callable taking the parsed arguments and returning the exit code. Modules are imported only when
listed here, so a slow import (torch, ray) costs only the commands that need it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pipeline.config import ConfigError

# Subcommand modules, in the order `clipdense --help` shows them.
COMMANDS = [
    "jobs.config_cmd",
    "jobs.shapes",
    "jobs.pretrain_shapes",
    "jobs.eval",
    "jobs.finetune",
    "jobs.label",
    "jobs.segment",
    "jobs.retrain",
    "jobs.review",
    "jobs.submit",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipdense", description="Dense CLIP pseudo-labels at scale.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from pipeline.obs import setup_logging

    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        # Bad input from the user: one line naming it, no traceback.
        print(f"clipdense {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
