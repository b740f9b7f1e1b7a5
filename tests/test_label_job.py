"""The labeling job: the per-shard worker in-process, then whole runs on a local Ray with the tiny model."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import yaml
from bad_corpus import corrupt_header
from jobs_fixtures import (
    corrupt_image,
    job_config,
    local_ray,  # noqa: F401 - module fixture,
    read_labels,
    read_rows,
    replace_image,
    replace_member,
    shapes,
    tiny_model,
)
from PIL import Image

from jobs.cli import main
from jobs.label import format_summary
from pipeline import schema
from pipeline.config import DistributeCfg, load_config
from pipeline.distribute import run_label_job
from pipeline.distribute.driver import ACTOR_PREFIX, actor_resources
from pipeline.distribute.progress import Progress
from pipeline.io import fs
from pipeline.io.read import Sample, SampleError, iter_samples
from pipeline.stages.shard import ShardLabeler, ShardReadError
from pipeline.vocab import Vocabulary, load_vocabulary


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return tiny_model(tmp_path_factory.mktemp("model") / "tiny-clip")


def _png_shape(data: bytes) -> tuple[int, int]:
    return np.array(Image.open(io.BytesIO(data))).shape


def _no_address(reason: str) -> str:
    """Pillow's messages name the in-memory file object (`<_io.BytesIO object at 0x7f...>`)."""
    return re.sub(r" at 0x[0-9a-f]+", "", reason)


def _input_samples(url: str, storage_options: dict | None = None) -> list[Sample | SampleError]:
    return list(iter_samples(url, storage_options))


# --- the per-shard worker, no Ray ---------------------------------------------------------------


def test_shard_worker_writes_one_row_per_sample_in_order_at_original_sizes(tmp_path, model):
    (url,) = shapes(str(tmp_path / "in"), 1, 7)
    replace_image(url, "000000_000002", (40, 56))
    corrupt_image(url, "000000_000004")
    cfg = job_config(url, str(tmp_path / "out"), model, "infer.batch_size=3")
    vocab = load_vocabulary(str(tmp_path / "in/vocabulary.json"))
    marker = ShardLabeler(cfg, vocab)(url)

    inputs = _input_samples(url)
    rows = read_rows(cfg.output, "shapes-000000")
    assert [r["key"] for r in rows] == [s.key for s in inputs]
    members = read_labels(cfg.output, "shapes-000000")
    for sample, row in zip(inputs, rows, strict=True):
        if isinstance(sample, SampleError):
            assert (row["status"], _no_address(row["error"])) == ("failed", _no_address(sample.reason))
            assert f"{sample.key}.seg.png" not in members
            continue
        height, width = sample.image.shape[:2]
        assert (row["status"], row["height"], row["width"]) == ("ok", height, width)
        assert _png_shape(members[f"{sample.key}.seg.png"]) == (height, width)
        assert _png_shape(members[f"{sample.key}.conf.png"]) == (height, width)
        labels = np.array(Image.open(io.BytesIO(members[f"{sample.key}.seg.png"])))
        assert set(np.unique(labels)) <= set(range(len(vocab))) | {255}
        assert sum(row["class_pixels"]) == round(height * width * (1 - row["ignored_fraction"]))
    assert rows[2]["width"] == 56 and rows[2]["height"] == 40
    assert (marker["ok"], marker["failed"]) == (6, 1)
    assert marker["stats"]["attempt"] == 1 and marker["stats"]["infer_s"] > 0


def test_shard_worker_refuses_an_unreadable_shard_and_leaves_no_output(tmp_path, model):
    (tmp_path / "in").mkdir()
    bad = tmp_path / "in/shapes-000000.tar"
    bad.write_bytes(b"this is not a tar archive" * 40)
    cfg = job_config(str(bad), str(tmp_path / "out"), model)
    vocab = Vocabulary.from_entries(["background", "red circle"])
    with pytest.raises(ShardReadError, match="not a tar"):
        ShardLabeler(cfg, vocab)(str(bad))
    assert not fs.exists(fs.join(cfg.output, schema.commit_path("shapes-000000")))
    assert not list((tmp_path / "out/labels").iterdir())


def test_missing_vocabulary_is_a_one_line_error(tmp_path, capsys, model):
    (tmp_path / "in").mkdir()
    (tmp_path / "in/a.tar").write_bytes(b"")
    assert main(["label", f"input={tmp_path}/in", f"output={tmp_path}/out", f"model.name={model}"]) == 2
    assert "no vocabulary" in capsys.readouterr().err


# --- whole runs on Ray ----------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.s3
def test_end_to_end_from_s3_to_s3_with_a_corrupt_sample(tmp_path, model, local_ray, s3, s3_root):  # noqa: F811
    urls = shapes(str(tmp_path / "in"), 3, 5)
    replace_image(urls[1], "000001_000003", (40, 56))
    corrupt_image(urls[2], "000002_000001")
    bad_boxes = [[1, 2, 3], [-50, -50, -10, -10]]  # zoom-in boxes: skipped and counted, never fatal
    replace_member(urls[1], "000001_000000.json", json.dumps({"boxes": bad_boxes}).encode())
    # a corrupt tar header mid-shard: the sample before it fails and the shard counts as cut, never as whole
    Path(urls[0]).write_bytes(corrupt_header(Path(urls[0]).read_bytes(), "000000_000002.jpg"))
    options = dict(s3.storage_options)
    filesystem, root = fs.url_to_fs(s3_root, options)
    filesystem.put(str(tmp_path / "in") + "/", f"{root}/in/", recursive=True)
    cfg = job_config(
        f"{s3_root}/in", f"{s3_root}/out", model, "zoom.enabled=true", "zoom.grid=2", storage_options=options
    )

    summary = run_label_job(cfg)

    # A corrupt sample is a failed row, not a failed shard: every shard commits and the job exits 0.
    assert summary["exit_code"] == 0 and summary["shards"]["committed"] == 3
    assert (summary["samples"]["ok"], summary["samples"]["failed"]) == (10, 2)  # 3 samples after the damage
    reason, damage = sorted(summary["samples"]["errors"])  # "jpg: ..." < "shard truncated ..."
    assert reason.startswith("jpg: not a readable image")
    assert damage.endswith("(a corrupt tar header follows (bad checksum); nothing after it is read)")
    assert summary["cut_shards"] == ["shapes-000000"]
    assert "not read to their end (cut, corrupt or joined): shapes-000000 (cut_shards)" in format_summary(summary)
    box_reasons = {"box is not 4 finite numbers [x0, y0, x1, y1]": 1, "box outside the image": 1}
    assert {reason: summary["zoom_skipped"].get(reason) for reason in box_reasons} == box_reasons
    assert "1 x box outside the image" in format_summary(summary)
    # One CPU per actor (the default): its torch gets one thread (unless the environment says
    # otherwise), so its reader and writer take turns with the model instead of stalling a parallel
    # operation over every core.
    threads = int(os.environ.get("OMP_NUM_THREADS") or 1)
    assert list(summary["actors"]["torch_threads"].values()) == [threads] * summary["actors"]["ready"]
    (precision,) = summary["precision"].values()  # model.precision=auto on a CPU: chosen by the probe
    rates = precision["cpu_matmul_gflops"]
    assert precision["dtype"] == ("bfloat16" if rates["bf16"] > 1.05 * rates["fp32"] else "float32")
    for url in urls:
        name = schema.shard_name(url)
        inputs = _input_samples(f"{s3_root}/in/{name}.tar", options)
        rows = read_rows(cfg.output, name, options)
        assert [r["key"] for r in rows] == [s.key for s in inputs]  # exactly one row per sample, in order
        assert {r["head"] for r in rows} == {summary["head"]} == {"maskclip"}  # no head named: the default
        members = read_labels(cfg.output, name, options)
        for sample, row in zip(inputs, rows, strict=True):
            if isinstance(sample, SampleError):
                assert (row["status"], row["error"]) == ("failed", damage if name == "shapes-000000" else reason)
                assert f"{sample.key}.seg.png" not in members
            else:
                assert row["status"] == "ok" and (row["height"], row["width"]) == sample.image.shape[:2]
                assert _png_shape(members[f"{sample.key}.seg.png"]) == sample.image.shape[:2]
                meta = json.loads(members[f"{sample.key}.json"])
                assert meta["zoom_regions"] == row["zoom_regions"] and row["zoom_regions"]  # the 2x2 grid at least
                for x0, y0, x1, y1 in row["zoom_regions"]:
                    assert 0 <= x0 < x1 <= row["width"] and 0 <= y0 < y1 <= row["height"]
        marker = fs.read_json(fs.join(cfg.output, schema.commit_path(name)), options)
        assert marker["read"]["end_of_archive"] == (name != "shapes-000000")
        assert (marker["read"]["corrupt_header_at"] is not None) == (name == "shapes-000000")
        assert (box_reasons.items() <= marker["stats"]["zoom_skipped"].items()) == (name == "shapes-000001")
        for entry in marker["files"].values():
            data = fs.read_bytes(fs.join(cfg.output, entry["path"]), options)
            assert entry["sha256"] == hashlib.sha256(data).hexdigest() and entry["bytes"] == len(data)
    run_config = fs.read_text(fs.join(cfg.output, schema.CONFIG_FILE), options)
    assert yaml.safe_load(run_config)["storage_options"] == {"endpoint_url": s3.endpoint_url}  # no credentials
    vocab = fs.read_json(fs.join(cfg.output, schema.VOCAB_FILE), options)
    assert len(vocab["classes"]) == 37 and vocab["background"] == 0
    assert vocab["templates"] == ["a photo of a {}."] and len(vocab["text_embedding_sha256"]) == 64
    assert fs.read_json(fs.join(cfg.output, schema.SUMMARY_FILE), options) == summary


@pytest.mark.ray
def test_unreadable_shard_fails_after_retries_and_the_rest_commits(tmp_path, capsys, model, local_ray):  # noqa: F811
    shapes(str(tmp_path / "in"), 1, 3)
    (tmp_path / "in/shapes-000009.tar").write_bytes(b"not a tar" * 100)
    config = tmp_path / "run.yaml"
    config.write_text(f"input: {tmp_path}/in\noutput: {tmp_path}/out\n")
    args = [f"model.name={model}", "distribute.max_retries=1", "prompts.templates=single", "distribute.num_cpus=1"]

    assert main(["label", str(config), *args]) == 1

    summary = fs.read_json(str(tmp_path / "out" / schema.SUMMARY_FILE))
    assert summary["shards"] | {"failed": 1, "committed": 1} == summary["shards"]
    (failed,) = summary["failed_shards"]
    assert failed["shard"] == "shapes-000009" and failed["attempts"] == 2 and "not a tar" in failed["error"]
    assert summary["retries"] == 1
    assert "failed shard shapes-000009 after 2 attempts" in capsys.readouterr().out
    assert not fs.exists(str(tmp_path / "out" / schema.commit_path("shapes-000009")))


@pytest.mark.ray
def test_a_killed_actor_mid_shard_is_replaced_and_every_shard_commits_once(tmp_path, model, local_ray):  # noqa: F811
    urls = shapes(str(tmp_path / "in"), 3, 48)
    cfg = job_config(
        str(tmp_path / "in"), str(tmp_path / "out"), model, "distribute.num_actors=1", "infer.batch_size=1"
    )
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(run_label_job(cfg)))
    runner.start()
    labels = tmp_path / "out/labels"
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and runner.is_alive():
        partial = [p.name for p in labels.glob("_tmp.*")] if labels.exists() else []
        if partial:  # a shard's labels tar is open: the only actor is in the middle of that shard
            (name,) = [n for n in ray.util.list_named_actors() if n.startswith(ACTOR_PREFIX)]
            ray.kill(ray.get_actor(name))
            killed = partial[0]
        time.sleep(0.01)
    runner.join(timeout=120)
    assert killed is not None, "the job finished before an actor could be killed"
    summary = result
    assert summary["exit_code"] == 0 and summary["shards"]["committed"] == 3
    assert summary["retries"] == 1 and summary["actors"]["started"] == 2
    attempts = {}
    for url in urls:
        name = schema.shard_name(url)
        rows = read_rows(cfg.output, name)
        assert len(rows) == 48 and len({r["key"] for r in rows}) == 48  # once, not twice
        attempts[name] = fs.read_json(fs.join(cfg.output, schema.commit_path(name)))["stats"]["attempt"]
    assert sorted(attempts.values()) == [1, 1, 2]
    assert attempts[killed.split(".", 2)[2].removesuffix(".tar")] == 2  # the killed shard was the retried one
    assert sorted(p.name for p in labels.iterdir()) == [f"{schema.shard_name(u)}.tar" for u in urls]


def test_progress_without_a_terminal_is_one_log_line_per_interval(caplog):
    caplog.set_level(logging.INFO, logger="pipeline.distribute.progress")
    progress = Progress(4, interval=3600, tty=False)
    progress.shard_done(True, images=10, failed_rows=1)
    progress.shard_done(False)
    progress.tick()
    assert caplog.messages == []  # the interval has not passed
    progress.tick(force=True)
    (line,) = caplog.messages
    assert re.fullmatch(r"shards 2/4 \(1 failed\), images 10 \(1 failed\), [\d.]+ img/s, ETA 0:00:\d\d", line)
    progress.shard_done(True, images=5)
    progress.shard_done(True, images=5)
    assert caplog.messages[-1].startswith("shards 4/4 (1 failed), images 20 (1 failed)")  # the last shard always logs


def test_the_example_config_loads():
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "examples/label-shapes.yaml"))
    assert cfg.input == ["data/shapes/shapes-{000000..000007}.tar"] and cfg.output == "data/shapes-labels"
    assert not cfg.zoom.enabled and cfg.zoom.max_regions == 4 and cfg.model.name == "shapes-clip"


@pytest.mark.ray
def test_pool_size_follows_the_cluster_unless_set(local_ray):  # noqa: F811
    cpu_only = DistributeCfg()  # the test cluster has 2 CPUs and no GPU
    assert actor_resources(cpu_only, n_shards=10) == (2, 1.0, 0.0)
    assert actor_resources(cpu_only, n_shards=1) == (1, 1.0, 0.0)  # never more actors than shards
    assert actor_resources(DistributeCfg(num_cpus=0.5), n_shards=10) == (4, 0.5, 0.0)
    assert actor_resources(DistributeCfg(num_actors=3, num_gpus=0.25), n_shards=10) == (3, 1.0, 0.25)
