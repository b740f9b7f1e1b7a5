"""An embedded Ray instance never outlives the driver that started it.

`ray.init()` without an address starts a local instance (GCS, raylet, agents, workers). When the
driver ends normally it shuts them down; when it is killed (SIGKILL, the OOM killer) they lived on:
actors kept labelling and committing shards, agents were alive 40 s later. So before starting such
an instance the driver starts a reaper, a small process (no Ray, no torch) that only waits for the
driver: it holds the read end of a pipe whose write end only the driver has, so the read returns
when the driver is gone, however it went. The reaper then stops the instance's processes: SIGTERM,
and SIGKILL after `GRACE_S`. They are found two ways, because Ray's own fate-sharing kills GCS and
raylet with the driver and so orphans their children: every process that carries the driver's token
in its environment (set before `ray.init`: GCS, raylet and every worker inherit it, whoever their
parent is by then), and every descendant of those seen in the reaper's snapshots, one per
`SNAPSHOT_S` (the raylet's agents, which it starts with an environment of its own). Only Ray's part
of the driver's tree is watched: a notebook, service or retrain step that dies leaves the other
processes it started alone.

A driver that joins a cluster (`--address`, `RAY_ADDRESS`) starts no reaper: the cluster's own GCS
ends the job's actors when it sees their owner gone. Linux only (it reads `/proc`); elsewhere the
embedded instance's own shutdown hooks are all there is.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)

ENV = "CLIPDENSE_RAY_OWNER"  # environment variable naming the driver a process belongs to
GRACE_S = 3.0  # between SIGTERM and SIGKILL
SNAPSHOT_S = 1.0  # between two looks at the driver's process tree
_DONE = b"done"  # written by a driver that shut its instance down itself


class Reaper:
    """Start before `ray.init(address="local")`; call `release()` after `ray.shutdown()`."""

    def __init__(self) -> None:
        self.token = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        env = {k: v for k, v in os.environ.items() if k != ENV}
        self._process = subprocess.Popen(
            [sys.executable, __file__, self.token],  # a script: importing the package would load Ray
            stdin=subprocess.PIPE,
            env=env,
            start_new_session=True,  # a Ctrl-C in the terminal reaches the driver, not the reaper
        )
        os.environ[ENV] = self.token  # inherited by every process Ray starts from here on

    def started(self) -> None:
        """Ray is up: processes started later by this driver (not by Ray) no longer get the token."""
        os.environ.pop(ENV, None)

    def release(self) -> None:
        """The instance is shut down: the reaper exits without stopping anything."""
        os.environ.pop(ENV, None)
        try:
            self._process.stdin.write(_DONE)
            self._process.stdin.close()
            self._process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired) as exc:  # it cannot act on a live driver anyway
            logger.debug("reaper %d: %s", self._process.pid, exc)


def owned_processes(token: str) -> set[int]:
    """PIDs of the processes whose environment holds `ENV=token` (other users' are unreadable and skipped)."""
    return {pid for pid in _pids() if _owned(pid, token)}


def ray_processes(driver: int, token: str) -> dict[int, str]:
    """The driver's descendants that belong to its Ray instance, as {pid: start time}: those carrying
    `token` (GCS, raylet, workers) and everything below them (the raylet's agents), nothing else."""
    children = _children()
    found: dict[int, str] = {}
    for pid, start in descendants(driver, children).items():
        if pid not in found and _owned(pid, token):
            found[pid] = start
            found |= descendants(pid, children)
    return found


def descendants(root: int, children: dict[int, list[int]] | None = None) -> dict[int, str]:
    """Live descendants of `root` as {pid: start time} (the start time tells a reused pid apart);
    `children` is a snapshot from `_children()`, taken here when not given."""
    children = _children() if children is None else children
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            stat = _stat(child)
            if stat is not None:
                found[child] = stat[19]
                todo.append(child)
    return found


def stop(pids: set[int], grace_s: float = GRACE_S) -> None:
    """SIGTERM `pids`, then SIGKILL those still alive after `grace_s`."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_stat(pid) for pid in pids):
        time.sleep(0.1)
    for pid in pids:
        _signal(pid, signal.SIGKILL)


def _pids() -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and int(e.name) != os.getpid()]


def _children() -> dict[int, list[int]]:
    """Live processes by parent pid."""
    children: dict[int, list[int]] = {}
    for pid in _pids():
        stat = _stat(pid)
        if stat is not None:
            children.setdefault(int(stat[1]), []).append(pid)
    return children


def _owned(pid: int, token: str) -> bool:
    try:
        return f"{ENV}={token}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:  # gone meanwhile, or not ours to read
        return False


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None when gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else fields


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def main(token: str) -> int:
    """Watch the driver (the parent) until stdin ends; unless it said it shut Ray down, stop Ray's processes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    driver, seen, data = os.getppid(), {}, b""
    while True:
        ready, _, _ = select.select([sys.stdin.buffer], [], [], SNAPSHOT_S)
        if not ready:
            seen |= ray_processes(driver, token)
            continue
        chunk = os.read(sys.stdin.fileno(), 64)
        if not chunk:
            break
        data += chunk
    if data == _DONE:
        return 0
    pids = owned_processes(token) | {pid for pid, start in seen.items() if (_stat(pid) or [None] * 20)[19] == start}
    stop(pids)
    if pids:
        print(
            f"clipdense: the driver ({token}) is gone; stopped {len(pids)} processes of its Ray instance",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
