"""Faults of a cluster's object store, injected by a proxy in front of the loopback S3 server
(`tests/faultproxy.py`): what the reader and the output folder do when the store answers 500/503,
resets connections, cuts responses, or serves a listing that is out of date."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import yaml
from bad_corpus import image_bytes, tar_bytes
from faultproxy import Fault, FaultProxy
from jobs_fixtures import (
    FAST,
    corrupt_image,
    job_config,
    label_bytes,
    local_ray,  # noqa: F401 - module fixture
    read_rows,
    shapes,
    tiny_model,
)

from jobs.cli import main as cli_main
from pipeline import schema
from pipeline.config import load_config
from pipeline.distribute import run_label_job
from pipeline.distribute.driver import ACTOR_PREFIX
from pipeline.io import fs
from pipeline.io.read import ReadStats, Sample, ShardReadError, iter_samples
from pipeline.outputs import committed_shards, prepare_output
from pipeline.retrain.lease import Taken
from pipeline.stages.write import LabelShardSink, RowContext, read_commit
from pipeline.vocab import Vocabulary

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 16_384  # s3fs block size in these tests: a small shard takes many ranged reads


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture
def proxy(s3):
    with FaultProxy(s3.endpoint_url) as running:
        yield running


def through(proxy: FaultProxy, s3) -> dict:
    """Storage options reaching S3 through the proxy, with the store client's own retries down to one
    retry, so faults reach our code (as they do on a real store once its retries are spent)."""
    return {
        **s3.storage_options,
        "endpoint_url": proxy.url,
        "default_block_size": BLOCK,
        "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}},
    }


def noisy_shard(url: str, n: int, storage_options: dict) -> int:
    """A shard of `n` incompressible 48 px PNGs (~7 kB each) at `url`; returns its size in bytes."""
    rng = np.random.default_rng(0)
    data = tar_bytes(
        [(f"{i:03d}.png", image_bytes(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))) for i in range(n)]
    )
    fs.put_atomic(url, data, storage_options)
    return len(data)


@pytest.mark.parametrize("kind", ["500", "503", "reset", "cut"])
def test_s3_failing_mid_shard_is_resumed_and_every_sample_is_read(s3, s3_root, proxy, kind):
    url = fs.join(s3_root, "in/shard-000000.tar")
    size = noisy_shard(url, 12, s3.storage_options)
    proxy.add(Fault(kind, method="GET", min_offset=BLOCK, times=12))  # after the first block; outlasts s3fs retries
    stats = ReadStats()
    records = list(iter_samples(url, through(proxy, s3), retry_s=30, stats=stats))
    assert [(type(r).__name__, r.key) for r in records] == [("Sample", f"{i:03d}") for i in range(12)]
    assert (stats.members, stats.end_of_archive) == (12, True) and 0.9 * size < stats.bytes <= size
    assert stats.resumed_reads >= 1


def test_s3_failing_longer_than_the_retry_window_raises_and_yields_no_failed_row(s3, s3_root, proxy):
    url = fs.join(s3_root, "in/shard-000000.tar")
    noisy_shard(url, 12, s3.storage_options)
    proxy.add(Fault("500", method="GET", min_offset=BLOCK, seconds=60))
    records = []
    with pytest.raises(ShardReadError, match=r"failed at byte \d+ for 1s: OSError: .*Internal Server Error"):
        records.extend(iter_samples(url, through(proxy, s3), retry_s=1))
    assert records and all(isinstance(r, Sample) for r in records) and len(records) < 12


@pytest.mark.parametrize("kind", ["500", "reset"])
def test_a_lease_check_whose_listing_fails_answers_not_taken(s3, s3_root, proxy, caplog, kind):
    """A retraining step's fine-tune stops when this check says its lease is taken; a store that fails
    to list the lease folder now (an error answer, or a reset connection, which the S3 client raises
    as its own error, not an OSError) says nothing about that: "not taken", and why."""
    folder = fs.join(s3_root, "leases")
    fs.put_atomic(fs.join(folder, "lease-000001.json"), b"{}", s3.storage_options)
    taken = Taken(folder, 0, through(proxy, s3))
    assert taken()  # generation 1 took over from 0
    fault = proxy.add(Fault(kind, method="GET", path=r"list-type=2"))  # every listing, retries included
    with caplog.at_level(logging.WARNING, logger="pipeline.retrain.lease"):
        assert not taken()
    assert "could not list" in caplog.text and fault.hits >= 1
    proxy.clear()
    assert taken()  # the store answers again


def _remove_from_another_process(url: str, endpoint: str) -> None:
    """Delete `url` on S3 from a separate process, as another job or an operator would."""
    code = (
        "import sys, fsspec; fsspec.filesystem('s3', client_kwargs={'endpoint_url': sys.argv[1]}, key='testing', "
        "secret='testing', skip_instance_cache=True).rm(sys.argv[2])"
    )
    subprocess.run([sys.executable, "-c", code, endpoint, url], check=True, timeout=60)


def test_a_marker_removed_by_another_process_is_seen_as_gone_in_the_same_process(s3, s3_root):
    options = dict(s3.storage_options)
    cfg = load_config(None, [f"output={s3_root}/out", "input=shards/a.tar"])
    cfg = dataclasses.replace(cfg, storage_options=options)
    vocab = Vocabulary.from_entries(["background", "red circle"], background=0)
    prepare_output(cfg, vocab)
    for shard in ("a", "b"):
        sink = LabelShardSink(
            cfg.output, shard, n_classes=2, context=RowContext("maskclip", "m", "h"), storage_options=options
        )
        sink.add(0, "k", np.zeros((2, 2), np.uint8), np.ones((2, 2), np.float32))
        sink.commit()
    marker = fs.join(cfg.output, schema.commit_path("b"))
    assert prepare_output(cfg, vocab) == {"a", "b"} and fs.exists(marker, options)  # listings now cached
    _remove_from_another_process(marker, s3.endpoint_url)
    assert not fs.exists(marker, options)
    assert committed_shards(cfg.output, options) == {"a"}
    assert prepare_output(cfg, vocab) == {"a"}
    with pytest.raises(FileNotFoundError):
        read_commit(cfg.output, "b", options)
    _remove_from_another_process(fs.join(cfg.output, schema.commit_path("a")), s3.endpoint_url)
    assert fs.listdir(fs.join(cfg.output, schema.COMMITS_DIR), options) == []


@pytest.mark.ray
def test_a_store_failing_longer_than_the_retries_fails_the_shard_and_a_rerun_completes_it(
    tmp_path,
    s3,
    s3_root,
    proxy,
    model,
    local_ray,  # noqa: F811
):
    """Item: no hole after a read error. Shard b's store answers 500 past the first block for longer
    than the read and shard retries: b is not committed, the run exits 1 naming it; a rerun once the
    store is back commits b with every sample, and the summary counts the whole output (a's failed
    row from the first run included)."""
    local = tmp_path / "in"
    urls = shapes(str(local), 2, 24)
    corrupt_image(urls[0], "000000_000003")
    for path in sorted(local.iterdir()):
        fs.put_atomic(fs.join(s3_root, "in", path.name), path.read_bytes(), s3.storage_options)
    options = through(proxy, s3)
    cfg = job_config(
        fs.join(s3_root, "in"),
        str(tmp_path / "out"),
        model,
        "distribute.read_retry_s=1",
        "distribute.max_retries=1",
        storage_options=options,
    )
    a, b = (schema.shard_name(u) for u in urls)
    proxy.add(Fault("500", method="GET", path=f"/in/{b}.tar", min_offset=BLOCK, seconds=600))

    first = run_label_job(cfg)
    assert first["exit_code"] == 1
    assert first["shards"] | {"committed": 1, "failed": 1} == first["shards"]
    (failed,) = first["failed_shards"]
    assert failed["shard"] == b and failed["attempts"] == 2 and "Internal Server Error" in failed["error"]
    assert committed_shards(cfg.output) == {a}
    assert not (tmp_path / "out" / schema.labels_path(b)).exists()
    assert (first["samples"]["ok"], first["samples"]["failed"]) == (23, 1)

    proxy.clear()
    second = run_label_job(cfg)
    assert second["exit_code"] == 0 and second["shards"] | {"committed": 2, "skipped": 1} == second["shards"]
    assert (second["samples"]["ok"], second["samples"]["failed"]) == (47, 1)  # the whole output, not this run
    assert (second["labelled_now"]["ok"], second["labelled_now"]["failed"]) == (24, 0)
    assert fs.read_json(str(tmp_path / "out" / schema.SUMMARY_FILE)) == second
    marker = read_commit(cfg.output, b)
    with tarfile.open(urls[1]) as tar:
        members = len(tar.getmembers())
    assert marker["read"] | {"members": members, "samples": 24, "end_of_archive": True} == marker["read"]
    rows = read_rows(cfg.output, b)
    assert [r["key"] for r in rows] == [f"000001_{i:06d}" for i in range(24)] and {r["status"] for r in rows} == {"ok"}
    assert len(label_bytes(cfg.output, b)) == 2 * 24


@pytest.mark.ray
def test_an_actor_dying_while_its_model_loads_is_replaced(tmp_path, model, local_ray):  # noqa: F811
    shapes(str(tmp_path / "in"), 2, 4)
    cfg = job_config(str(tmp_path / "in"), str(tmp_path / "out"), model)
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(run_label_job(cfg)))
    runner.start()
    killed = False
    deadline = time.monotonic() + 120
    while not killed and time.monotonic() < deadline and runner.is_alive():
        named = [n for n in ray.util.list_named_actors() if n.startswith(ACTOR_PREFIX)]
        if named and not (tmp_path / "out" / schema.VOCAB_FILE).exists():  # created, its model not up yet
            ray.kill(ray.get_actor(named[0]))
            killed = True
        time.sleep(0.01)
    runner.join(timeout=180)
    assert killed, "the job finished before its actor could be killed"
    assert result["exit_code"] == 0 and result["shards"]["committed"] == 2
    assert (result["actors"]["started"], result["actors"]["ready"]) == (2, 1)


@pytest.mark.ray
def test_actors_that_all_die_while_their_model_loads_stop_the_job_after_the_start_up_budget(
    tmp_path,
    model,
    capsys,
    local_ray,  # noqa: F811
):
    # The weights are a FIFO nobody writes: every actor blocks loading them, so each is killed mid-load.
    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    (folder / "weights.safetensors").unlink()
    os.mkfifo(folder / "weights.safetensors")
    shapes(str(tmp_path / "in"), 3, 2)
    args = [f"input={tmp_path}/in", f"output={tmp_path}/out", f"model.name={folder}", *FAST, "distribute.max_retries=1"]
    code: list[int] = []
    runner = threading.Thread(target=lambda: code.append(cli_main(["label", *args])))
    runner.start()
    killed: set[str] = set()
    deadline = time.monotonic() + 120
    while runner.is_alive() and time.monotonic() < deadline:
        for name in set(ray.util.list_named_actors()) - killed:
            if name.startswith(ACTOR_PREFIX):
                ray.kill(ray.get_actor(name))
                killed.add(name)
        time.sleep(0.05)
    runner.join(timeout=30)
    assert code == [1]  # the cluster could not run the model: a failed run, not bad config (2)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("clipdense")]
    assert len(err) == 1, err
    assert err[0].startswith("clipdense label: error: the labeling model could not start: all 2 actors died while ")
    assert len(killed) == 2  # 1 actor x (1 + max_retries), not one load per shard attempt (1 + 3 x 2)


@pytest.mark.parametrize("kind", ["a file", "under a file", "a read-only bucket"])
def test_an_unwritable_output_is_one_line_exit_2_and_nothing_written(tmp_path, s3, s3_root, proxy, kind):
    shapes(str(tmp_path / "in"), 1, 2)
    options = None
    if kind == "a file":
        (tmp_path / "taken").write_text("a file")
        output = str(tmp_path / "taken")
    elif kind == "under a file":
        (tmp_path / "taken").write_text("a file")
        output = str(tmp_path / "taken/out")
    else:
        proxy.add(Fault("403", method="PUT", seconds=600))
        options = {**s3.storage_options, "endpoint_url": proxy.url}
        output = fs.join(s3_root, "out")
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump({"input": str(tmp_path / "in"), "output": output, "storage_options": options or {}})
    )

    done = subprocess.run(
        [sys.executable, "-m", "jobs.label", str(config)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )

    assert done.returncode == 2 and done.stdout == ""
    err = done.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"clipdense label: error: output {output} ")
    assert "Traceback" not in err[0]
    if kind == "a read-only bucket":
        assert fs.listdir(s3_root, s3.storage_options) == []
    else:
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "run.yaml", "taken"]
        assert (tmp_path / "taken").read_text() == "a file"


@pytest.mark.parametrize(
    ("command", "env", "reason"),
    [
        ("label", {}, "Unable to locate credentials"),
        ("label", {"AWS_PROFILE": "no-such-profile"}, "The config profile (no-such-profile) could not be found"),
        ("review", {}, "Unable to locate credentials"),
    ],
)
def test_missing_storage_credentials_are_one_line_and_exit_2(tmp_path, s3, s3_root, command, env, reason):
    """No credentials anywhere (no keys, no profile file, no metadata service): one line that says so
    and how to give them, no traceback; the endpoint is the loopback server, so nothing leaves it."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    clean |= {
        "AWS_ENDPOINT_URL": s3.endpoint_url,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        **env,
    }
    args = {
        "label": ["label", os.devnull, f"input={s3_root}/in/a.tar", f"output={s3_root}/out"],
        "review": ["review", f"{s3_root}/out"],
    }
    done = subprocess.run(
        [sys.executable, "-m", "jobs.cli", *args[command]],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1, done.stderr
    assert err[0].startswith(f"clipdense {command}: error: object storage credentials: {reason} (set AWS_ACCESS_KEY_ID")
    assert fs.listdir(s3_root, s3.storage_options) == []


KEY_ID, SECRET = "AKIDCLIPDENSE7Q3XW", "s3cr3t-clipdense-9f2b61"  # moto takes any credentials


@pytest.mark.ray
@pytest.mark.slow
def test_no_credential_is_printed_logged_or_written_by_any_command(tmp_path, s3, s3_root, model):
    """Everything the commands print (debug logging on) and everything a label run writes, on S3 and
    in its Ray session's logs, is searched for the credential values of `storage_options`."""
    options = {"endpoint_url": s3.endpoint_url, "key": KEY_ID, "secret": SECRET}
    shapes(str(tmp_path / "in"), 1, 3)
    filesystem, root = fs.url_to_fs(s3_root, s3.storage_options)
    filesystem.put(str(tmp_path / "in") + "/", f"{root}/in/", recursive=True)
    settings = {"input": f"{s3_root}/in", "output": f"{s3_root}/out", "storage_options": options}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(settings))
    ray_tmp = tempfile.mkdtemp(prefix="cdr", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    fast = [f"model.name={model}", "prompts.templates=single", "distribute.num_actors=1", "distribute.num_cpus=1"]
    commands = [
        ["config", "show", str(config)],
        ["label", str(config), *fast],
        ["label", str(config), *fast, "infer.no_such_key=1"],  # an error message
        ["label", str(config), *fast, "model.name=ViT-B-16"],  # a refused resume names the differing keys
    ]
    printed = ""
    try:
        for args in commands:
            done = subprocess.run(
                [sys.executable, "-m", "jobs.cli", "-v", *args],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            printed += done.stdout + done.stderr
        assert "***" in printed and "committed" in printed and "no_such_key" in printed  # the commands ran
        written = {path: filesystem.cat_file(path) for path in filesystem.find(f"{root}/out")}
        assert any(p.endswith(".json") and "_commits" in p for p in written)
        session_files = [p for p in Path(ray_tmp).rglob("*") if p.is_file()]
        assert any("logs" in p.parts for p in session_files)
        for value in (KEY_ID, SECRET):
            assert value not in printed
            assert [p for p, data in written.items() if value.encode() in data] == []
            assert [p for p in session_files if value.encode() in p.read_bytes()] == []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.ray
def test_a_second_run_in_the_same_process_relabels_a_shard_whose_marker_was_removed(
    tmp_path,
    s3,
    s3_root,
    model,
    local_ray,  # noqa: F811
):
    """The case of ../shared/cases/robustness/11: run, remove a marker from another process, run again
    in the same process against the S3 server: the shard is relabelled, not reported as committed."""
    options = dict(s3.storage_options)
    shapes(str(tmp_path / "in"), 3, 2)
    filesystem, root = fs.url_to_fs(s3_root, options)
    filesystem.put(str(tmp_path / "in") + "/", f"{root}/in/", recursive=True)
    cfg = job_config(f"{s3_root}/in", f"{s3_root}/out", model, storage_options=options)
    first = run_label_job(cfg)
    assert first["exit_code"] == 0 and first["shards"]["labelled"] == 3
    _remove_from_another_process(fs.join(cfg.output, schema.commit_path("shapes-000001")), s3.endpoint_url)

    second = run_label_job(cfg)

    assert second["exit_code"] == 0
    assert second["shards"] | {"committed": 3, "skipped": 2, "labelled": 1} == second["shards"]
    assert committed_shards(cfg.output, options) == {"shapes-000000", "shapes-000001", "shapes-000002"}
    assert read_commit(cfg.output, "shapes-000001", options)["stats"]["pid"] > 0
