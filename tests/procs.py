"""Process-table helpers for the tests that kill drivers and watch what they leave (Linux /proc)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from pipeline.distribute.reaper import descendants


def comm(pid: int) -> str:
    """The process's command name ("raylet", "gcs_server", ...), or "" when it is gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def cmdline(pid: int) -> str:
    """The process's command line, arguments joined by spaces (a Ray worker's names its actor class), or ""."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


__all__ = ["alive", "cmdline", "comm", "descendants", "wait_for"]
