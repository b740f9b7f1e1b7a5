"""`clipdense eval` end to end on real shards: ShapeWorld truth, run outputs written by the label sink,
a VOC-style folder, and (with the engine) a tiny random-init model run on the fly."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.cli import main
from pipeline.config import load_config
from pipeline.data.shapeworld_shards import write_dataset
from pipeline.eval.calibrate import calibrate_background_offset
from pipeline.eval.diagnostics import colour_groups, restrict, top_k_classes, true_classes
from pipeline.eval.evaluate import evaluate_labelers, evaluate_run_output
from pipeline.eval.predictions import RunOutputPredictions
from pipeline.eval.truth import open_truth
from pipeline.io.read import Sample, iter_samples
from pipeline.outputs import write_vocabulary
from pipeline.stages.infer import DenseLabeler
from pipeline.stages.write import LabelShardSink, RowContext
from pipeline.vocab import Vocabulary

N_CLASSES = 37


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("shapes"))
    write_dataset(out, shards=2, per_shard=3, size=32, seed=7, small_objects=True)
    return out


def _truth_samples(shapes: str) -> list[Sample]:
    samples = []
    for shard in ("shapes-000000", "shapes-000001"):
        samples += [s for s in iter_samples(f"{shapes}/{shard}.tar") if isinstance(s, Sample)]
    return samples


def _seg(sample: Sample) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(sample.extra["seg.png"])))


def _write_run(out: str, shapes: str, label_fn, shards=("shapes-000000", "shapes-000001"), vocab=None) -> str:
    """A run output as the labeling job writes it, with label map label_fn(sample) for each sample."""
    vocab = vocab or Vocabulary.from_entries(json.load(open(f"{shapes}/vocabulary.json"))["classes"], 0)
    write_vocabulary(out, vocab, ["a photo of a {}."], "0" * 64)
    for shard in shards:
        sink = LabelShardSink(out, shard, len(vocab), RowContext("maskclip", "shapes-clip", "abc"))
        for i, sample in enumerate(s for s in iter_samples(f"{shapes}/{shard}.tar") if isinstance(s, Sample)):
            labels = label_fn(sample).astype(np.uint8)
            sink.add(i, sample.key, labels, np.ones(labels.shape, np.float32))
        sink.commit()
    return out


def test_run_output_built_from_the_truth_scores_one(shapes, tmp_path):
    run = _write_run(str(tmp_path / "run"), shapes, lambda s: _seg(s))
    report = evaluate_run_output(open_truth(shapes), RunOutputPredictions(run))
    assert report["n_images"] == 6
    assert report["mIoU"] == 1.0 and report["background_iou"] == 1.0
    assert report["small_object_iou"] == 1.0 and report["small_object_count"] >= 3
    assert report["colour_mIoU"] == 1.0
    assert report["predictions"]["missing"] == 0


def test_all_background_run_scores_the_background_share(shapes, tmp_path, capsys):
    run = _write_run(str(tmp_path / "run"), shapes, lambda s: np.zeros_like(_seg(s)))
    report = evaluate_run_output(open_truth(shapes), RunOutputPredictions(run))
    segs = [_seg(s) for s in _truth_samples(shapes)]
    bg_share = sum((s == 0).sum() for s in segs) / sum(s.size for s in segs)
    present = sorted(set(np.concatenate([np.unique(s) for s in segs]).tolist()) - {0})
    expected = bg_share / (1 + len(present))  # background IoU, then 0 for every object class present
    assert report["mIoU"] == pytest.approx(expected, abs=1e-6)
    assert report["background_iou"] == pytest.approx(bg_share, abs=1e-6)
    assert report["small_object_iou"] == 0.0
    assert report["baselines"]["all_background"]["mIoU"] == pytest.approx(expected, abs=1e-6)
    names = json.loads(Path(shapes, "vocabulary.json").read_text())["classes"]
    assert report["confused_with"] == {names[c]: {"class": "background", "share": 1.0} for c in present}
    assert main(["eval", "--truth", shapes, "--pred", run]) == 0
    printed = capsys.readouterr().out.splitlines()
    for c in present:  # the table says it too
        (line,) = [x for x in printed if x.split("  0.000")[0].strip() == names[c]]
        assert line.endswith("most often taken for background (1.00)")


def test_uncommitted_shard_counts_as_misses_and_ignore_pixels_too(shapes, tmp_path):
    run = _write_run(str(tmp_path / "run"), shapes, lambda s: _seg(s), shards=("shapes-000000",))
    report = evaluate_run_output(open_truth(shapes), RunOutputPredictions(run))
    assert report["predictions"]["missing"] == 3
    assert 0.0 < report["mIoU"] < 1.0
    assert report["ignored_fraction"] == pytest.approx(0.5, abs=0.01)  # 3 of 6 equal-size images unlabelled

    ignored = _write_run(str(tmp_path / "ignored"), shapes, lambda s: np.where(_seg(s) > 0, 255, 0))
    report = evaluate_run_output(open_truth(shapes), RunOutputPredictions(ignored))
    assert report["background_iou"] == 1.0  # no false positives from ignored pixels
    assert all(v == 0.0 for name, v in report["per_class"].items() if name != "background" and v is not None)


def test_run_classes_are_matched_to_truth_classes_by_name(shapes, tmp_path):
    names = json.load(open(f"{shapes}/vocabulary.json"))["classes"]
    reordered = Vocabulary.from_entries([names[0], *reversed(names[1:])], 0)
    to_run = np.array([0, *range(N_CLASSES - 1, 0, -1)], dtype=np.uint8)  # truth id -> run id
    run = _write_run(str(tmp_path / "run"), shapes, lambda s: to_run[_seg(s)], vocab=reordered)
    report = evaluate_run_output(open_truth(shapes), RunOutputPredictions(run))
    assert report["mIoU"] == 1.0


def test_cli_writes_table_and_json(shapes, tmp_path, capsys):
    run = _write_run(str(tmp_path / "run"), shapes, lambda s: _seg(s))
    out = tmp_path / "report.json"
    assert main(["eval", "--truth", shapes, "--pred", run, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"6 images of {shapes} (shards), 37 classes\n")
    assert "all_background" in printed and "not scored, left out of the mean" in printed
    report = json.loads(out.read_text())
    for field in ("mIoU", "per_class", "background_iou", "small_object_iou", "baselines"):
        assert field in report
    assert report["mIoU"] == 1.0


def test_a_truth_and_run_whose_classes_share_a_word_are_scored(shapes, tmp_path, capsys):
    truth = tmp_path / "truth"
    truth.mkdir()
    for shard in ("shapes-000000", "shapes-000001"):
        shutil.copy(f"{shapes}/{shard}.tar", truth)
    data = json.load(open(f"{shapes}/vocabulary.json"))
    data["classes"][1] += ", shape"  # two classes named "shape" too, as real vocabularies (ADE20K) have
    data["classes"][2] += ", shape"
    (truth / "vocabulary.json").write_text(json.dumps(data))
    run = _write_run(str(tmp_path / "run"), str(truth), lambda s: _seg(s))
    out = tmp_path / "report.json"
    assert main(["eval", "--truth", str(truth), "--pred", run, "--json", str(out)]) == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["mIoU"] == 1.0


def test_cli_names_a_folder_that_is_not_a_run(shapes, tmp_path, capsys):
    assert main(["eval", "--truth", shapes, "--pred", str(tmp_path)]) == 2
    assert "not a labeling run's output" in capsys.readouterr().err


def _voc_folder(root) -> str:
    """Two 20x24 images, classes background/cat/dog, a void border, instance maps for small objects."""
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationObject"):
        (root / sub).mkdir(parents=True)
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (252 * 3) + [224, 224, 192]
    for i in range(2):
        cls = np.zeros((20, 24), np.uint8)
        inst = np.zeros((20, 24), np.uint8)
        cls[2:12, 2:14], inst[2:12, 2:14] = 1, 1  # a large cat
        cls[15:17, 18:20], inst[15:17, 18:20] = 2, 2  # a 4-pixel dog (< 3% of 480)
        cls[0, :], inst[0, :] = 255, 255  # void border
        for sub, arr in (("SegmentationClass", cls), ("SegmentationObject", inst)):
            img = Image.fromarray(arr)
            img.putpalette(palette)
            img.save(root / sub / f"img{i}.png")
        Image.fromarray(np.full((20, 24, 3), 90, np.uint8)).save(root / "JPEGImages" / f"img{i}.jpg")
    return str(root)


def test_voc_folder_reads_palette_labels_instances_and_class_list(tmp_path):
    truth = open_truth(_voc_folder(tmp_path / "voc"))
    assert truth.kind == "voc" and truth.vocab.display_names == ["background", "cat", "dog"]
    assert truth.vocab.background == 0
    samples = list(truth.samples())
    assert [s.key for s in samples] == ["img0", "img1"]
    first = samples[0]
    assert first.image.shape == (20, 24, 3) and first.truth[0, 0] == 255 and first.truth[3, 3] == 1
    assert {(o.class_id, o.box, o.area) for o in first.objects} == {(1, (2, 2, 14, 12), 120), (2, (18, 15, 20, 17), 4)}


def test_voc_folder_cannot_be_scored_against_a_run_output(tmp_path, shapes):
    run = _write_run(str(tmp_path / "run"), shapes, lambda s: _seg(s))
    with pytest.raises(ValueError, match="not a set of shards"):
        evaluate_run_output(open_truth(_voc_folder(tmp_path / "voc")), RunOutputPredictions(run))


# --- diagnostics and the on-the-fly head path (tiny random-init model, CPU) ---

TINY_VIT = str(Path(__file__).resolve().parent / "data" / "tiny-vit.json")
TINY = [f"model.name={TINY_VIT}", "model.device=cpu", "model.precision=fp32", "prompts.templates=single"]


def test_restriction_masks_logits_before_the_argmax():
    scores = torch.tensor([[[0.1, 0.9]], [[0.5, 0.2]], [[0.4, 0.3]]])  # (K=3, 1, 2)
    restricted = restrict(scores, np.array([True, False, True]))
    assert restricted.argmax(dim=0).tolist() == [[2, 0]]
    assert torch.isfinite(restricted).all()
    assert true_classes(np.array([[0, 2, 255]]), 3).tolist() == [True, False, True]
    # image-level max: class 2 peaks at 0.4, class 1 at 0.5; background (0) always kept
    assert top_k_classes(scores, 1, background=0).tolist() == [True, True, False]


def test_colour_groups_merge_shapeworld_classes_by_colour():
    groups = colour_groups(load_vocabulary_json_shapes())
    assert groups[0] == 0 and len(set(groups)) == 7
    assert groups[1] == groups[6] != groups[7]  # red circle, red cross | orange circle
    assert colour_groups(Vocabulary.from_entries(["background", "cat"], 0)) is None


def load_vocabulary_json_shapes() -> Vocabulary:
    from pipeline.data.shapeworld import vocabulary_json

    data = vocabulary_json()
    return Vocabulary.from_entries(data["classes"], data["background"])


def test_head_on_the_fly_reports_diagnostics_baselines_and_zero_shot(shapes, tmp_path, capsys):
    out = tmp_path / "head.json"
    # overrides straight after --truth: they are config keys, not more truth shards
    argv = ["eval", "--head", "maskclip", "--json", str(out), "--zero-shot", "12", "--truth", shapes, *TINY]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "random_init" in printed and "zero-shot" in printed
    report = json.loads(out.read_text())
    assert report["n_images"] == 6 and report["predictions"]["head"] == "maskclip"
    assert set(report["baselines"]) == {"all_background", "random_init"}
    for summary in (report, report["baselines"]["random_init"]):
        assert 0.0 <= summary["mIoU"] <= 1.0
        assert set(summary["diagnostics"]) == {"true_classes", "top_k"}
        assert summary["colour_mIoU"] is not None
    zs = report["zero_shot"]
    assert zs["n"] == 12 and zs["colour_accuracy"] >= zs["accuracy"] and zs["shape_accuracy"] >= zs["accuracy"]


def test_true_class_diagnostic_is_perfect_on_single_class_images(tmp_path):
    root = tmp_path / "voc"
    for sub in ("JPEGImages", "SegmentationClass"):
        (root / sub).mkdir(parents=True)
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(np.full((40, 48), i + 1, np.uint8)).save(root / "SegmentationClass" / f"k{i}.png")
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"k{i}.png")
    cfg = load_config(None, [*TINY, "head.name=maskclip"])
    truth = open_truth(str(root))
    report = evaluate_labelers(truth, DenseLabeler(cfg, truth.vocab), top_k=1)
    assert report["diagnostics"]["true_classes"]["mIoU"] == 1.0
    assert report["n_images"] == 2


def test_a_voc_split_of_one_image_is_counted_in_the_singular(tmp_path, capsys):
    voc = _voc_folder(tmp_path / "voc")
    (tmp_path / "voc" / "ImageSets" / "Segmentation").mkdir(parents=True)
    (tmp_path / "voc" / "ImageSets" / "Segmentation" / "one.txt").write_text("img1\n")
    argv = ["eval", "--truth", voc, "--split", "one", "--head", "maskclip", "--no-random-baseline", *TINY]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"1 image of {voc} (voc), 3 classes"


def test_background_calibration_scans_offsets_on_one_forward_pass(shapes):
    truth = open_truth(shapes)
    labeler = DenseLabeler(load_config(None, [*TINY, "head.name=maskclip"]), truth.vocab)
    result = calibrate_background_offset(labeler, truth, base_offset=0.25, shifts=(0.0, 100.0))
    segs = [_seg(s) for s in _truth_samples(shapes)]
    bg_share = sum((s == 0).sum() for s in segs) / sum(s.size for s in segs)
    all_background = bg_share / (1 + len(set(np.concatenate([np.unique(s) for s in segs]).tolist()) - {0}))
    assert [offset for offset, _ in result["curve"]] == [0.25, 100.25]
    assert result["curve"][1][1] == pytest.approx(all_background, abs=1e-6)  # a huge offset: all background
    assert result["background_offset"] in (0.25, 100.25) and result["n_images"] == 6


def test_cli_calibrates_the_background_offset_and_writes_the_curve(shapes, tmp_path, capsys):
    out = tmp_path / "calibration.json"
    argv = ["eval", "--truth", shapes, "--head", "maskclip", "--calibrate-background", "--offsets=-0.1:0.1:0.1"]
    assert main([*argv, "--json", str(out), *TINY, "vocab.background_offset=0.05"]) == 0
    report = json.loads(out.read_text())
    assert [offset for offset, _ in report["curve"]] == pytest.approx([-0.05, 0.05, 0.15])
    assert report["background_offset"] in [offset for offset, _ in report["curve"]]
    assert "vocab.background_offset=" in capsys.readouterr().out


def test_cli_without_a_head_runs_the_configs_and_refuses_two_heads(shapes, tmp_path, capsys):
    out = tmp_path / "default.json"
    assert main(["eval", "--truth", shapes, "--no-random-baseline", "--json", str(out), *TINY]) == 0
    assert json.loads(out.read_text())["predictions"]["head"] == "maskclip"  # unset: the plain model's default
    capsys.readouterr()
    assert main(["eval", "--truth", shapes, "--head", "naclip", *TINY, "head.name=sclip"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "--head naclip and head.name=sclip name different heads" in line


def test_cli_refuses_model_options_without_a_model(shapes, tmp_path, capsys):
    run = _write_run(str(tmp_path / "run"), shapes, lambda s: _seg(s))
    assert main(["eval", "--truth", shapes, "--pred", run, "--zero-shot", "5"]) == 2
    assert "need a model" in capsys.readouterr().err


def test_a_run_output_scores_the_same_as_its_labeler_on_the_fly(shapes, tmp_path):
    truth = open_truth(shapes)
    labeler = DenseLabeler(load_config(None, [*TINY, "head.name=maskclip"]), truth.vocab)
    run = _write_run(str(tmp_path / "run"), shapes, lambda s: labeler([s.image])[0].labels)
    from_run = evaluate_run_output(truth, RunOutputPredictions(run))
    on_the_fly = evaluate_labelers(truth, labeler)
    for key in ("mIoU", "per_class", "background_iou", "small_object_iou", "colour_mIoU", "ignored_fraction"):
        assert from_run[key] == on_the_fly[key]
