"""Resume and exactly-once: config checks on a rerun, and an interrupted run finished by a second one."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import yaml
from jobs_fixtures import (
    job_config,
    label_bytes,
    local_ray,  # noqa: F401 - module fixture
    rows_without_timing,
    shapes,
    tiny_model,
)

from pipeline import schema
from pipeline.config import dump_yaml, load_config
from pipeline.distribute import run_label_job
from pipeline.io import fs
from pipeline.outputs import OutputConflict, committed_shards, prepare_output, remove_temporaries
from pipeline.stages.write import LabelShardSink, RowContext
from pipeline.vocab import Vocabulary

ROOT = Path(__file__).resolve().parents[1]
VOCAB = Vocabulary.from_entries(["background", "red circle"], background=0)


def _cfg(out: Path, *overrides: str):
    return load_config(None, [f"output={out}", "input=shards/a.tar", *overrides])


def _commit(out: Path, shard: str) -> None:
    sink = LabelShardSink(str(out), shard, n_classes=2, context=RowContext("maskclip", "m", "h"))
    sink.add(0, "k", np.zeros((2, 2), np.uint8), np.ones((2, 2), np.float32))
    sink.commit()


def test_a_new_output_records_its_config_without_credentials(tmp_path):
    cfg = _cfg(tmp_path, "storage_options={key: AKIA, secret: s3cr3t, endpoint_url: 'http://127.0.0.1:9'}")
    assert prepare_output(cfg, VOCAB) == set()
    written = (tmp_path / schema.CONFIG_FILE).read_text()
    assert "AKIA" not in written and "s3cr3t" not in written
    assert yaml.safe_load(written)["storage_options"] == {"endpoint_url": "http://127.0.0.1:9"}


def test_a_rerun_with_an_equal_config_resumes_from_the_commit_markers(tmp_path):
    prepare_output(_cfg(tmp_path), VOCAB)
    _commit(tmp_path, "a")
    fs.put_atomic(fs.temp_name(str(tmp_path / schema.commit_path("b"))), b"{}")  # a marker being written
    fs.put_atomic(fs.temp_name(str(tmp_path / schema.labels_path("b"))), b"partial")
    # Execution keys (Ray address, actors, credentials) may change between attempts.
    again = _cfg(tmp_path, "distribute.num_actors=7", "distribute.address=ray://head:10001")
    assert prepare_output(again, VOCAB) == {"a"}
    assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == ["a.tar"]  # partial files removed
    assert sorted(p.name for p in (tmp_path / "_commits").iterdir()) == ["a.json"]


def test_a_rerun_with_another_config_is_refused_naming_the_keys(tmp_path):
    prepare_output(_cfg(tmp_path), VOCAB)
    _commit(tmp_path, "a")
    with pytest.raises(OutputConflict, match=r"differing keys: head\.name, infer\.conf_threshold\)"):
        prepare_output(_cfg(tmp_path, "infer.conf_threshold=0.3", "head.name=sclip", "distribute.num_cpus=4"), VOCAB)
    with pytest.raises(OutputConflict, match="different vocabulary"):
        (tmp_path / schema.VOCAB_FILE).write_text('{"classes": ["background", "cat"], "background": 0}')
        prepare_output(_cfg(tmp_path), VOCAB)
    assert committed_shards(str(tmp_path)) == {"a"}  # nothing was touched


def test_overwrite_replaces_a_run_with_another_config(tmp_path):
    prepare_output(_cfg(tmp_path), VOCAB)
    _commit(tmp_path, "a")
    assert prepare_output(_cfg(tmp_path, "infer.crop=64"), VOCAB, overwrite=True) == set()
    assert not (tmp_path / "labels/a.tar").exists()
    assert yaml.safe_load((tmp_path / schema.CONFIG_FILE).read_text())["infer"]["crop"] == 64


def test_committed_shards_without_a_run_config_are_not_adopted(tmp_path):
    _commit(tmp_path, "a")
    with pytest.raises(OutputConflict, match="no _run/config.yaml"):
        prepare_output(_cfg(tmp_path), VOCAB)
    assert remove_temporaries(str(tmp_path)) == 0


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.ray
def test_an_interrupted_run_resumes_to_the_output_of_an_uninterrupted_one(tmp_path, local_ray):  # noqa: F811
    model = tiny_model(tmp_path / "tiny-clip")
    urls = shapes(str(tmp_path / "in"), 6, 32)  # shards long enough that SIGTERM lands before the last one
    names = [schema.shard_name(u) for u in urls]
    reference = job_config(str(tmp_path / "in"), str(tmp_path / "reference"), model, "infer.batch_size=2")
    assert run_label_job(reference)["exit_code"] == 0

    # The same job as a command joined to this Ray cluster, stopped by SIGTERM once a shard is committed.
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(dump_yaml(dataclasses.replace(reference, output=str(out))))
    log = (tmp_path / "interrupted.log").open("w")
    address = ray.get_runtime_context().gcs_address
    command = [sys.executable, "-m", "jobs.label", str(config), "--address", address]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_for(lambda: committed_shards(str(out)) or proc.poll() is not None, 180, "the first committed shard")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143, (tmp_path / "interrupted.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    interrupted = fs.read_json(str(out / schema.SUMMARY_FILE))
    done = committed_shards(str(out))
    assert interrupted["interrupted"] and interrupted["exit_code"] == 143
    assert 1 <= len(done) < len(urls) and interrupted["shards"]["committed"] == len(done)
    assert not [p for p in out.rglob("_tmp.*")]
    markers = {n: (out / schema.commit_path(n)).read_bytes() for n in done}

    resumed = run_label_job(dataclasses.replace(reference, output=str(out)))
    assert resumed["exit_code"] == 0
    assert (resumed["shards"]["skipped"], resumed["shards"]["labelled"]) == (len(done), len(urls) - len(done))
    assert {n: (out / schema.commit_path(n)).read_bytes() for n in done} == markers  # committed shards untouched
    for name in names:
        assert label_bytes(str(out), name) == label_bytes(reference.output, name)
        assert rows_without_timing(str(out), name) == rows_without_timing(reference.output, name)
