"""The reaper of an embedded Ray instance: `connect` never leaves one behind (nor its token in the
environment), and a driver that dies takes only its Ray processes with it, not the other processes
it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from procs import alive, comm, wait_for

from pipeline.distribute import reaper
from pipeline.distribute.job import connect, disconnect

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _reapers() -> set[int]:
    """Live reaper processes started by this process."""
    found = set()
    for pid in reaper.descendants(os.getpid()):
        try:
            if reaper.__file__.encode() in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"):
                found.add(pid)
        except OSError:
            continue
    return found


def test_a_ray_start_that_fails_releases_its_reaper_and_token(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "file"))  # Ray cannot make its session folder under a file
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(NotADirectoryError):
        connect("")
    assert not ray.is_initialized()
    assert reaper.ENV not in os.environ  # a later subprocess is not marked for a reaper
    assert _reapers() == set()


def test_a_second_connect_after_a_plain_ray_shutdown_leaves_one_reaper(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert connect("")
    (first,) = _reapers()
    ray.shutdown()  # not `disconnect`: the first reaper is still waiting
    try:
        assert connect("")
        assert first not in _reapers() and len(_reapers()) == 1
    finally:
        disconnect()
    assert _reapers() == set() and reaper.ENV not in os.environ


_DRIVER = """
import subprocess, sys, time
from pipeline.distribute.job import connect
connect("")
other = subprocess.Popen(["sleep", "300"])  # the driver's own work, not Ray's
print(other.pid, flush=True)
time.sleep(600)
"""


def test_a_killed_driver_takes_its_ray_processes_but_not_its_other_children(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    other = int(driver.stdout.readline())
    try:
        time.sleep(3 * reaper.SNAPSHOT_S)  # the reaper has looked at the driver's tree since `other` started
        ray_pids = set(reaper.descendants(driver.pid)) - {other}  # with the driver's reaper, which ends too
        assert any(comm(p) == "raylet" for p in ray_pids)
        driver.kill()
        driver.wait(timeout=30)
        wait_for(lambda: not any(alive(p) for p in ray_pids), 20, "Ray's processes to end")
        assert alive(other)
    finally:
        os.kill(other, signal.SIGKILL)
        driver.kill()
