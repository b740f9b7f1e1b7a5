"""A real Ray head (GCS, raylet, dashboard + Jobs API) that a test module starts on 127.0.0.1.

The head runs in `ray start --head --block`, started in its own session and stopped by signalling
that one process: it takes down exactly the processes it started, never another Ray on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _jobs_api_ready(url: str) -> bool:
    from ray.job_submission import JobSubmissionClient

    try:
        JobSubmissionClient(url).list_jobs()  # through the client: it carries Ray's auth token, if any
        return True
    except Exception:  # connection refused, dashboard still starting: not ready yet
        return False


@dataclass(frozen=True)
class RayHead:
    dashboard: str  # URL of the dashboard and its Jobs API (`clipdense submit --address`)
    address: str  # host:port of its GCS (`clipdense label --address`)
    pid: int  # the `ray start --block` process: the cluster's processes descend from it
    # what a process that joins it needs in its environment: a process that ran `ray.init` before
    # (as the test process may have) holds RAY_AUTH_MODE=token, and its children inherit it
    env: dict[str, str]


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    """A fresh single-node Ray cluster with 2 CPUs."""
    pytest.importorskip("ray.job_submission", reason="the Ray Jobs API needs ray[default]")
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's unix socket paths live below it
    dashboard = _free_port()
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
        "--port", str(port := _free_port()),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
        "--dashboard-agent-listen-port", str(_free_port()), "--ray-client-server-port", str(_free_port()),
        "--num-cpus", "2", "--temp-dir", temp, "--disable-usage-stats",
    ]  # fmt: skip
    # a loopback test cluster without auth; else Ray turns token auth on if ~/.ray has a token
    client = {"RAY_AUTH_MODE": "disabled"}
    env = os.environ | client
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # stop at once on SIGTERM (no drain wait)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # `python` = this one
    log_path = Path(temp) / "head.log"
    with log_path.open("w") as log:
        head = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _jobs_api_ready(url):
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"the Ray dashboard could not start here: {log_path.read_text()[-1500:]}")
            time.sleep(0.5)
        yield RayHead(url, f"127.0.0.1:{port}", head.pid, client)
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # the head's own session: only what it started
            head.wait(timeout=10)
        shutil.rmtree(temp, ignore_errors=True)
