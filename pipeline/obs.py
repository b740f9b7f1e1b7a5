"""Logging and run statistics shared by every stage: host-tagged log lines, capped error counters."""

from __future__ import annotations

import logging
import socket
import sys
from collections import Counter

# Third-party clients. Their INFO lines (botocore's "Found credentials in environment variables") are
# chatter above a command's own output and one-line errors, so they show only under `-v` (DEBUG); their
# debug lines carry request headers (an access key id in Authorization), so even `-v` stops at INFO
# and never prints a credential.
QUIET_LOGGERS = ("botocore", "aiobotocore", "boto3", "s3fs", "gcsfs", "google", "urllib3", "aiohttp", "fsspec")


def setup_logging(level: int = logging.INFO, include_host: bool = True) -> None:
    """One format for every process of a run; the host name tells cluster nodes apart."""
    host = f"{socket.gethostname()} | " if include_host else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_EscapingFormatter(f"%(asctime)s | {host}%(levelname)s | %(name)s | %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    quiet = logging.INFO if level <= logging.DEBUG else max(level, logging.WARNING)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(quiet)


class _EscapingFormatter(logging.Formatter):
    """Writes what is not valid Unicode as escapes (a file or member name whose bytes are not UTF-8
    reaches Python as surrogate escapes, PEP 383), so a stream that insists on UTF-8, such as a Ray
    worker's log file, never loses a log line to a UnicodeEncodeError."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).encode("utf-8", "backslashreplace").decode("utf-8")


class CappedCounter:
    """Counts reasons (error messages) but remembers at most `cap` distinct ones, so a flood of
    distinct errors cannot grow a commit marker or summary without bound."""

    def __init__(self, cap: int = 20) -> None:
        self.cap = cap
        self.counts: Counter[str] = Counter()
        self.other = 0

    def add(self, reason: str, n: int = 1) -> None:
        if reason in self.counts or len(self.counts) < self.cap:
            self.counts[reason] += n
        else:
            self.other += n

    def to_dict(self) -> dict[str, int]:
        out = dict(self.counts.most_common())
        if self.other:
            out["(other)"] = self.other
        return out
