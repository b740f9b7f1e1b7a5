"""`clipdense` command line: one subcommand per job, each defined in its own `jobs/` module.

A subcommand module exposes `register(subparsers)`, which adds its parser and sets `func` to a
callable taking the parsed arguments and returning the exit code.

Every module in COMMANDS is imported to build the parser, whatever the command, so their
module-level imports must stay light: argparse, the stdlib, `pipeline.config`, `pipeline.io`.
Import torch, open_clip, ray, `pipeline.models`, `pipeline.train` or a command's own heavy module
inside the function that runs the command (as `jobs.pretrain_shapes` does with its training loop).
`tests/test_light_cli.py` runs `clipdense config show` and fails when one of those is loaded or the
process grows past a small peak RSS, so a new command that breaks the rule is caught.

Exit codes hold from the first moment of `main`: SIGINT gives 130 and SIGTERM 143, with one line
and no traceback; commands that stop gracefully (label) take the signals over while they run.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from typing import Any

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


def _add_global_flags(parser: argparse.ArgumentParser, default: object = False) -> None:
    """The flags every command takes, before or after its name."""
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")


class _CommandParser(argparse.ArgumentParser):
    """A (sub)command's parser: it takes the global flags too, so `clipdense label -v` works as
    `clipdense -v label` does. Their default is SUPPRESS so that a flag given before the command
    is not reset by the command's parser; `add_subparsers` of a subcommand (`config show`) makes
    parsers of this class too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _add_global_flags(self, default=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipdense", description="Dense CLIP pseudo-labels at scale.")
    _add_global_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser)
    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived outside a command's own handling (BaseException: no `except Exception` stops it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    on_main_thread = threading.current_thread() is threading.main_thread()  # where signals can be caught
    previous = {
        sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM) if on_main_thread
    }
    try:
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
        except Exception as exc:
            from pipeline.io.fs import storage_problem

            if (problem := storage_problem(exc)) is None:
                raise
            print(f"clipdense {args.command}: error: {problem.reason}", file=sys.stderr)
            # An endpoint that may come back is a failed run (1), which a scheduler retries; missing
            # credentials are the environment's configuration (2), which a retry cannot mend.
            return 1 if problem.passing else 2
    except Interrupted as exc:
        print(f"clipdense: interrupted by {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
