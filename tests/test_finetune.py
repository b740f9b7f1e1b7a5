"""The fine-tuning job on real labeling-run outputs (written by the labeling job's per-shard worker) and
the shipped shapes-clip: training, checkpoints and resume, evaluation, export, labeling with the student."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from jobs.cli import main as cli
from pipeline.config import HeadCfg, ModelCfg, RunCfg, load_config
from pipeline.data.shapeworld_shards import write_dataset
from pipeline.distribute.train import run_train_workers
from pipeline.io import fs
from pipeline.models.heads.denseclip import DenseCLIPHead
from pipeline.models.student import read_student_state, student_state
from pipeline.retrain.lease import Taken
from pipeline.stages.infer import DenseLabeler
from pipeline.train import finetune
from pipeline.train.job import OutputConflict, Stopped, train_worker
from pipeline.train.runs import open_runs, read_label_set
from pipeline.train.student import build
from pipeline.vocab import load_vocabulary
from tests.finetune_fixtures import FINETUNE_FAST, finetune_config, label_in_process

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("finetune")
    shapes, labels = str(root / "shapes"), str(root / "labels")
    write_dataset(shapes, 2, 8, size=64, seed=11)
    label_in_process(shapes, labels)
    return {"root": str(root), "shapes": shapes, "labels": labels}


@pytest.fixture(scope="module")
def trained(labelled) -> dict:
    out = str(Path(labelled["root"]) / "student")
    cfg = finetune_config([labelled["labels"]], out, f"eval.truth={labelled['shapes']}")
    return {"cfg": cfg, "out": out, "summary": finetune(cfg)}


def test_finetune_writes_checkpoints_metrics_model_and_summary(trained, labelled):
    out, summary = trained["out"], trained["summary"]
    assert summary["final_step"] == 4
    assert summary["n_samples"] == 16 and summary["label_shards"] == 2 and summary["labels"] == [labelled["labels"]]
    assert summary["teacher"]["model"] == "shapes-clip" and summary["teacher"]["head"] == "maskclip"
    assert 0.0 <= summary["mIoU"] <= 1.0 and summary["train_seconds"] > 0
    lines = [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]
    assert [(m["kind"], m["step"]) for m in lines] == [("train", 2), ("train", 4), ("eval", 4)]
    assert all(np.isfinite(m["loss"]) and m["img_per_s"] > 0 for m in lines if m["kind"] == "train")
    assert json.loads(Path(out, "checkpoints/latest.json").read_text())["step"] == 4
    assert sorted(p.name for p in Path(out, "checkpoints").glob("step-*.pt")) == [
        "step-00000002.pt",
        "step-00000004.pt",
    ]
    meta = json.loads(Path(out, "model/meta.json").read_text())
    teacher = json.loads((ROOT / "pipeline/models/shipped/shapes-clip/meta.json").read_text())
    assert teacher["infer"]["pamr_steps"] > 0  # so that the next line shows the student takes it over
    assert meta["head"] == "denseclip" and meta["infer"] == {"shifts": 1, "pamr_steps": teacher["infer"]["pamr_steps"]}
    assert (
        meta["vocabulary"]["classes"]
        == json.loads(Path(labelled["labels"], "_run/vocabulary.json").read_text())["classes"]
    )
    assert {p.name for p in Path(out, "model").iterdir()} == {
        "config.json", "weights.safetensors", "student.safetensors", "meta.json"
    }  # fmt: skip


def test_exported_student_evaluates_as_in_the_trainer(trained, labelled, tmp_path, capsys):
    report = tmp_path / "eval.json"
    args = ["eval", "--truth", labelled["shapes"], "--head", "denseclip", "--no-random-baseline"]
    assert cli([*args, "--json", str(report), f"model.name={trained['out']}/model"]) == 0
    scored = json.loads(report.read_text())
    assert scored["mIoU"] == pytest.approx(trained["summary"]["mIoU"], abs=1e-6)
    assert scored["predictions"]["head"] == "denseclip"
    unnamed = tmp_path / "unnamed.json"  # no head named: the student's own, as label and segment do
    no_head = ["eval", "--truth", labelled["shapes"], "--no-random-baseline", "--json", str(unnamed)]
    assert cli([*no_head, f"model.name={trained['out']}/model"]) == 0
    assert json.loads(unnamed.read_text())["predictions"]["head"] == "denseclip"
    assert json.loads(unnamed.read_text())["mIoU"] == scored["mIoU"]
    # The default head (maskclip) named explicitly: a student folder's own head would replace it, so it is refused.
    args[args.index("denseclip")] = "maskclip"
    capsys.readouterr()
    assert cli([*args, f"model.name={trained['out']}/model"]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("clipdense eval: error:")]
    assert "labels with its own head 'denseclip'" in line and "'maskclip'" in line
    image = tmp_path / "one.png"
    Image.new("RGB", (24, 24), (200, 30, 30)).save(image)
    student = ["--out", str(tmp_path), f"model.name={trained['out']}/model"]
    for head in (["--head", "maskclip"], ["head.name=maskclip"]):  # the option, or as an override
        assert cli(["segment", str(image), *head, *student]) == 2
        (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("clipdense segment: error:")]
        assert "labels with its own head 'denseclip'" in line and "name no head (head.name unset or null)" in line
    capsys.readouterr()
    assert cli(["segment", str(image), "head.options={ks_thresh: 0.5}", *student]) == 2  # options of maskclip
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("clipdense segment: error:")]
    assert "head 'denseclip' has no option 'ks_thresh'; allowed: none" in line
    assert not list(tmp_path.glob("one.*.png"))
    relabel = [f"input={labelled['shapes']}", f"output={tmp_path / 'relabelled'}", student[-1]]
    assert cli(["label", *relabel, "head.name=maskclip"]) == 2  # refused before any Ray start
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("clipdense label: error:")]
    assert "labels with its own head 'denseclip'" in line and not (tmp_path / "relabelled").exists()
    named = tmp_path / "named-head.yaml"  # a config file naming a head is refused as the command line is
    named.write_text(
        yaml.safe_dump({"input": labelled["shapes"], "output": str(tmp_path / "relabelled")})
        + "head: {name: maskclip}\n"
    )
    assert cli(["label", str(named), student[-1]]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("clipdense label: error:")]
    assert "labels with its own head 'denseclip', not 'maskclip'" in line and not (tmp_path / "relabelled").exists()
    # submit sends the overrides to the cluster inside a file, so it checks them before connecting
    assert cli(["submit", "--address", "http://127.0.0.1:9", *relabel, "head={name: maskclip}"]) == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("clipdense submit: error:")]
    assert "labels with its own head 'denseclip'" in line
    # Without --head and --classes, the student labels with its own head and the classes it learnt.
    assert cli(["segment", str(image), *student]) == 0
    learnt = load_vocabulary(f"{labelled['shapes']}/vocabulary.json")
    labels = np.asarray(Image.open(tmp_path / "one.seg.png"))
    present = capsys.readouterr().out.rsplit("(", 1)[1].rstrip(")\n").split(", ")
    classes = [learnt.display_names[i] for i in np.unique(labels) if i < len(learnt)]  # not the ignore value
    assert labels.shape == (24, 24) and present == classes


def test_student_folder_labels_with_its_own_head(trained, labelled, tmp_path):
    vocab = load_vocabulary(f"{labelled['shapes']}/vocabulary.json")
    labeler = DenseLabeler(RunCfg(model=ModelCfg(name=f"{trained['out']}/model")), vocab)
    assert isinstance(labeler.head, DenseCLIPHead)  # the config names no head: the model's own is used
    assert labeler.head_name == "denseclip"
    student = ModelCfg(name=f"{trained['out']}/model")
    with pytest.raises(ValueError, match="labels with its own head 'denseclip', not 'naclip'"):
        DenseLabeler(RunCfg(model=student, head=HeadCfg("naclip")), vocab)  # what any config file reaches
    assert DenseLabeler(RunCfg(model=student, head=HeadCfg("denseclip")), vocab).head_name == "denseclip"
    image = np.zeros((40, 56, 3), np.uint8)
    image[10:30, 10:30] = (220, 30, 30)
    (result,) = labeler([image])
    assert result.labels.shape == (40, 56) and int(result.labels.max()) < len(vocab)
    relabelled = str(tmp_path / "relabelled")  # a second round's labels: the run's config names no head
    label_in_process(labelled["shapes"], relabelled, f"model.name={trained['out']}/model")
    recorded = load_config(f"{relabelled}/_run/config.yaml")  # what `clipdense label` of that file runs
    assert recorded.head.name is None and DenseLabeler(recorded, vocab).head_name == "denseclip"
    both = [relabelled, labelled["labels"]]
    summary = finetune(finetune_config(both, str(tmp_path / "r2"), "optim.steps=2", "eval.truth="))
    assert summary["teacher"]["head"] == "denseclip"  # what labelled it, not the config's default head
    assert [(r["labels"], r["model"], r["head"]) for r in summary["labelled_by"]] == [
        (relabelled, f"{trained['out']}/model", "denseclip"),
        (labelled["labels"], "shapes-clip", "maskclip"),
    ]


def test_a_second_round_continues_the_student_that_labelled_it(trained, labelled, tmp_path):
    """Fine-tuning from an exported student (its relabelled data) starts the student's own parts from
    its weights; options that change what they mean are refused, named, before any worker starts
    (here two Ray Train workers that never start); `warm_start=false` starts them afresh."""
    folder = f"{trained['out']}/model"
    exported = read_student_state(folder)
    cfg = finetune_config([labelled["labels"]], str(tmp_path / "r2"), f"model.name={folder}")
    continued = student_state(build(cfg)[0])
    assert continued.keys() == exported.keys() and all(torch.equal(v, exported[k]) for k, v in continued.items())
    fresh = student_state(build(dataclasses.replace(cfg, warm_start=False))[0])
    assert not all(torch.equal(v, exported[k]) for k, v in fresh.items())
    regularised = dataclasses.replace(cfg, student=dataclasses.replace(cfg.student, dropout=0.3, gamma_init=0.5))
    assert all(torch.equal(v, exported[k]) for k, v in student_state(build(regularised)[0]).items())
    for option, message in (("fpn_width=32", "student.fpn_width=16 there, 32 here"), ("tau=0.5", "student.tau=0.07")):
        other = finetune_config(
            [labelled["labels"]], str(tmp_path / "r2"), f"model.name={folder}", f"student.{option}",
            "distribute.num_workers=2",
        )  # fmt: skip
        with pytest.raises(ValueError, match=rf"{message}.*warm_start=false"):
            finetune(other)
    older = tmp_path / "older"  # exported before `dense`, `patch_stride` and `residual` existed
    shutil.copytree(folder, older)
    meta = json.loads((older / "meta.json").read_text())
    meta["student"] = {k: v for k, v in meta["student"].items() if k not in ("dense", "patch_stride", "residual")}
    (older / "meta.json").write_text(json.dumps(meta))
    from_older = student_state(
        build(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=str(older))))[0]
    )
    assert all(torch.equal(v, exported[k]) for k, v in from_older.items())
    newer = tmp_path / "newer"  # exported by a version with an option this one does not know
    shutil.copytree(folder, newer)
    meta["student"] = {**meta["student"], "mask_decoder": 5}
    (newer / "meta.json").write_text(json.dumps(meta))
    unknown = re.escape(f"unknown config key '{newer}: meta.json student.mask_decoder'")
    with pytest.raises(ValueError, match=unknown):
        build(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=str(newer))))
    vocab = load_vocabulary(f"{labelled['shapes']}/vocabulary.json")
    with pytest.raises(ValueError, match=unknown):
        DenseLabeler(RunCfg(model=ModelCfg(name=str(newer))), vocab)([np.zeros((32, 32, 3), np.uint8)])


def test_same_config_again_returns_the_finished_run_and_another_is_refused(trained):
    started = time.time()
    assert finetune(trained["cfg"]) == trained["summary"]
    assert time.time() - started < 30  # nothing was trained again
    other = finetune_config(trained["cfg"].labels, trained["out"], "optim.lr=0.01")
    with pytest.raises(OutputConflict, match="optim.lr"):
        finetune(other)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_final_weights(labelled, tmp_path):
    overrides = ["optim.steps=6", "data.loader_workers=1"]
    straight = finetune_config([labelled["labels"]], str(tmp_path / "straight"), *overrides)
    finetune(straight)
    killed = str(tmp_path / "killed")
    fs.put_atomic(str(tmp_path / "ft.yaml"), f"labels: [{labelled['labels']}]\noutput: {killed}\n".encode())
    cmd = [sys.executable, "-m", "jobs.finetune", str(tmp_path / "ft.yaml"), *FINETUNE_FAST, *overrides]
    log = open(tmp_path / "killed.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log, start_new_session=True)
    latest = Path(killed, "checkpoints/latest.json")
    deadline = time.time() + 240
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    assert latest.exists(), (tmp_path / "killed.log").read_text()[-2000:]
    step = json.loads(latest.read_text())["step"]
    assert step < 6 and not Path(killed, "_run/summary.json").exists()  # killed mid-run
    summary = finetune(finetune_config([labelled["labels"]], killed, *overrides))
    assert summary["final_step"] == 6
    a = load_file(str(tmp_path / "straight/model/student.safetensors"))
    b = load_file(f"{killed}/model/student.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a = load_file(str(tmp_path / "straight/model/weights.safetensors"))
    b = load_file(f"{killed}/model/weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_asked_to_stop_writes_nothing_more_and_resumes_later(labelled, tmp_path):
    out = str(tmp_path / "stopped")
    cfg = finetune_config([labelled["labels"]], out)  # 4 steps, a checkpoint and a progress line every 2
    answers = iter([False, True])
    with pytest.raises(Stopped, match="asked to stop at step 4"):
        finetune(cfg, stop=lambda: next(answers))
    assert json.loads(Path(out, "checkpoints/latest.json").read_text())["step"] == 2
    assert sorted(p.name for p in Path(out, "checkpoints").iterdir()) == ["latest.json", "step-00000002.pt"]
    assert not Path(out, "model").exists() and not Path(out, "_run/summary.json").exists()
    assert [json.loads(x)["step"] for x in Path(out, "metrics.jsonl").read_text().splitlines()] == [2]
    assert finetune(cfg)["final_step"] == 4  # the output is whole: another run resumes it


def test_unreadable_checkpoint_is_a_one_line_error(labelled, tmp_path, capsys):
    out = tmp_path / "broken"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints/step-00000002.pt").write_bytes(b"not a checkpoint")
    (out / "checkpoints/latest.json").write_text('{"step": 2, "file": "step-00000002.pt"}')
    config = tmp_path / "ft.yaml"
    config.write_text(f"labels: [{labelled['labels']}]\noutput: {out}\n")
    assert cli(["finetune", str(config), "optim.steps=4"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert "Traceback" not in err and len(errors) == 1
    assert (
        errors[0].startswith("clipdense finetune: error: checkpoint ") and "step-00000002.pt is unreadable" in errors[0]
    )


def test_a_run_stopped_by_a_bad_value_does_not_refuse_the_corrected_one(labelled, tmp_path, capsys):
    config = tmp_path / "ft.yaml"
    config.write_text(f"labels: [{labelled['labels']}]\noutput: {tmp_path / 'out'}\n")
    assert cli(["finetune", str(config), *FINETUNE_FAST, "student.dense=values"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == [
        "clipdense finetune: error: dense must be 'attention' (DenseCLIP) or 'value' (MaskCLIP's path), got 'values'"
    ]
    assert not (tmp_path / "out" / "_run" / "config.yaml").exists()
    assert cli(["finetune", str(config), *FINETUNE_FAST, "student.dense=value"]) == 0
    assert yaml.safe_load((tmp_path / "out" / "_run" / "config.yaml").read_text())["student"]["dense"] == "value"


def test_runs_with_different_vocabularies_are_refused(labelled, tmp_path):
    other = str(tmp_path / "other")
    shutil.copytree(labelled["labels"], other)
    vocab = json.loads(Path(other, "_run/vocabulary.json").read_text())
    vocab["classes"][1], vocab["classes"][2] = vocab["classes"][2], vocab["classes"][1]
    Path(other, "_run/vocabulary.json").write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match="class 1 is .* cannot be mixed"):
        finetune(finetune_config([labelled["labels"], other], str(tmp_path / "out")))


def _label_maps(labels: str, shard: str, ext: str = ".seg.png") -> dict[str, np.ndarray]:
    """Key -> label (or `ext`) map of one committed label shard."""
    from pipeline.io.decode import decode_label_png
    from tests.jobs_fixtures import read_labels

    members = read_labels(labels, shard)
    return {name.split(".")[0]: decode_label_png(data) for name, data in members.items() if name.endswith(ext)}


def test_runs_that_must_agree_train_on_the_pixels_they_label_alike(tmp_path, capsys):
    from pipeline.train.config import DataCfg
    from pipeline.train.data import LabelStream
    from pipeline.train.runs import committed_units, open_runs
    from tests.jobs_fixtures import corrupt_image

    shapes, ours, theirs = str(tmp_path / "shapes"), str(tmp_path / "maskclip"), str(tmp_path / "naclip")
    write_dataset(shapes, 2, 4, size=64, seed=13)
    label_in_process(shapes, ours)
    shard = Path(shapes, "shapes-000000.tar")
    intact = shard.read_bytes()
    corrupt_image(str(shard), "000000_000001")
    label_in_process(shapes, theirs, "head.name=naclip")  # another teacher, whose row 1 failed
    shard.write_bytes(intact)  # the input itself is fine: only that run has no label for it
    Path(theirs, "_commits/shapes-000001.json").unlink()  # shard 1 is committed in one run only
    runs = open_runs([ours, theirs])
    units, skipped = committed_units(runs, combine="agree")
    assert [(u.shard, u.runs, u.samples, u.ok) for u in units] == [("shapes-000000", (0, 1), 4, 3)]
    assert skipped["not_in_every_run"] == 1

    a, b = _label_maps(ours, "shapes-000000"), _label_maps(theirs, "shapes-000000")
    a_conf, b_conf = _label_maps(ours, "shapes-000000", ".conf.png"), _label_maps(theirs, "shapes-000000", ".conf.png")
    assert sorted(b) == ["000000_000000", "000000_000002", "000000_000003"]
    differ = sum(int((a[k] != b[k]).sum()) for k in b)
    assert 0 < differ < sum(b[k].size for k in b)  # the two teachers agree on some pixels, not all
    same = DataCfg(scale=[1.0, 1.0], flip=False, jitter=0.0, shuffle_buffer=1)  # samples as labelled, in order
    stream = iter(LabelStream(runs, units, same, 1, 64, 255, seed=0))
    for key in sorted(b):
        batch = next(stream)
        np.testing.assert_array_equal(batch["labels"][0].numpy(), np.where(a[key] == b[key], a[key], 255))
        np.testing.assert_array_equal(batch["conf"][0].numpy(), np.minimum(a_conf[key], b_conf[key]))
    assert batch["skipped"] == {"missing_label": 1} and batch["used"] == 3

    summary = finetune(finetune_config([ours, theirs], str(tmp_path / "out"), "data.combine=agree"))
    assert summary["skipped"]["not_in_every_run"] == 1
    assert (summary["n_samples"], summary["failed_rows"], summary["skipped"]["missing_label"]) == (3, 1, 1)

    config = tmp_path / "ft.yaml"
    config.write_text(f"labels: [{theirs}]\noutput: {tmp_path / 'one'}\n")
    assert cli(["finetune", str(config), "data.combine=agree"]) == 2
    assert "error: data.combine=agree needs two or more labeling runs in labels" in capsys.readouterr().err
    moved = tmp_path / "moved"  # the same shard names, but another input: the runs cannot agree
    shutil.copytree(shapes, moved)
    elsewhere = str(tmp_path / "elsewhere")
    label_in_process(str(moved), elsewhere)
    with pytest.raises(ValueError, match="shard shapes-000000 of .*elsewhere labels .*moved.* runs that agree"):
        committed_units(open_runs([ours, elsewhere]), combine="agree")
    Path(elsewhere, "_commits/shapes-000000.json").unlink()
    with pytest.raises(ValueError, match="no shard is committed in every run"):
        committed_units(open_runs([theirs, elsewhere]), combine="agree")


@pytest.fixture(scope="module")
def faulty(tmp_path_factory) -> dict[str, str]:
    """A labeling run with a failed row (a corrupt image) in shard 0 and no commit marker for shard 1."""
    from tests.jobs_fixtures import corrupt_image

    root = tmp_path_factory.mktemp("faulty")
    shapes, labels = str(root / "shapes"), str(root / "labels")
    write_dataset(shapes, 2, 6, size=64, seed=12)
    corrupt_image(f"{shapes}/shapes-000000.tar", "000000_000002")
    label_in_process(shapes, labels)
    Path(labels, "_commits/shapes-000001.json").unlink()
    return {"shapes": shapes, "labels": labels}


def _first_pass(labels: str) -> dict:
    """Counts of one pass over a run's committed shards, through the fine-tune's own stream."""
    from pipeline.train.config import DataCfg
    from pipeline.train.data import LabelStream
    from pipeline.train.runs import committed_units, open_runs

    runs = open_runs([labels])
    units, _ = committed_units(runs)
    stream = LabelStream(runs, units, DataCfg(shuffle_buffer=1), 1, 32, 255, seed=0)
    batches = iter(stream)
    first = [next(batches) for _ in range(sum(u.ok for u in units))]
    return {"units": [u.shard for u in units], **first[-1]}


def test_uncommitted_shard_is_not_read_and_failed_row_is_skipped_and_counted(faulty):
    seen = _first_pass(faulty["labels"])
    assert seen["units"] == ["shapes-000000"]  # shard 1 has no marker
    assert seen["skipped"] == {"failed": 1} and seen["used"] == 5
    assert seen["image"].shape == (1, 3, 32, 32) and seen["labels"].shape == (1, 32, 32)


def test_label_shard_whose_checksum_differs_from_its_marker_is_not_read(faulty, tmp_path):
    labels = str(tmp_path / "labels")
    shutil.copytree(faulty["labels"], labels)
    tar = Path(labels, "labels/shapes-000000.tar")
    data = bytearray(tar.read_bytes())
    data[600] ^= 0xFF  # same size, one byte of the first label map changed
    tar.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="no usable sample"):
        _first_pass(labels)


def test_label_shard_missing_although_committed_is_counted_as_missing(faulty, tmp_path):
    labels = str(tmp_path / "labels")
    shutil.copytree(faulty["labels"], labels)
    Path(labels, "labels/shapes-000000.tar").unlink()
    expected = "no usable sample in 1 label shards (skipped: {'missing_file': 1})"
    with pytest.raises(ValueError, match=re.escape(expected)):
        _first_pass(labels)


def test_local_paths_of_a_finetune_config_become_absolute(labelled, tmp_path, monkeypatch):
    from pipeline.train.config import canonical_finetune_config

    monkeypatch.chdir(tmp_path)
    Path("student").mkdir()
    cfg = finetune_config(["runs/r1", "s3://bkt/r2", "file://~/r3"], "out", "eval.truth=truth", "model.name=student")
    canonical = canonical_finetune_config(cfg)
    home = os.path.expanduser("~")
    assert canonical.labels == [f"{tmp_path}/runs/r1", "s3://bkt/r2", f"{home}/r3"]
    assert (canonical.output, canonical.eval.truth) == (f"{tmp_path}/out", f"{tmp_path}/truth")
    assert canonical.model.name == f"{tmp_path}/student"  # an existing folder; an architecture name stays
    assert canonical_finetune_config(finetune_config(["r"], "o", "model.name=shapes-clip")).model.name == "shapes-clip"


def test_workers_train_on_the_label_set_read_at_the_start(labelled, tmp_path, caplog):
    """The runs' markers are read once, before any worker starts; a run that adds no shard is named in a
    warning, and the summary's teacher is the first run that adds shards."""
    unused, ours = tmp_path / "naclip", tmp_path / "labels"
    label_in_process(labelled["shapes"], str(unused), "head.name=naclip")
    shutil.rmtree(unused / "_commits")  # committed nothing
    shutil.copytree(labelled["labels"], ours)
    cfg = finetune_config([str(unused), str(ours)], str(tmp_path / "student"), "model.name=shapes-clip")
    label_set = read_label_set(open_runs(cfg.labels))
    assert f"{unused}: no committed label shard with labelled samples; it adds nothing to the fine-tune" in caplog.text
    shutil.rmtree(ours / "_commits")  # a worker listing the run now would find no shard
    summary = train_worker(cfg, label_set=label_set)
    assert summary["final_step"] == 4 and summary["label_shards"] == 2 and summary["n_samples"] == 16
    assert [(b["labels"], b["head"]) for b in summary["labelled_by"]] == [
        (str(unused), "naclip"),
        (str(ours), "maskclip"),
    ]
    assert summary["teacher"] == {"model": "shapes-clip", "pretrained": "", "head": "maskclip"}


def test_label_sets_no_worker_could_train_on_are_refused_in_one_line(labelled, tmp_path, capsys):
    from tests.jobs_fixtures import corrupt_image

    shapes, failed = str(tmp_path / "shapes"), str(tmp_path / "failed")
    write_dataset(shapes, 1, 2, size=64, seed=13)
    for key in ("000000_000000", "000000_000001"):
        corrupt_image(f"{shapes}/shapes-000000.tar", key)
    label_in_process(shapes, failed)
    rows = shutil.copytree(labelled["labels"], tmp_path / "rows")
    (rows / "meta/shapes-000000.parquet").write_bytes(b"PAR1 cut")
    marker = shutil.copytree(labelled["labels"], tmp_path / "marker") / "_commits/shapes-000001.json"
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "files"}))
    config = tmp_path / "ft.yaml"
    cases = {
        failed: ([], f"no labelled sample in {failed}: all 2 rows failed"),
        labelled["labels"]: (
            ["distribute.num_workers=4"],
            "distribute.num_workers=4, but only 2 label shards have labelled samples",
        ),
        str(rows): ([], f"{rows}/meta/shapes-000000.parquet: the rows of committed shard shapes-000000 cannot be read"),
        str(marker.parents[1]): ([], f"{marker}: not a readable commit marker (KeyError: 'files')"),
    }
    for labels, (overrides, expected) in cases.items():
        config.write_text(f"labels: [{labels}]\noutput: {tmp_path / 'out'}\n")
        capsys.readouterr()
        assert cli(["finetune", str(config), *FINETUNE_FAST, *overrides]) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert "Traceback" not in err and len(errors) == 1 and expected in errors[0], err
    assert not (tmp_path / "out").exists()


def test_checkpoints_and_export_on_s3(labelled, s3, s3_root):
    so = dict(s3.storage_options)
    out = f"{s3_root}/student"
    summary = finetune(finetune_config([labelled["labels"]], out, "optim.steps=2", storage_options=so))
    assert summary["final_step"] == 2
    assert fs.read_json(f"{out}/checkpoints/latest.json", so)["step"] == 2
    assert fs.exists(f"{out}/checkpoints/step-00000002.pt", so) and fs.exists(f"{out}/_run/summary.json", so)
    vocab = load_vocabulary(f"{labelled['shapes']}/vocabulary.json")
    labeler = DenseLabeler(RunCfg(model=ModelCfg(name=f"{out}/model"), storage_options=so), vocab, so)
    assert isinstance(labeler.head, DenseCLIPHead)
    (result,) = labeler([np.full((32, 48, 3), 128, np.uint8)])
    assert result.labels.shape == (32, 48)


@pytest.mark.slow
def test_two_ray_train_workers_complete_and_write_a_checkpoint(labelled, tmp_path, monkeypatch):
    """Labels and output given relative to the driver's folder: Ray Train workers run in folders of
    their own, so the driver makes them absolute (else no worker finds a label shard); the recorded config
    holds them absolute, and the same run named with absolute paths is the finished one."""
    out = str(tmp_path / "ray")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the driver's temporary folders go
    monkeypatch.chdir(tmp_path)
    lease = tmp_path / "lease"
    lease.mkdir()
    (lease / "lease-000000.json").write_text("{}")
    stop = Taken(str(lease), 0)  # a retraining step's lease check, held throughout: rank 0 asks, all hear
    relative = os.path.relpath(labelled["labels"])
    cfg = finetune_config([relative], "ray", "optim.steps=2", "distribute.num_workers=2")
    summary = finetune(cfg, stop)
    assert summary["final_step"] == 2 and summary["label_shards"] == 2
    assert summary["labels"] == [labelled["labels"]] and summary["skipped"] == {"no_input_shard": 0}
    recorded = yaml.safe_load(Path(out, "_run/config.yaml").read_text())
    assert recorded["labels"] == [labelled["labels"]] and recorded["output"] == out
    assert finetune(finetune_config([labelled["labels"]], out, "optim.steps=2", "distribute.num_workers=2")) == summary
    assert json.loads(Path(out, "checkpoints/latest.json").read_text())["step"] == 2
    assert Path(out, "model/student.safetensors").exists()
    lines = [json.loads(x) for x in Path(out, "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if m["kind"] == "train"] == [2]
    assert not any(p.name.startswith("clipdense-train-") for p in scratch.iterdir())  # Ray Train's scratch is gone


def test_a_ray_train_run_whose_lease_is_taken_stops(labelled, tmp_path):
    """Through `finetune`: Ray Train reports the workers' Stopped as its own error; the run says Stopped."""
    lease = tmp_path / "lease"
    lease.mkdir()
    (lease / "lease-000000.json").write_text("{}")
    (lease / "lease-000001.json").write_text("{}")  # another step took the key: generation 0 is stale
    out = tmp_path / "ray-stopped"
    cfg = finetune_config([labelled["labels"]], str(out), "optim.steps=2", "distribute.num_workers=2")
    with pytest.raises(Stopped, match="asked to stop"):
        finetune(cfg, Taken(str(lease), 0))
    assert not (out / "checkpoints").exists() and not (out / "_run/summary.json").exists()


def test_ray_train_workers_stop_together_after_an_evaluation(labelled, tmp_path):
    """Rank 0 evaluates alone; the stop check after it must still reach every rank, or the others would
    wait for rank 0 in the next step until Ray Train killed them. The stop turns True once that
    evaluation exported the model; each rank leaves a mark when it stops."""
    out, marks = tmp_path / "ray-stopped", tmp_path / "stopped"
    marks.mkdir()
    cfg = finetune_config(
        [labelled["labels"]], str(out), "optim.steps=4", "distribute.num_workers=2",
        f"eval.truth={labelled['shapes']}", "eval.every=2", "model.name=shapes-clip",  # the labels' model
    )  # fmt: skip
    stop = functools.partial(os.path.exists, str(out / "model" / "meta.json"))

    label_set = read_label_set(open_runs(cfg.labels))

    def worker(cfg, rank: int, world: int) -> dict:
        try:
            return train_worker(cfg, rank, world, stop=stop, label_set=label_set)
        except Stopped as exc:
            (marks / f"rank-{rank}").write_text(str(exc))
            raise

    with pytest.raises(RuntimeError, match="fine-tune workers failed"):
        run_train_workers(cfg, worker)
    said = {p.name: p.read_text() for p in marks.iterdir()}
    assert sorted(said) == ["rank-0", "rank-1"]
    assert all("asked to stop after the evaluation at step 2" in text for text in said.values())
    assert json.loads((out / "checkpoints/latest.json").read_text())["step"] == 2
    assert not (out / "checkpoints/step-00000004.pt").exists() and not (out / "_run/summary.json").exists()


def test_example_config_resolves_and_config_show_prints_the_finetune_keys(capsys):
    example = str(ROOT / "examples/finetune-shapes.yaml")
    assert cli(["config", "show", example, "optim.steps=7"]) == 0
    shown = capsys.readouterr().out
    assert "labels:\n- demo-out/labels\n" in shown and "steps: 7\n" in shown and "fpn_width: 64\n" in shown
    assert "aux_weight: 0.4\n" in shown and "backbone_lr_mult: 0.1\n" in shown  # defaults printed too
