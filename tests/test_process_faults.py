"""Process faults of the labeling command, run as an operator runs it (`python -m jobs.cli label` in
its own process): a signal while Ray starts, and a driver killed outright while its actors label,
on its embedded Ray instance or on a cluster it joined (`--address`)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection
from pathlib import Path

import pytest
from jobs_fixtures import read_rows, shapes, tiny_model
from procs import alive, cmdline, comm, descendants, wait_for
from ray_head import RayHead, ray_head  # noqa: F401 - module fixture

from pipeline import schema
from pipeline.io import fs
from pipeline.outputs import committed_shards

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_model(tmp_path_factory.mktemp("model"))


def _start(
    tmp_path: Path, model: str, *overrides: str, cluster: RayHead | None = None, log: Path | None = None
) -> subprocess.Popen:
    """The label command in its own process, joining `cluster` with `--address` when given; its output
    to pipes (for `communicate`), or to `log` for a driver that is killed instead (a full pipe nobody
    reads would block it)."""
    args = [f"model.name={model}", "prompts.templates=single", "distribute.num_actors=1", "distribute.num_cpus=1"]
    command = [sys.executable, "-m", "jobs.cli", "label", *(["--address", cluster.address] if cluster else [])]
    command += [f"input={tmp_path}/in", f"output={tmp_path}/out", *args, *overrides]
    env = os.environ | (cluster.env if cluster else {})
    if log is None:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with log.open("w") as out:
        return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _label_until_a_commit(tmp_path: Path, model: str, cluster: RayHead | None) -> tuple[list[str], subprocess.Popen]:
    """6 shards of 24 scenes, and a driver labelling them one image at a time (its output to a file)
    once it has committed a first shard."""
    urls = shapes(str(tmp_path / "in"), 6, 24)
    commits = tmp_path / "out" / schema.COMMITS_DIR
    driver = _start(tmp_path, model, "infer.batch_size=1", cluster=cluster, log=tmp_path / "driver.log")
    wait_for(lambda: commits.exists() and any(commits.glob("*.json")), 180, "a first commit")
    return urls, driver


def _kill_mid_run(driver: subprocess.Popen, processes: Collection[int], output: Path) -> set[str]:
    """SIGKILL the driver of a run of 6 shards: `processes` end within 10 s and no shard commits after
    them, with some left to label. Returns the committed shards."""
    driver.kill()
    driver.wait(timeout=30)
    killed_at = time.monotonic()
    wait_for(lambda: not any(map(alive, processes)), 30, "the driver's Ray processes to end")
    gone_after_s = time.monotonic() - killed_at
    committed = committed_shards(str(output))
    time.sleep(2)
    assert committed_shards(str(output)) == committed  # nothing labels on after the driver
    assert gone_after_s < 10 and len(committed) < 6
    return committed


def _rerun_completes(tmp_path: Path, model: str, urls: list[str], committed: set[str], cluster: RayHead | None) -> None:
    """The same command again labels the shards left over, every sample once, and leaves no temporary file."""
    rerun = _start(tmp_path, model, "infer.batch_size=1", cluster=cluster)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    summary = json.loads((tmp_path / "out" / schema.SUMMARY_FILE).read_text())
    assert summary["shards"] | {"committed": len(urls), "skipped": len(committed)} == summary["shards"]
    for url in urls:
        rows = read_rows(str(tmp_path / "out"), schema.shard_name(url))
        assert [r["key"] for r in rows] == [f"{schema.shard_name(url)[-6:]}_{i:06d}" for i in range(24)]
    assert not any(p.name.startswith(fs.TEMP_PREFIX) for p in (tmp_path / "out").rglob("*"))


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_ray_starts_gives_the_documented_exit_code_and_one_message(tmp_path, model, sig, code):
    shapes(str(tmp_path / "in"), 2, 2)
    driver = _start(tmp_path, model)
    wait_for(lambda: any(comm(p) == "gcs_server" for p in descendants(driver.pid)), 120, "Ray to start")
    driver.send_signal(sig)
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == code, err
    assert "Traceback" not in err and "interrupted: rerun the same command" in out
    summary = fs.read_json(str(tmp_path / "out" / schema.SUMMARY_FILE))
    assert summary["exit_code"] == code and summary["interrupted"] and summary["shards"]["not_started"] == 2
    assert committed_shards(str(tmp_path / "out")) == set()


def test_a_killed_driver_takes_its_embedded_ray_instance_with_it_and_a_rerun_completes(tmp_path, model):
    urls, driver = _label_until_a_commit(tmp_path, model, cluster=None)
    ray_processes = set(descendants(driver.pid))
    assert any(comm(p) == "raylet" for p in ray_processes)
    committed = _kill_mid_run(driver, ray_processes, tmp_path / "out")
    _rerun_completes(tmp_path, model, urls, committed, cluster=None)


def test_a_killed_driver_on_a_cluster_has_its_actors_ended_by_the_cluster_and_a_rerun_completes(
    tmp_path,
    model,
    ray_head,  # noqa: F811
):
    """With `--address` there is no reaper: the cluster itself ends the actors of a driver that is gone
    (they are not detached), and it lives on for the rerun."""
    urls, driver = _label_until_a_commit(tmp_path, model, cluster=ray_head)
    actors = [p for p in descendants(ray_head.pid) if "ray::LabelActor" in cmdline(p)]
    assert actors, f"no label actor among the cluster's processes: {[cmdline(p) for p in descendants(ray_head.pid)]}"
    assert not any(comm(p) == "raylet" for p in descendants(driver.pid))  # it joined; it started no Ray
    committed = _kill_mid_run(driver, actors, tmp_path / "out")
    assert alive(ray_head.pid) and any(comm(p) == "gcs_server" for p in descendants(ray_head.pid))

    _rerun_completes(tmp_path, model, urls, committed, cluster=ray_head)


def test_a_driver_whose_ray_token_authentication_differs_from_the_cluster_is_told_so(
    tmp_path,
    model,
    ray_head,  # noqa: F811
):
    """The cluster runs without token authentication; a driver with it has its actors cancelled, which
    Ray reports without a cause."""
    shapes(str(tmp_path / "in"), 1, 2)
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0123456789abcdef0123456789abcdef"}
    driver = _start(tmp_path, model, cluster=dataclasses.replace(ray_head, env=token))
    _, err = driver.communicate(timeout=300)
    assert driver.returncode == 1, err  # a run that could not start its model, as when the model is too big
    (line,) = [x for x in err.splitlines() if x.startswith("clipdense label: error:")]
    assert "cancelled" in line and "token authentication differs" in line and "Traceback" not in err
    assert "RAY_AUTH_MODE=token here" in line
    assert committed_shards(str(tmp_path / "out")) == set()
