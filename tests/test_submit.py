"""`clipdense submit` against a real Ray head (dashboard + Jobs API) that the tests start on 127.0.0.1.

The head runs in `ray start --head --block`, started in its own session and stopped by signalling
that one process: it takes down exactly the processes it started, never another Ray on the machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jobs_fixtures import FAST, shapes, tiny_model

from jobs.cli import main
from pipeline import schema
from pipeline.io import fs
from pipeline.outputs import committed_shards

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


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """Dashboard URL of a fresh single-node Ray cluster with 2 CPUs."""
    pytest.importorskip("ray.job_submission", reason="the Ray Jobs API needs ray[default]")
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's unix socket paths live below it
    dashboard = _free_port()
    command = [
        str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
        "--port", str(_free_port()),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
        "--dashboard-agent-listen-port", str(_free_port()), "--ray-client-server-port", str(_free_port()),
        "--num-cpus", "2", "--temp-dir", temp, "--disable-usage-stats",
    ]  # fmt: skip
    env = os.environ | {
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # stop at once on SIGTERM (no drain wait)
        "RAY_AUTH_MODE": "disabled",  # a loopback test cluster; else Ray turns token auth on if ~/.ray has a token
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` = this one
    }
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
        yield url
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # the head's own session: only what it started
            head.wait(timeout=10)


def test_a_config_error_is_reported_before_anything_is_submitted(capsys):
    argv = ["submit", "--address", "http://127.0.0.1:9", "input=a.tar", "output=out", "infer.bacth_size=4"]
    assert main(argv) == 2
    assert "unknown config key 'infer.bacth_size'" in capsys.readouterr().err


@pytest.mark.ray
def test_submit_runs_the_job_on_the_cluster_and_follows_it(tmp_path, capsys, ray_head):
    model = tiny_model(tmp_path / "tiny-clip")
    shapes(str(tmp_path / "in"), 2, 4)
    config = tmp_path / "run.yaml"
    config.write_text(f"input: {tmp_path}/in\noutput: {tmp_path}/out\n")

    assert main(["submit", "--address", ray_head, str(config), f"model.name={model}", *FAST]) == 0

    printed = capsys.readouterr().out
    assert "shards: 2/2 committed" in printed and "SUCCEEDED" in printed  # the job's own summary, followed
    assert committed_shards(str(tmp_path / "out")) == {"shapes-000000", "shapes-000001"}
    assert fs.read_json(str(tmp_path / "out" / schema.SUMMARY_FILE))["exit_code"] == 0


@pytest.mark.ray
def test_submit_exits_with_the_failed_jobs_status(tmp_path, capsys, ray_head):
    (tmp_path / "in").mkdir()
    (tmp_path / "in/a.tar").write_bytes(b"")  # no vocabulary.json beside it: the job refuses to start

    assert main(["submit", "--address", ray_head, f"input={tmp_path}/in", f"output={tmp_path}/out"]) == 2

    printed = capsys.readouterr()
    assert "no vocabulary" in printed.out + printed.err and "FAILED" in printed.out
