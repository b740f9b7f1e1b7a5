"""Segmentation scores against values computed by hand on tiny label maps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.eval.metrics import NOT_A_CLASS, ConfusionMatrix, Scores, SmallObjectIoU, TruthObject


def test_iou_per_class_matches_hand_counts():
    truth = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, 2], [2, 2, 0, 2]])
    cm = ConfusionMatrix(3)
    cm.update(truth, pred)
    # class 0: TP 3, FN 1 (->1), FP 1 (from 2) -> 3/5; class 1: TP 3, FN 1, FP 1 -> 3/5; class 2: TP 3, FN 1, FP 1
    np.testing.assert_allclose(cm.iou(), [3 / 5, 3 / 5, 3 / 5])
    assert cm.miou() == pytest.approx(0.6)
    assert cm.pixel_accuracy() == pytest.approx(9 / 12)


def test_perfect_prediction_gives_one_and_streaming_equals_one_shot():
    rng = np.random.default_rng(0)
    maps = [rng.integers(0, 5, (7, 9)) for _ in range(4)]
    cm = ConfusionMatrix(5)
    for m in maps:
        cm.update(m, m)
    assert cm.miou() == 1.0
    noisy = [np.where(rng.uniform(size=m.shape) < 0.3, rng.integers(0, 5, m.shape), m) for m in maps]
    streamed, merged = ConfusionMatrix(5), ConfusionMatrix(5)
    for t, p in zip(maps, noisy, strict=True):
        streamed.update(t, p)
    merged.update(np.concatenate([m.ravel() for m in maps]), np.concatenate([m.ravel() for m in noisy]))
    np.testing.assert_array_equal(streamed.counts, merged.counts)


def test_ignored_predictions_are_misses_and_void_truth_is_skipped():
    truth = np.array([[0, 1, 1, 255]])
    pred = np.array([[0, 255, 1, 0]])  # 255 = low-confidence ignore
    cm = ConfusionMatrix(2)
    cm.update(truth, pred)
    # void truth pixel (255) not counted at all; class 1 loses the ignored pixel (FN), class 0 gains no FP
    np.testing.assert_allclose(cm.iou(), [1.0, 0.5])
    assert cm.ignored_fraction() == pytest.approx(1 / 3)


def test_classes_absent_from_truth_and_prediction_are_left_out_of_the_mean():
    cm = ConfusionMatrix(4)
    cm.update(np.array([[0, 0, 1]]), np.array([[0, 0, 2]]))
    iou = cm.iou()
    assert math.isnan(iou[3])
    assert iou[1] == 0.0 and iou[2] == 0.0  # class 2: predicted, never true -> counts as 0
    assert cm.miou() == pytest.approx((1 + 0 + 0) / 3)


def test_grouping_merges_classes_and_keeps_the_ignored_column():
    cm = ConfusionMatrix(3)
    cm.update(np.array([[1, 2, 0, 1]]), np.array([[2, 1, 0, 255]]))
    merged = cm.grouped([0, 1, 1])
    np.testing.assert_array_equal(merged.counts, [[1, 0, 0], [0, 2, 1]])
    np.testing.assert_allclose(merged.iou(), [1.0, 2 / 3])


def test_small_object_iou_uses_a_grown_box_and_skips_large_objects():
    truth = np.zeros((20, 20), dtype=np.uint8)
    truth[4:6, 4:6] = 3  # 4 px = 1% of the image: small
    truth[10:20, 0:20] = 2  # 200 px: large, not scored
    pred = np.zeros_like(truth)
    pred[4:6, 4:7] = 3  # one extra pixel inside the grown region (box grown by 1 px each side)
    pred[0, 19] = 3  # far away: outside the object's region, does not count
    objects = [TruthObject(3, (4, 4, 6, 6), 4), TruthObject(2, (0, 10, 20, 20), 200)]
    small = SmallObjectIoU()
    small.update(truth, pred, objects)
    assert small.count == 1
    assert small.mean == pytest.approx(4 / 6)
    assert small.pixel == pytest.approx(4 / 6)


def test_small_object_mean_and_pixel_weigh_objects_differently():
    truth = np.zeros((40, 40), dtype=np.uint8)
    truth[0:2, 0:2] = 1  # 4 px, found
    truth[20:26, 20:26] = 2  # 36 px, missed
    pred = np.where(truth == 1, 1, 0)
    small = SmallObjectIoU()
    small.update(truth, pred, [TruthObject(1, (0, 0, 2, 2), 4), TruthObject(2, (20, 20, 26, 26), 36)])
    assert small.mean == pytest.approx(0.5)
    assert small.pixel == pytest.approx(4 / 40)


def test_summary_names_classes_and_turns_undefined_into_null():
    scores = Scores(3)
    scores.update(np.array([[0, 1]]), np.array([[0, 0]]))
    out = scores.summary(["background", "cat", "dog"], background=0)
    assert out["per_class"] == {"background": 0.5, "cat": 0.0, "dog": None}
    assert out["background_iou"] == 0.5 and out["mIoU"] == 0.25
    assert out["small_object_iou"] is None and out["small_object_count"] == 0


def test_each_class_names_what_it_is_most_often_taken_for():
    truth = np.array([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2]])
    pred = np.array([[0, 1, 2, 2, 2, 2, 255, 2, 2, 2]])
    cm = ConfusionMatrix(3)
    cm.update(truth, pred)
    ids, shares = cm.most_confused()
    # class 0: 1 px as 1, 2 px as 2 of 4; class 1: 2 px as 2, 1 ignored of 3; class 2: never wrong
    assert ids.tolist() == [2, 2, -1]
    np.testing.assert_allclose(shares, [2 / 4, 2 / 3, 0.0])
    scores = Scores(3)
    scores.update(np.array([[1, 1, 1, 2]]), np.array([[255, 255, 0, 2]]))
    assert scores.summary(["background", "cat", "dog"], background=0)["confused_with"] == {
        "cat": {"class": NOT_A_CLASS, "share": round(2 / 3, 6)}
    }


def test_mismatched_sizes_are_refused():
    with pytest.raises(ValueError, match="differ in size"):
        ConfusionMatrix(2).update(np.zeros((2, 2)), np.zeros((2, 3)))
