"""`clipdense retrain`: watermark, lease, version claims, the gate, and whole steps on the loopback S3 server."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import retrain_helpers as rh

from jobs.retrain import main as retrain_main
from pipeline.config import ConfigError, from_dict, to_dict
from pipeline.io import fs
from pipeline.outputs import marker_bytes, read_markers
from pipeline.retrain import RetrainCfg, lease, retrain_step, versions, watermark
from pipeline.retrain.config import check, check_runs
from pipeline.retrain.step import step_key

ROOT = Path(__file__).resolve().parents[1]


def test_put_exclusive_has_one_winner(storage):
    root, so = storage
    url = fs.join(root, "claims", "v0001.json")
    wins: list[int] = []
    threads = [
        threading.Thread(target=lambda i=i: wins.append(i) if fs.put_exclusive(url, str(i).encode(), so) else None)
        for i in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert fs.read_bytes(url, so) == str(wins[0]).encode()
    assert not fs.put_exclusive(url, b"late", so)


def test_replace_if_swaps_only_from_the_expected_content(storage):
    root, so = storage
    url = fs.join(root, "pointer", "latest.json")
    assert fs.replace_if(url, b"a", None, so) and not fs.replace_if(url, b"x", None, so)  # None: create only
    assert not fs.replace_if(url, b"x", b"stale", so) and fs.read_bytes(url, so) == b"a"
    assert fs.replace_if(url, b"b", b"a", so) and fs.read_bytes(url, so) == b"b"
    assert not fs.replace_if(fs.join(root, "pointer", "absent.json"), b"x", b"a", so)


@pytest.mark.s3
def test_replace_if_has_one_winner_among_writers_from_one_content(s3, s3_root):
    """On S3 the writers' requests interleave; locally the lock test below shows the exclusion."""
    root, so = s3_root, dict(s3.storage_options)
    url = fs.join(root, "pointer", "latest.json")
    assert fs.replace_if(url, b"v0001", None, so)
    wins: list[int] = []
    threads = [
        threading.Thread(target=lambda i=i: wins.append(i) if fs.replace_if(url, b"v%d" % i, b"v0001", so) else None)
        for i in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and fs.read_bytes(url, so) == b"v%d" % wins[0]


def test_replace_if_waits_for_the_lock_and_then_sees_the_change(tmp_path):
    """Locally the swap holds `url.lock`: a writer that took it first (another process, say) moves the
    pointer, and the waiting swap then finds its expected content gone."""
    import fcntl

    url = str(tmp_path / "latest.json")
    assert fs.replace_if(url, b"v0001", None)
    results: list[bool] = []
    with open(url + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        waiting = threading.Thread(target=lambda: results.append(fs.replace_if(url, b"v0003", b"v0001")))
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive() and not results  # it waits for the lock
        fs.put_atomic(url, b"v0002")
    waiting.join()
    assert results == [False] and fs.read_bytes(url) == b"v0002"


@pytest.mark.s3
def test_watermark_counts_committed_shards_and_redone_ones(s3, s3_root):
    so = dict(s3.storage_options)
    labels = fs.join(s3_root, "labels")
    rh.run_output(labels, "run-1", ["a", "b"], so)
    fs.put_atomic(fs.join(labels, "run-1", "_commits", fs.temp_name("c.json")), b"{}", so)  # unfinished marker
    fs.put_atomic(fs.join(labels, "not-a-run", "x.txt"), b"", so)
    assert watermark.find_runs([labels], so) == [fs.join(labels, "run-1")]
    first = watermark.current_watermark([labels], so)
    assert sorted(first[fs.join(labels, "run-1")]) == ["a", "b"]
    # Listed again through the same (cached) filesystem: a new run and a redone shard are seen.
    rh.run_output(labels, "run-2", ["c"], so)
    rh.commit(fs.join(labels, "run-1"), "b", so, seed=1)
    second = watermark.current_watermark([labels], so)
    assert watermark.new_shards(second, first) == 2  # c is new, b's marker changed
    assert watermark.new_shards(second, second) == 0
    assert watermark.digest(first) != watermark.digest(second)
    assert watermark.find_runs([fs.join(s3_root, "nothing")], so) == []  # a prefix no run wrote to yet


@pytest.mark.s3
def test_watermark_of_an_object_store_prefix_does_not_depend_on_trailing_slashes(s3, s3_root):
    so = dict(s3.storage_options)
    labels = fs.join(s3_root, "labels")
    run = rh.run_output(labels, "run-1", ["a"], so)
    mark = watermark.current_watermark([labels], so)
    assert list(mark) == [run] and list(mark[run]) == ["a"]
    for spelled in (f"{labels}/", f"{labels}//", f"{run}/"):
        assert watermark.current_watermark([spelled], so) == mark, spelled


@pytest.mark.s3
def test_a_labels_prefix_that_holds_no_run_is_named_in_a_warning_at_each_step(s3, s3_root, caplog):
    so = dict(s3.storage_options)
    rh.run_output(fs.join(s3_root, "labels"), "run-1", [], so)  # a labeling run started, nothing committed
    # A mistyped prefix; on S3 a `//` keeps an empty key segment (`x//labels/...`), so it is another prefix.
    wrong = [fs.join(s3_root, "lables"), f"{s3_root}//labels"]
    cfg = step_cfg(s3_root, so, labels=[fs.join(s3_root, "labels"), *wrong])
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipeline.retrain.watermark"):
            assert retrain_step(cfg, rh.export_shipped)["outcome"] == "nothing-new"
        assert [r.getMessage().split(" holds no")[0] for r in caplog.records] == [f"labels: {u}" for u in wrong]


def test_watermark_hashes_the_markers_that_read_markers_parses(tmp_path):
    run = rh.run_output(str(tmp_path / "labels"), "run-1", ["b", "a"], None)
    raw = marker_bytes(run, ["b", "a"])
    assert list(raw) == ["b", "a"]  # in the order asked for
    assert raw["a"] == (tmp_path / "labels" / "run-1" / "_commits" / "a.json").read_bytes()
    assert read_markers(run, ["b", "a"]) == [json.loads(raw["b"]), json.loads(raw["a"])]
    mark = watermark.current_watermark([run])
    assert mark == {run: {s: hashlib.sha256(raw[s]).hexdigest() for s in ("a", "b")}}


def test_lease_taken_over_only_from_a_dead_holder(tmp_path):
    folder = str(tmp_path / "step")
    held = lease.acquire(folder, 0.6)
    assert held is not None and held.generation == 0
    assert lease.acquire(folder, 0.6) is None  # renewed while we waited: a live holder
    held._stop.set()  # the holder dies without releasing: no more renewals
    held._thread.join()
    taken = lease.acquire(folder, 0.6)
    assert taken is not None and taken.generation == 1
    assert not held.still_held() and taken.still_held()
    taken.release()
    again = lease.acquire(folder, 0.6)  # a released lease is free at once
    assert again is not None and again.generation == 2
    again.release()


def test_a_lease_released_while_a_step_waits_on_it_is_taken_at_once(tmp_path):
    folder = str(tmp_path / "step")
    held = lease.acquire(folder, 60)  # renews every 20 s: no beat within this test
    assert held is not None
    threading.Timer(0.5, held.release).start()  # its step ends while the other waits
    began = time.monotonic()
    taken = lease.acquire(folder, 60)
    assert taken is not None and taken.generation == 1
    assert time.monotonic() - began < 20  # not the whole lease_seconds
    taken.release()


def test_a_holder_taken_for_dead_learns_it_at_its_next_beat(tmp_path):
    folder = str(tmp_path / "step")
    held = lease.acquire(folder, 0.3)
    assert held is not None and not held.lost
    time.sleep(0.5)  # beats go through while it holds the lease
    assert not held.lost
    # Another step took it for dead (say its beats were stuck) and took the next generation.
    assert fs.put_exclusive(fs.join(folder, "lease-000001.json"), b'{"beat": 0, "released": false}')
    deadline = time.monotonic() + 5
    while not held.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held.lost and not held._thread.is_alive()  # it stopped renewing
    held.release()
    assert lease.latest_generation(folder) == 1


def test_publish_resumes_the_number_its_key_claimed(tmp_path):
    models, candidate = str(tmp_path / "models"), str(tmp_path / "candidate")
    rh.export_shipped(None, [], candidate, None)
    model = fs.join(candidate, "model")
    assert versions.publish(models, "key-a", model, {"mIoU": 1}, None) == ("v0001", True)
    # A step for key-b killed after its claim: the number is taken, the version incomplete, latest unmoved.
    assert fs.put_exclusive(fs.join(models, "v0002", versions.CLAIM), json.dumps({"key": "key-b"}).encode())
    assert versions.read_latest(models)["version"] == "v0001"
    assert versions.publish(models, "key-c", model, {}, "v0001") == ("v0003", True)
    # The rerun finishes its own number, but latest moved past what it was gated against: it stays.
    assert versions.publish(models, "key-b", model, {}, "v0001") == ("v0002", False)
    assert versions.read_latest(models)["version"] == "v0003"
    assert versions.publish(models, "key-c", model, {}, "v0001") == ("v0003", True)  # a rerun after latest moved
    assert versions.list_versions(models) == [1, 2, 3]


def test_publish_never_passes_over_a_version_published_meanwhile(tmp_path):
    models, candidate = str(tmp_path / "models"), str(tmp_path / "candidate")
    rh.export_shipped(None, [], candidate, None)
    model = fs.join(candidate, "model")
    assert versions.publish(models, "key-a", model, {}, None) == ("v0001", True)
    # A step that read "no version" (or v0001) before key-b published v0002 publishes a higher number,
    # but was never gated against v0002: latest stays on v0002.
    assert versions.publish(models, "key-b", model, {}, "v0001") == ("v0002", True)
    assert versions.publish(models, "key-c", model, {}, None) == ("v0003", False)
    assert versions.publish(models, "key-d", model, {}, "v0001") == ("v0004", False)
    assert versions.read_latest(models)["version"] == "v0002"
    assert fs.exists(fs.join(models, "v0004", versions.VERSION))  # the version folder stays, complete


def test_of_steps_publishing_at_once_from_one_version_one_moves_latest(tmp_path):
    """Three steps read `latest` as v0001 while a fourth writer holds the pointer's lock: none moves
    it meanwhile, and once the lock is free exactly one does (a read-then-write would move it thrice)."""
    import fcntl

    models, candidate = tmp_path / "models", str(tmp_path / "candidate")
    rh.export_shipped(None, [], candidate, None)
    model = fs.join(candidate, "model")
    assert versions.publish(str(models), "key-a", model, {}, None) == ("v0001", True)
    results: list[tuple[str, bool]] = []
    threads = [
        threading.Thread(target=lambda k=k: results.append(versions.publish(str(models), k, model, {}, "v0001")))
        for k in ("key-b", "key-c", "key-d")
    ]
    with open(models / "latest.json.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while sum((models / f"v000{i}" / versions.VERSION).exists() for i in (2, 3, 4)) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # each has read latest and waits on the lock
        assert not results and versions.read_latest(str(models))["version"] == "v0001"
    for t in threads:
        t.join()
    moved = [name for name, ok in results if ok]
    assert len(moved) == 1 and versions.read_latest(str(models))["version"] == moved[0]
    assert sorted(name for name, _ in results) == ["v0002", "v0003", "v0004"]


@pytest.mark.s3
def test_publish_copies_what_the_model_folder_holds_now(s3, s3_root):
    so = dict(s3.storage_options)
    models, candidate = fs.join(s3_root, "models"), fs.join(s3_root, "candidate")
    model = fs.join(candidate, "model")
    filesystem, path = fs.url_to_fs(model, so)
    fs.put_atomic(fs.join(model, "config.json"), b"{}", so)
    assert len(filesystem.ls(path)) == 1  # a listing the filesystem now caches
    rh.export_shipped(None, [], candidate, so)  # the rest of the export lands after it
    fs.put_atomic(fs.join(model, fs.temp_name("weights.safetensors")), b"half", so)  # a killed export's leftover
    fs.put_atomic(fs.join(model, "extra", "vocab.json"), b"[]", so)  # a sub-folder is copied too
    assert versions.publish(models, "key-a", model, {}, None, so) == ("v0001", True)
    copied = rh.listing(fs.join(models, "v0001", versions.MODEL_DIR), so)
    assert sorted(p.rsplit("/model/", 1)[1] for p in copied) == sorted([*rh.MODEL_FILES, "extra/vocab.json"])
    weights = fs.join(models, "v0001", versions.MODEL_DIR, "weights.safetensors")
    assert fs.read_bytes(weights, so) == fs.read_bytes(fs.join(model, "weights.safetensors"), so)


def step_cfg(root: str, so: dict, **extra) -> RetrainCfg:
    data = {
        "labels": [fs.join(root, "labels")],
        "models": fs.join(root, "models"),
        "truth": [fs.join(root, "truth")],
        "storage_options": so,
        "lease_seconds": 2.0,
        **extra,
    }
    return from_dict(RetrainCfg, data)


def one_run_cfg(root: str) -> RetrainCfg:
    """A local step over one labeling run with one committed shard and a truth set."""
    rh.truth(root, None)
    rh.run_output(fs.join(root, "labels"), "run-1", ["a"], None)
    return step_cfg(root, {})


@pytest.mark.s3
@pytest.mark.slow
def test_step_publishes_then_does_nothing_then_gates(s3, s3_root):
    so = dict(s3.storage_options)
    rh.truth(s3_root, so)
    rh.run_output(fs.join(s3_root, "labels"), "run-1", ["a", "b"], so)
    cfg = step_cfg(s3_root, so, gate_first=True)
    first = retrain_step(cfg, rh.export_shipped)
    assert first["outcome"] == "published" and first["version"] == "v0001", first
    assert first["mIoU"]["candidate"] > first["mIoU"]["current"]  # trained shapes-clip beats random init
    latest = versions.read_latest(cfg.models, so)
    assert latest["version"] == "v0001" and latest["watermark"] == first["watermark"]
    record = fs.read_json(first["record"], so)
    assert record["outcome"] == "published" and record["trained_on"] == [fs.join(s3_root, "labels", "run-1")]

    before = rh.listing(s3_root, so)
    again = retrain_step(cfg, rh.export_shipped)
    assert again["outcome"] == "nothing-new" and again["new_shards"] == 0
    assert rh.listing(s3_root, so) == before

    rh.run_output(fs.join(s3_root, "labels"), "run-2", ["c"], so)
    second = retrain_step(cfg, rh.export_shipped)
    assert second["outcome"] == "not-better" and second["new_shards"] == 1, second
    assert second["mIoU"]["candidate"] == pytest.approx(second["mIoU"]["current"], abs=1e-6)  # the same weights
    assert second["trained_from"] == fs.join(cfg.models, "v0001", "model")
    assert versions.read_latest(cfg.models, so)["version"] == "v0001"
    assert versions.list_versions(cfg.models, so) == [1]
    assert fs.read_json(second["record"], so)["reason"].startswith("not better: candidate mIoU")
    before = rh.listing(s3_root, so)
    assert retrain_step(cfg, rh.export_shipped)["outcome"] == "already-done"
    assert rh.listing(s3_root, so) == before


@pytest.mark.s3
@pytest.mark.slow
def test_two_steps_at_once_publish_one_version(s3, s3_root):
    so = dict(s3.storage_options)
    rh.truth(s3_root, so)
    rh.run_output(fs.join(s3_root, "labels"), "run-1", ["a"], so)
    cfg = step_cfg(s3_root, so)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "CUDA_VISIBLE_DEVICES": ""}
    arg = json.dumps(to_dict(cfg))
    helper = str(ROOT / "tests" / "retrain_helpers.py")
    procs = [
        subprocess.Popen([sys.executable, helper, arg], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0 and out.strip(), err.decode()[-3000:]
    outcomes = sorted(json.loads(out.decode().splitlines()[-1])["outcome"] for out, _ in results)
    assert outcomes in (["held", "published"], ["already-done", "published"]), outcomes
    assert versions.list_versions(cfg.models, so) == [1]
    assert versions.read_latest(cfg.models, so)["version"] == "v0001"
    records = fs.url_to_fs(fs.join(cfg.models, versions.RECORDS_DIR), so)
    assert len(records[0].ls(records[1])) == 1


@pytest.mark.slow
def test_first_version_is_gated_only_with_gate_first(tmp_path):
    root = str(tmp_path)
    rh.truth(root, None)
    rh.run_output(fs.join(root, "labels"), "run-1", ["a"], None, pretrained="")  # labeler = the trained model
    gated = retrain_step(step_cfg(root, {}, gate_first=True), rh.export_shipped)
    assert gated["outcome"] == "not-better" and gated["compared_with"] == "the labeler's shapes-clip"
    assert gated["mIoU"]["candidate"] == pytest.approx(gated["mIoU"]["current"], abs=1e-6)
    assert versions.list_versions(fs.join(root, "models")) == []
    first = retrain_step(step_cfg(root, {}, models=fs.join(root, "models-2")), rh.export_shipped)
    assert first["outcome"] == "published" and first["reason"].startswith("first version, nothing live to beat")


@pytest.mark.slow
def test_a_step_superseded_while_training_does_not_move_latest(tmp_path):
    cfg = one_run_cfg(str(tmp_path))

    def beside(start, runs, output, so, stop):  # a manual step for another key publishes while this one trains
        summary = rh.export_shipped(start, runs, output, so, stop)
        assert versions.publish(cfg.models, "other-key", fs.join(output, "model"), {}, None, so) == ("v0001", True)
        return summary

    done = retrain_step(cfg, beside)
    assert done["outcome"] == "superseded" and done["version"] == "v0002", done
    assert done["reason"] == "superseded: v0001 was published while this step gated against no version"
    assert versions.read_latest(cfg.models)["version"] == "v0001"
    assert fs.read_json(done["record"])["outcome"] == "superseded"


@pytest.mark.slow
def test_a_finished_step_keeps_its_metrics_but_not_its_checkpoints(tmp_path):
    cfg = one_run_cfg(str(tmp_path))

    def with_checkpoint(start, runs, output, so, stop):  # what the fine-tune leaves beside its export
        fs.put_atomic(fs.join(output, "checkpoints", "step-1.pt"), b"optimiser state", so)
        fs.put_atomic(fs.join(output, "metrics.jsonl"), b"{}\n", so)
        return rh.export_shipped(start, runs, output, so, stop)

    done = retrain_step(cfg, with_checkpoint)
    assert done["outcome"] == "published", done
    train = tmp_path / "models" / "_steps" / done["key"] / "train"
    assert sorted(p.relative_to(train).as_posix() for p in train.rglob("*")) == [
        "_run",
        "_run/summary.json",
        "metrics.jsonl",
    ]
    assert sorted(os.listdir(tmp_path / "models" / "v0001" / "model")) == sorted(rh.MODEL_FILES)


@pytest.mark.slow
def test_relative_local_paths_reach_the_fine_tune_absolute_and_spelled_any_way_are_one_key(tmp_path, monkeypatch):
    """A Ray Train worker runs in a folder of its own: there a relative `models` lists as empty, and a
    lease check built from it would say the lease was taken."""
    one_run_cfg(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    cfg = from_dict(RetrainCfg, {"labels": ["labels"], "models": "models", "truth": ["truth"], "lease_seconds": 2.0})
    seen: dict = {}

    def in_a_worker_folder(start, runs, output, so, stop):
        monkeypatch.chdir(tmp_path / "labels")  # where rank 0 asks the lease check
        seen.update(runs=runs, output=output, stop=stop())
        return rh.export_shipped(start, runs, output, so, stop)

    done = retrain_step(cfg, in_a_worker_folder)
    assert done["outcome"] == "published", done
    train = str(tmp_path / "models" / "_steps" / done["key"] / "train")
    assert seen == {"runs": [str(tmp_path / "labels" / "run-1")], "output": train, "stop": False}

    def no_training(*args):
        raise AssertionError("the same shards must not be fine-tuned again")

    monkeypatch.chdir(tmp_path)
    for labels, models in (("./labels/", "./models/"), (str(tmp_path / "labels"), str(tmp_path / "models"))):
        again = retrain_step(dataclasses.replace(cfg, labels=[labels], models=models), no_training)
        assert (again["outcome"], again["new_shards"], again["key"]) == ("nothing-new", 0, done["key"]), labels
    # A version published before the step made its paths absolute recorded the runs as spelled.
    url = tmp_path / "models" / "v0001" / versions.VERSION
    published = json.loads(url.read_text())
    published["watermark"] = {"labels/run-1": published["watermark"][str(tmp_path / "labels" / "run-1")]}
    url.write_text(json.dumps(published))
    assert retrain_step(cfg, no_training)["new_shards"] == 0


def test_a_mistyped_finetune_key_is_refused_before_any_work(tmp_path):
    cfg = step_cfg(str(tmp_path), {}, finetune={"optim": {"step": 10}})
    with pytest.raises(ConfigError, match="unknown config key 'finetune.optim.step'"):
        retrain_step(cfg, rh.export_shipped)


def test_a_warmup_not_shorter_than_the_steps_is_warned_once_by_the_fine_tune(tmp_path, caplog):
    from pipeline.retrain.train import finetune_trainer

    cfg = dataclasses.replace(one_run_cfg(str(tmp_path)), finetune={"optim": {"steps": 2}})  # warmup 100
    # The run holds commit markers only: the fine-tune starts (checks its values) and stops at reading it.
    with caplog.at_level(logging.WARNING), pytest.raises(FileNotFoundError, match="vocabulary.json"):
        retrain_step(cfg, finetune_trainer(cfg.finetune))
    assert caplog.text.count("optim.warmup (100) is not shorter than optim.steps (2)") == 1


def take_over(output: str, so: dict | None) -> None:
    """Another step takes the key of the step whose fine-tune writes to `output` (its next generation)."""
    step_folder = output.rsplit("/", 1)[0]
    assert fs.put_exclusive(fs.join(step_folder, "lease-000001.json"), b'{"beat": 0, "released": false}', so)


def test_a_fine_tune_that_stops_for_a_lost_lease_ends_the_step_as_lost(tmp_path):
    cfg = one_run_cfg(str(tmp_path))

    def stops(start, runs, output, so, stop):
        take_over(output, so)
        if stop():  # as pipeline.train.finetune does, before writing anything
            raise RuntimeError("asked to stop")
        return rh.export_shipped(start, runs, output, so, stop)

    done = retrain_step(cfg, stops)
    assert done["outcome"] == "lost-lease" and "mIoU" not in done, done
    assert fs.read_json(done["record"])["outcome"] == "lost-lease"
    assert versions.list_versions(cfg.models) == []
    assert not (tmp_path / "models" / "_steps" / done["key"] / "done.json").exists()


def test_a_fine_tune_that_fails_with_its_lease_held_fails_the_step(tmp_path):
    cfg = one_run_cfg(str(tmp_path))

    def fails(start, runs, output, so, stop):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        retrain_step(cfg, fails)


@pytest.mark.slow
def test_a_step_that_lost_its_lease_publishes_nothing_and_says_so(tmp_path):
    cfg = one_run_cfg(str(tmp_path))

    def taken_over(start, runs, output, so, stop):  # another step takes this one's key while it trains
        summary = rh.export_shipped(start, runs, output, so, stop)
        assert not stop()
        take_over(output, so)
        assert stop()  # what a fine-tune asks before each write
        return summary

    done = retrain_step(cfg, taken_over)
    assert done["outcome"] == "lost-lease", done
    assert done["reason"] == "lost the lease to another step, which redoes this key"
    assert versions.list_versions(cfg.models) == [] and versions.read_latest(cfg.models) is None
    assert fs.read_json(done["record"])["outcome"] == "lost-lease"
    step_folder = tmp_path / "models" / "_steps" / done["key"]
    assert not (step_folder / "done.json").exists()  # the new holder's step finishes the key
    assert (step_folder / "train" / "model").is_dir()  # and finds the fine-tune's output untouched


def test_a_step_killed_after_publishing_gets_its_record_from_the_rerun(tmp_path):
    root = str(tmp_path)
    rh.run_output(fs.join(root, "labels"), "run-1", ["a"], None)
    cfg = step_cfg(root, {})
    mark = watermark.current_watermark(cfg.labels)
    key = step_key(cfg, mark)
    # What a step killed right after moving `latest` leaves: the fine-tune's output, the published
    # version (version.json holds the step's record), and no done.json or record.
    out = fs.join(cfg.models, versions.STEPS_DIR, key, "train")
    rh.export_shipped(None, [], out, None)
    record = {"key": key, "record": versions.record_url(cfg.models, key), "watermark": mark, "outcome": "published"}
    assert versions.publish(cfg.models, key, fs.join(out, "model"), record, None) == ("v0001", True)

    def no_training(*args):
        raise AssertionError("the rerun must not fine-tune again")

    again = retrain_step(cfg, no_training)
    assert again["outcome"] == "nothing-new" and again["reason"] == "v0001 was trained on these shards"
    written = fs.read_json(record["record"])
    assert written["outcome"] == "published" and written["version"] == "v0001" and written["key"] == key
    assert fs.read_json(fs.join(cfg.models, versions.STEPS_DIR, key, "done.json")) == written
    # Killed after done.json, before the record: the next step writes it from done.json.
    os.remove(record["record"])
    before = rh.listing(root, {})
    assert retrain_step(cfg, no_training)["outcome"] == "nothing-new"
    assert fs.read_json(record["record"]) == written
    assert rh.listing(root, {}) == before | {record["record"]: os.path.getsize(record["record"])}
    assert retrain_step(cfg, no_training)["outcome"] == "nothing-new"  # nothing missing: nothing written
    assert len(os.listdir(tmp_path / "models" / versions.RECORDS_DIR)) == 1


@pytest.mark.s3
def test_before_the_first_committed_shard_a_step_is_nothing_new(s3, s3_root, tmp_path, capsys):
    so = dict(s3.storage_options)
    cfg = step_cfg(s3_root, so)  # the labels prefix holds nothing yet
    first = retrain_step(cfg, rh.export_shipped)
    assert (first["outcome"], first["reason"], first["shards"]) == ("nothing-new", "no committed label shard yet", 0)
    rh.run_output(fs.join(s3_root, "labels"), "run-1", [], so)  # a run started, no shard committed yet
    before = rh.listing(s3_root, so)
    assert retrain_step(cfg, rh.export_shipped)["outcome"] == "nothing-new"
    assert rh.listing(s3_root, so) == before  # nothing written
    # The CLI, as the CronJob runs it on a first deploy: exit 0, no failed Job.
    (tmp_path / "labels").mkdir()
    config = tmp_path / "retrain.yaml"
    config.write_text(f"labels: [{tmp_path}/labels]\nmodels: {tmp_path}/models\ntruth: [{tmp_path}/truth]\n")
    assert retrain_main([str(config)]) == 0
    assert capsys.readouterr().out.startswith("nothing-new: no committed label shard yet\n")
    assert not (tmp_path / "models").exists()
    # A local labels folder that does not exist is a mistyped path: one line, exit 2.
    assert retrain_main([str(config), f"labels=[{tmp_path}/lables]"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"clipdense retrain: error: labels: {tmp_path}/lables does not exist"
    )


def test_bad_config_is_one_line_and_exit_2(tmp_path):
    config = tmp_path / "retrain.yaml"
    config.write_text(f"labels: [{tmp_path}/labels]\nmodels: {tmp_path}/models\n")
    out = subprocess.run(
        [sys.executable, "-m", "jobs.retrain", str(config)], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert out.returncode == 2
    assert (
        out.stderr.strip().splitlines()[-1]
        == "clipdense retrain: error: retrain config: `truth` (held-out shards that gate publishing) is required"
    )


def _refusal(
    tmp_path: Path, capsys: pytest.CaptureFixture, labels: object, models: str, truth: object, *overrides: str
) -> str:
    """The error line of `clipdense retrain` on a config file of `labels`, `models` and `truth` (YAML
    text, or lists written as flow sequences) plus `overrides`; the command must exit 2."""
    config = tmp_path / "retrain.yaml"
    config.write_text(f"labels: {labels}\nmodels: {models}\ntruth: {truth}\n")
    assert retrain_main([str(config), *overrides]) == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_wrong_truth_is_refused_before_the_lease_and_the_fine_tune(tmp_path, capsys):
    cfg = one_run_cfg(str(tmp_path))
    truth = f"[{tmp_path}/truth]"
    overrides = (f"truth=[{tmp_path}/nosuch-truth/]", "finetune.optim.steps=2")
    assert _refusal(tmp_path, capsys, cfg.labels, cfg.models, truth, *overrides) == (
        f"clipdense retrain: error: truth: input spec '{tmp_path}/nosuch-truth' matches no shard"  # normalised
    )
    assert not (tmp_path / "models").exists()  # no lease, no fine-tune output


def test_a_finetune_model_the_step_sets_is_refused_but_its_device_is_not(tmp_path, capsys):
    labels, models, truth = f"[{tmp_path}/labels]", f"{tmp_path}/models", f"[{tmp_path}/truth]"
    assert _refusal(tmp_path, capsys, labels, models, truth, "finetune.model.name=ViT-B-16") == (
        "clipdense retrain: error: retrain config: finetune.model.name is set by the step; remove it"
    )
    check(step_cfg(str(tmp_path), {}, finetune={"model": {"device": "cpu", "precision": "fp32"}}))


def test_a_bad_finetune_value_is_refused_before_any_listing_or_lease(tmp_path, capsys):
    cfg = one_run_cfg(str(tmp_path))
    assert _refusal(tmp_path, capsys, cfg.labels, cfg.models, cfg.truth, "finetune.data.combine=agreee") == (
        "clipdense retrain: error: retrain config: finetune: data.combine must be one of each, agree, got 'agreee'"
    )
    assert not (tmp_path / "models").exists()  # no lease taken
    check(step_cfg(str(tmp_path), {}, finetune={"data": {"combine": "agree"}}))  # the runs are not listed yet


def test_combine_agree_with_one_listed_run_is_refused_before_the_lease(tmp_path, capsys):
    cfg = one_run_cfg(str(tmp_path))
    assert _refusal(tmp_path, capsys, cfg.labels, cfg.models, cfg.truth, "finetune.data.combine=agree") == (
        f"clipdense retrain: error: labels: 1 labeling run listed ({tmp_path}/labels/run-1), "
        "but finetune: data.combine=agree needs two or more labeling runs in labels"
    )
    assert not (tmp_path / "models").exists()  # no lease taken
    run_2 = rh.run_output(fs.join(str(tmp_path), "labels"), "run-2", ["a"], None)  # a second round's labels
    runs = [fs.join(str(tmp_path), "labels", "run-1"), run_2]
    check_runs(dataclasses.replace(cfg, finetune={"data": {"combine": "agree"}}), runs)


@pytest.mark.slow
def test_a_step_waiting_on_a_step_that_finishes_is_already_done(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipeline.retrain.lease")
    cfg = dataclasses.replace(one_run_cfg(str(tmp_path)), lease_seconds=120.0)  # the holder beats every 40 s
    second_waits = threading.Event()

    def first_trainer(start, runs, output, so, stop):
        assert second_waits.wait(60), "the second step never waited on the lease"
        return rh.export_shipped(start, runs, output, so, stop)

    outcomes: dict[str, dict] = {}
    first = threading.Thread(target=lambda: outcomes.update(first=retrain_step(cfg, first_trainer)))
    first.start()
    second = threading.Thread(target=lambda: outcomes.update(second=retrain_step(cfg, rh.export_shipped)))
    deadline = time.monotonic() + 60
    while not (tmp_path / "models" / "_steps").exists() and time.monotonic() < deadline:
        time.sleep(0.05)  # the first step holds the lease
    began = time.monotonic()
    second.start()
    while "is held; watching" not in caplog.text and second.is_alive():
        time.sleep(0.05)
    second_waits.set()
    first.join(120)
    second.join(120)
    assert outcomes["first"]["outcome"] == "published", outcomes
    assert outcomes["second"]["outcome"] == "already-done", outcomes
    assert outcomes["second"]["version"] == "v0001"
    assert time.monotonic() - began < cfg.lease_seconds  # it did not wait the lease out
