"""Zoom-in: proposals (components, sample boxes, tiles, merging, budget) and re-inference merged back."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ZoomCfg, load_config
from pipeline.obs import CappedCounter
from pipeline.stages.infer import DenseLabeler, DenseResult
from pipeline.stages.proposals import (
    connected_components,
    first_pass,
    merge_regions,
    propose,
    protected,
    sample_boxes,
)
from pipeline.stages.zoom import ZoomLabeler, ZoomResult, blend
from pipeline.vocab import Vocabulary

TINY_VIT = str(Path(__file__).resolve().parent / "data" / "tiny-vit.json")  # input 64, patch 8
VOCAB = Vocabulary.from_entries(["background", "red circle", "blue square", "green star"], background=0)
NO_COMPONENTS = ZoomCfg(enabled=True, min_area=0.0, min_confidence=0.0)  # only boxes and tiles are proposed


@pytest.fixture(scope="module")
def labeler() -> DenseLabeler:
    torch.manual_seed(0)
    overrides = [f"model.name={TINY_VIT}", "model.device=cpu", "model.precision=fp32", "prompts.templates=single"]
    return DenseLabeler(load_config(None, overrides), VOCAB)


def _images(n: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    """(H, W, 3) uint8 images of 4 x 4 colour blocks, so a random-init model's maps are not uniform."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        colours = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        out.append(colours[np.arange(height) * 4 // height][:, np.arange(width) * 4 // width])
    return out


def test_components_of_a_hand_built_map():
    labels = np.array(
        [
            [1, 1, 0, 0, 2],
            [0, 1, 0, 2, 2],
            [1, 1, 0, 0, 0],
            [1, 0, 0, 3, 3],
        ]
    )
    confidence = np.where(labels == 1, 0.5, 1.0)
    found = {(c.label, c.box, c.area, c.mean_confidence) for c in connected_components(labels, confidence)}
    assert found == {
        (1, (0, 0, 2, 4), 6, 0.5),  # a C shape: its rows join through column 1
        (0, (0, 1, 1, 2), 1, 1.0),  # the hole inside the C is not connected to the rest of the zeros
        (0, (1, 0, 5, 4), 8, 1.0),
        (2, (3, 0, 5, 2), 3, 1.0),
        (3, (3, 3, 5, 4), 2, 1.0),
    }


def test_components_are_4_connected():
    diagonal = np.eye(3, dtype=np.int64)
    ones = [c for c in connected_components(diagonal) if c.label == 1]
    assert sorted(c.box for c in ones) == [(0, 0, 1, 1), (1, 1, 2, 2), (2, 2, 3, 3)]


def test_small_and_uncertain_components_are_proposed_confident_background_is_not():
    labels = np.zeros((40, 40), np.uint8)
    labels[4:8, 4:8] = 1  # 1% of the image, confident: small
    labels[10:30, 10:30] = 2  # 25%, confident: not proposed
    confidence = np.ones((40, 40), np.float32)
    confidence[32:36, 30:34] = 0.2  # uncertain background: where a missed object may hide
    cfg = ZoomCfg(enabled=True, max_regions=8, min_area=0.03, min_confidence=0.5, margin=0.0, merge_iou=0.9)
    regions = propose(first_pass(labels, confidence, cfg, 0), (80, 80), None, cfg, CappedCounter())
    # map pixels x2 = image pixels; each box is squared and at least 80 / 4 = 20 px wide, centred on the component
    assert sorted(regions) == [(2, 2, 22, 22), (54, 58, 74, 78)]


def test_only_large_confident_objects_are_protected_from_crops():
    labels = np.zeros((40, 40), np.uint8)
    labels[4:8, 4:8] = 1  # small (1%)
    labels[10:30, 10:30] = 2  # large and confident
    labels[32:40, 0:20] = 3  # large (10%) but unsure
    confidence = np.ones((40, 40), np.float32)
    confidence[32:40, 0:20] = 0.3
    cfg = ZoomCfg(enabled=True, min_area=0.03, min_confidence=0.5)
    assert np.array_equal(protected(first_pass(labels, confidence, cfg, 0), cfg), labels == 2)
    unprotected = dataclasses.replace(cfg, protect=False)
    assert not protected(first_pass(labels, confidence, unprotected, 0), unprotected).any()


def test_boxes_outside_or_empty_are_skipped_and_counted_never_fatal():
    skipped = CappedCounter()
    raw = [
        [-10, -5, 20, 30],  # clipped
        [100, 100, 120, 130],  # outside a 64 x 64 image
        [5, 5, 5, 30],  # zero width
        [9, 9, 3, 12],  # inverted
        [1, 2, 3],  # malformed
        [0, 0, float("nan"), 3],
        "box",
        [True, 0, 3, 3],
        [10, 12, 30, 40],
    ]
    assert sample_boxes(raw, (64, 64), skipped) == [(0.0, 0.0, 20.0, 30.0), (10.0, 12.0, 30.0, 40.0)]
    assert skipped.to_dict() == {
        "box clipped to the image (kept)": 1,
        "box outside the image": 1,
        "box of zero size": 2,
        "box is not 4 finite numbers [x0, y0, x1, y1]": 4,
    }
    assert sample_boxes({"x0": 1}, (64, 64), skipped) == [] and sample_boxes(None, (64, 64), skipped) == []
    assert skipped.counts["boxes is not a list of [x0, y0, x1, y1]"] == 1


def test_bad_boxes_through_the_stage_give_regions_inside_the_image(labeler):
    zoom = ZoomLabeler(labeler, dataclasses.replace(NO_COMPONENTS, margin=0.0))
    images = _images(2, 48, 64)
    results = zoom(images, boxes=[[[-20, -20, 10, 10], [70, 0, 90, 10]], "not boxes"])
    assert results[0].zoom_regions == [[0, 0, 12, 12]]  # clipped to 10 x 10, then grown to 48 / 4 = 12
    assert results[1].zoom_regions == []
    assert results[0].labels.shape == (48, 64)
    assert zoom.take_skipped() == {
        "box clipped to the image (kept)": 1,
        "box outside the image": 1,
        "boxes is not a list of [x0, y0, x1, y1]": 1,
    }
    assert zoom.take_skipped() == {}  # handed out once: a shard's marker counts only its own


def test_overlapping_proposals_merge_and_distant_ones_do_not():
    ranked = [(3.0, (0, 0, 20, 20)), (1.5, (2, 2, 22, 22)), (1.0, (60, 60, 80, 80))]
    merged = merge_regions(ranked, merge_iou=0.5, size=(100, 100))
    assert sorted(merged) == [(1.0, (60, 60, 80, 80)), (3.0, (0, 0, 25, 25))]  # union, squared to >= 100 / 4
    assert sorted(merge_regions(ranked, merge_iou=0.9, size=(100, 100))) == sorted(ranked)


def test_the_budget_keeps_the_best_proposals():
    boxes = [[10 * i, 0, 10 * i + 8, 8] for i in range(8)] + [[0, 50, 8, 58]]
    cfg = ZoomCfg(enabled=True, max_regions=3, margin=0.0, grid=4, merge_iou=1.0)  # no merging
    skipped = CappedCounter()
    regions = propose(
        first_pass(np.zeros((10, 10), np.uint8), np.ones((10, 10)), cfg, 0), (100, 100), boxes, cfg, skipped
    )
    assert regions == [(0, 0, 25, 25), (2, 0, 27, 25), (12, 0, 37, 25)]  # sample boxes first, then grid tiles
    assert skipped.counts["over the zoom.max_regions budget"] == 9 + 16 - 3


def test_budget_holds_per_image_through_the_stage(labeler):
    zoom = ZoomLabeler(labeler, dataclasses.replace(NO_COMPONENTS, max_regions=2, grid=3))
    results = zoom(_images(3, 64, 64))
    assert [len(r.zoom_regions) for r in results] == [2, 2, 2]


def test_a_crop_covering_the_whole_image_reproduces_the_first_pass(labeler):
    images = _images(2, 64, 64, seed=1)  # square at the model's input size: the crop is the first-pass input
    first = labeler.score_maps(images)
    for mode in ("replace", "confidence"):
        zoom = ZoomLabeler(labeler, dataclasses.replace(NO_COMPONENTS, blend=mode))
        maps, regions = zoom.apply(images, first, boxes=[[[0, 0, 64, 64]]] * 2)
        assert regions == [[(0, 0, 64, 64)]] * 2
        for zoomed, plain in zip(maps, first, strict=True):
            torch.testing.assert_close(zoomed, plain, atol=1e-5, rtol=1e-5)
    expected = labeler(images)
    got = ZoomLabeler(labeler, NO_COMPONENTS)(images, boxes=[[[0, 0, 64, 64]]] * 2)
    for a, b in zip(got, expected, strict=True):
        assert np.array_equal(a.labels, b.labels)


def test_the_crops_of_a_batch_run_in_one_forward(labeler):
    calls: list[int] = []
    hook = labeler.backbone.visual.conv1.register_forward_hook(lambda mod, args, out: calls.append(len(args[0])))
    try:
        images = _images(3, 64, 80, seed=2)
        first = labeler.score_maps(images)
        calls.clear()
        boxes = [[[0, 0, 20, 20], [40, 30, 60, 50]]] * 3
        _, regions = ZoomLabeler(labeler, NO_COMPONENTS).apply(images, first, boxes)
    finally:
        hook.remove()
    assert sum(len(r) for r in regions) == 6
    assert calls == [6]


def test_zoom_off_passes_the_labelers_results_through(labeler):
    images = _images(2, 40, 56, seed=3)
    off = ZoomLabeler(labeler, ZoomCfg(enabled=False))
    results = off(images, boxes=[[[0, 0, 10, 10]], None])
    assert all(isinstance(r, DenseResult) for r in results)
    for a, b in zip(results, labeler(images), strict=True):
        assert np.array_equal(a.labels, b.labels)


def test_zoom_records_regions_and_keeps_the_image_size(labeler):
    images = _images(2, 128, 160, seed=4)  # larger than the working size: merged on an enlarged canvas
    zoom = ZoomLabeler(labeler, ZoomCfg(enabled=True, min_confidence=1.0, max_regions=2))
    boxes = [[[20, 20, 40, 40]], [[100, 60, 150, 120]]]
    maps = zoom.score_maps(images, boxes)
    results = zoom(images, boxes)
    assert all(isinstance(r, ZoomResult) for r in results)
    for m, r in zip(maps, results, strict=True):
        assert r.labels.shape == (128, 160) and r.confidence.shape == (128, 160)
        assert 1 <= len(r.zoom_regions) <= 2
        assert m.shape == (len(VOCAB), 128, 160)
        for x0, y0, x1, y1 in r.zoom_regions:
            assert 0 <= x0 < x1 <= 160 and 0 <= y0 < y1 <= 128 and x1 - x0 == y1 - y0


def test_replace_blend_puts_the_crop_inside_the_region_only():
    full = torch.zeros(2, 4, 4)
    full[0] = 1.0  # class 0 everywhere
    crop = torch.zeros(2, 2, 2)
    crop[1] = 1.0  # class 1 in the crop
    out = blend(full, [(slice(1, 3), slice(0, 2))], [crop], "replace", logit_scale=10.0)
    expected = np.zeros((4, 4), np.int64)
    expected[1:3, 0:2] = 1
    assert np.array_equal(out.argmax(0).numpy(), expected)


def test_confidence_blend_weights_each_source_by_its_confidence():
    full = torch.tensor([[[2.0]], [[0.0]]])  # confident class 0
    crop = torch.tensor([[[0.0]], [[0.1]]])  # unsure class 1
    out = blend(full, [(slice(0, 1), slice(0, 1))], [crop], "confidence", logit_scale=1.0)
    c_full, c_crop = torch.softmax(full[:, 0, 0], 0).max(), torch.softmax(crop[:, 0, 0], 0).max()
    expected = (full[:, 0, 0] * c_full + crop[:, 0, 0] * c_crop) / (c_full + c_crop)
    torch.testing.assert_close(out[:, 0, 0], expected)
    assert out.argmax(0).item() == 0


@pytest.mark.parametrize("mode", ["replace", "confidence"])
def test_blend_leaves_kept_pixels_alone(mode):
    full = torch.zeros(2, 4, 4)
    full[0] = 1.0  # class 0 everywhere
    crop = torch.zeros(2, 4, 4)
    crop[1] = 5.0  # a confident class 1 over the whole image
    keep = torch.zeros(4, 4, dtype=torch.bool)
    keep[:2] = True
    out = blend(full, [(slice(0, 4), slice(0, 4))], [crop], mode, logit_scale=10.0, keep=keep)
    torch.testing.assert_close(out[:, :2], full[:, :2])
    assert (out[:, 2:].argmax(0) == 1).all()


def test_segment_and_eval_commands_zoom_in_when_enabled(tmp_path, monkeypatch):
    from PIL import Image

    from jobs.cli import main
    from pipeline.data.shapeworld_shards import write_dataset

    applied: list[list] = []  # regions of every real ZoomLabeler.apply call the commands make
    real_apply = ZoomLabeler.apply

    def spy(self, *args, **kwargs):
        maps, regions = real_apply(self, *args, **kwargs)
        applied.append(regions)
        return maps, regions

    monkeypatch.setattr(ZoomLabeler, "apply", spy)

    tiny = [f"model.name={TINY_VIT}", "model.device=cpu", "model.precision=fp32", "prompts.templates=single"]
    zoom = ["zoom.enabled=true", "zoom.grid=2", "zoom.max_regions=2"]
    image = tmp_path / "blocks.png"
    Image.fromarray(_images(1, 48, 64)[0]).save(image)
    argv = ["segment", str(image), "--classes", "background, red circle", "--out", str(tmp_path), *tiny, *zoom]
    assert main(argv) == 0
    assert np.asarray(Image.open(tmp_path / "blocks.seg.png")).shape == (48, 64)
    assert len(applied) == 1 and len(applied[0][0]) == 2
    write_dataset(str(tmp_path / "shapes"), shards=1, per_shard=2, size=64, seed=5, small_objects=True)
    report = tmp_path / "report.json"
    argv = ["eval", "--truth", str(tmp_path / "shapes"), "--head", "maskclip", "--no-random-baseline"]
    assert main([*argv, "--json", str(report), *tiny, *zoom]) == 0
    assert json.loads(report.read_text())["n_images"] == 2
    assert len(applied) == 2 and [len(r) for r in applied[1]] == [2, 2]
