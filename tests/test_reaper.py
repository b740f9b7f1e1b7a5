"""The reaper of an embedded Ray instance: `connect` never leaves one behind (nor its token in the
environment)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import ray

from pipeline.distribute import reaper
from pipeline.distribute.job import connect, disconnect

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
