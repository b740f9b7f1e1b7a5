"""`clipdense submit` against a real Ray head (dashboard + Jobs API) that the tests start on 127.0.0.1
(`ray_head.ray_head`)."""

from __future__ import annotations

import pytest
from jobs_fixtures import FAST, shapes, tiny_model
from ray_head import ray_head  # noqa: F401 - module fixture

from jobs.cli import main
from pipeline import schema
from pipeline.io import fs
from pipeline.outputs import committed_shards


def test_a_config_error_is_reported_before_anything_is_submitted(capsys):
    argv = ["submit", "--address", "http://127.0.0.1:9", "input=a.tar", "output=out", "infer.bacth_size=4"]
    assert main(argv) == 2
    assert "unknown config key 'infer.bacth_size'" in capsys.readouterr().err


@pytest.mark.ray
def test_submit_runs_the_job_on_the_cluster_and_follows_it(tmp_path, capsys, ray_head):  # noqa: F811
    model = tiny_model(tmp_path / "tiny-clip")
    shapes(str(tmp_path / "in"), 2, 4)
    config = tmp_path / "run.yaml"
    config.write_text(f"input: {tmp_path}/in\noutput: {tmp_path}/out\n")

    assert main(["submit", "--address", ray_head.dashboard, str(config), f"model.name={model}", *FAST]) == 0

    printed = capsys.readouterr().out
    assert "shards: 2/2 committed" in printed and "SUCCEEDED" in printed  # the job's own summary, followed
    assert committed_shards(str(tmp_path / "out")) == {"shapes-000000", "shapes-000001"}
    assert fs.read_json(str(tmp_path / "out" / schema.SUMMARY_FILE))["exit_code"] == 0


@pytest.mark.ray
def test_submit_exits_with_the_failed_jobs_status(tmp_path, capsys, ray_head):  # noqa: F811
    (tmp_path / "in").mkdir()
    (tmp_path / "in/a.tar").write_bytes(b"")  # no vocabulary.json beside it: the job refuses to start

    assert main(["submit", "--address", ray_head.dashboard, f"input={tmp_path}/in", f"output={tmp_path}/out"]) == 2

    printed = capsys.readouterr()
    assert "no vocabulary" in printed.out + printed.err and "FAILED" in printed.out
