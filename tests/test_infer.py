"""Dense inference: windows, the labeler's score maps and labels, finalize in stripes, PAMR."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny_models import blocky_uint8, tiny_backbone

from pipeline import schema
from pipeline.config import load_config
from pipeline.models.pamr import pamr
from pipeline.stages import infer
from pipeline.stages import windows as win
from pipeline.stages.infer import DenseLabeler
from pipeline.vocab import Vocabulary

VOCAB = Vocabulary.from_entries(["background", "red circle", "blue square", "green triangle"], background=0)


def _labeler(*overrides: str, vocab: Vocabulary = VOCAB, kind: str = "vit") -> DenseLabeler:
    cfg = load_config(None, ["prompts.templates=single", *overrides])
    return DenseLabeler(cfg, vocab, backbone=tiny_backbone(kind))


def test_window_plan_covers_the_image_flush_with_its_edges():
    assert win.starts(100, 64, 32) == [0, 32, 36]
    assert win.starts(64, 64, 32) == [0] and win.starts(40, 64, 32) == [0]
    size, windows = win.plan(70, 130, 64, 32, multiple=8)
    assert size == (64, 64)
    assert sorted({(w.y0, w.y1) for w in windows}) == [(0, 64), (6, 70)]
    assert sorted({(w.x0, w.x1) for w in windows}) == [(0, 64), (32, 96), (64, 128), (66, 130)]
    assert win.plan(50, 60, 0, 0, multiple=8) == ((56, 64), [win.Window(0, 0, 50, 60)])
    assert win.plan(40, 40, 64, 0, multiple=8) == ((64, 64), [win.Window(0, 0, 40, 40)])  # padded
    with pytest.raises(ValueError, match="infer.stride 80"):
        win.plan(100, 100, 64, 80, multiple=8)


def test_stitch_averages_overlapping_windows():
    windows = [win.Window(0, 0, 4, 4), win.Window(0, 2, 4, 6)]
    scores = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 3.0)])
    out = win.stitch(scores, windows, (4, 4), (4, 6))
    assert out[0, :, :2].eq(1).all() and out[0, :, 2:4].eq(2).all() and out[0, :, 4:].eq(3).all()


@pytest.mark.parametrize(
    ("h", "w", "size"),
    [((8, 8, (64, 64))), ((14, 14, (224, 224))), ((5, 7, (37, 50))), ((1, 1, (8, 8))), ((70, 90, (100, 120)))],
)
def test_stitch_upsamples_as_interpolate_does(h, w, size):
    scores = torch.randn(3, 4, h, w, generator=torch.Generator().manual_seed(0))
    up = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
    windows = [
        win.Window(0, 0, *size),
        win.Window(-3, 0, size[0] - 3, size[1]),
        win.Window(0, -2, size[0], size[1] - 2),
    ]
    expected = torch.zeros(4, *size)
    expected += up[0]
    expected[:, : size[0] - 3] += up[1, :, 3:]
    expected[:, :, : size[1] - 2] += up[2, :, :, 2:]
    count = torch.full(size, 3.0)
    count[size[0] - 3 :] -= 1
    count[:, size[1] - 2 :] -= 1
    assert torch.allclose(win.stitch(scores, windows, size, size), expected / count, atol=1e-5)


def _stitch_reference(scores: torch.Tensor, windows: list, size: tuple, out_size: tuple) -> torch.Tensor:
    """Each window upsampled by `F.interpolate`, cut to the image, summed and averaged: in float64."""
    up = F.interpolate(scores.double(), size=size, mode="bilinear", align_corners=False)
    canvas = torch.zeros(scores.shape[1], *out_size, dtype=torch.float64)
    count = torch.zeros(out_size, dtype=torch.float64)
    for u, w in zip(up, windows, strict=True):
        y0, x0 = max(0, w.y0), max(0, w.x0)
        canvas[:, y0 : w.y1, x0 : w.x1] += u[:, y0 - w.y0 : w.y1 - w.y0, x0 - w.x0 : w.x1 - w.x0]
        count[y0 : w.y1, x0 : w.x1] += 1
    return canvas / count


@pytest.mark.parametrize(
    ("height", "width", "crop", "stride", "shifts"),
    [(70, 130, 32, 16, 2), (21, 30, 16, 8, 2), (200, 90, 64, 48, 3), (96, 96, 0, 0, 2), (40, 300, 32, 8, 1)],
)
def test_stitch_of_tiled_and_shifted_windows_is_the_average_of_their_upsampled_scores(
    height, width, crop, stride, shifts
):
    """Many windows sharing rows and columns (tiles, sub-patch shifts, windows cut at the far edge)."""
    size, windows = win.plan(height, width, crop, stride, multiple=8, shifts=shifts)
    scores = torch.randn(len(windows), 3, size[0] // 8, size[1] // 8, generator=torch.Generator().manual_seed(1))
    expected = _stitch_reference(scores, windows, size, (height, width))
    assert torch.allclose(win.stitch(scores, windows, size, (height, width)).double(), expected, atol=1e-5)
    half = scores.bfloat16()  # summed in float32, kept in the scores' dtype
    out = win.stitch(half, windows, size, (height, width))
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.double(), _stitch_reference(half, windows, size, (height, width)), atol=2e-2)
    with pytest.raises(ValueError, match=f"{len(windows) - 1} window scores for {len(windows)} windows"):
        win.stitch(scores[1:], windows, size, (height, width))


def test_finiteness_is_told_per_image_from_one_batch_of_windows():
    """The engine stitches each image of a batch with its own windows' finiteness."""
    scores = torch.zeros(9, 2, 3, 3)  # three images of 2, 4 and 3 windows
    scores[5, 1, 2, 0] = float("inf")  # the second image's last window
    assert win.finite_by_image(scores, [2, 4, 3]) == [True, False, True]
    scores[6, 0, 0, 0] = float("nan")  # the third image's first window
    assert win.finite_by_image(scores, [2, 4, 3]) == [True, False, False]
    assert win.finite_by_image(scores, [6, 3]) == [False, False] and win.finite_by_image(scores[:5], [5]) == [True]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_window_score_that_is_not_finite_stays_in_its_window(bad):
    """A model that overflows in one window must not spoil the pixels only other windows cover."""
    size, windows = win.plan(70, 130, 32, 16, multiple=8, shifts=1)
    scores = torch.randn(len(windows), 3, size[0] // 8, size[1] // 8, generator=torch.Generator().manual_seed(2))
    scores[1, 0, 1, 2] = bad
    expected = _stitch_reference(scores, windows, size, (70, 130))
    for finite in (None, False):  # checked here, or told by the caller (the engine checks per batch)
        out = win.stitch(scores, windows, size, (70, 130), finite=finite).double()
        assert torch.equal(out.isfinite(), expected.isfinite()) and expected.isfinite().float().mean() > 0.9
        assert torch.allclose(out[out.isfinite()], expected[expected.isfinite()], atol=1e-5)


def test_first_argmax_is_max_with_indices_ties_included():
    scores = torch.randn(40, 9, 11, generator=torch.Generator().manual_seed(0))
    scores[7, :3] = scores[3, :3] = scores[30, :3] = 9.0  # ties: the first class wins, as in max(dim=0)
    scores[:, 5, 5] = 1.0
    top = scores.amax(dim=0)
    assert torch.equal(infer.first_argmax(scores, top), scores.max(dim=0).indices)
    assert infer.first_argmax(scores, top)[0, 0] == 3 and infer.first_argmax(scores, top)[5, 5] == 0
    scores[:, 2, 2] = float("nan")
    assert infer.first_argmax(scores, scores.amax(dim=0))[2, 2] == 40  # no class: the caller's ignore


def test_shifted_windows_start_above_and_left_by_fractions_of_a_patch():
    size, windows = win.plan(64, 64, 0, 0, multiple=8, shifts=2)
    assert size == (64, 64)
    assert [(w.y0, w.x0, w.y1, w.x1) for w in windows] == [
        (0, 0, 64, 64),
        (0, -4, 64, 60),
        (-4, 0, 60, 64),
        (-4, -4, 60, 60),
    ]
    _, windows = win.plan(70, 70, 64, 32, multiple=16, shifts=4)
    assert len(windows) == 4 * 16 and sorted({w.y0 for w in windows}) == [-12, -8, -6, -4, -2, 0, 2, 6]
    assert win.plan(64, 64, 0, 0, multiple=8, shifts=1)[1] == [win.Window(0, 0, 64, 64)]
    with pytest.raises(ValueError, match="infer.shifts 0"):
        win.plan(64, 64, 0, 0, multiple=8, shifts=0)


def test_cut_then_stitch_of_shifted_windows_gives_back_the_image():
    """Each shifted crop holds the image moved down/right, padded with zeros; stitching the crops
    themselves as full-resolution "scores" must put every pixel back where it was."""
    image = torch.rand(3, 21, 30)
    size, windows = win.plan(21, 30, 16, 8, multiple=8, shifts=2)
    crops = win.cut(image, windows, size)
    shifted = crops[windows.index(win.Window(-4, -4, 12, 12))]
    assert shifted[:, :4].eq(0).all() and shifted[:, :, :4].eq(0).all()
    assert torch.equal(shifted[:, 4:, 4:], image[:, :12, :12])
    assert torch.allclose(win.stitch(crops, windows, size, (21, 30)), image, atol=1e-6)


def _bend_rows(score_map: torch.Tensor) -> set[int]:
    """Interior rows (8..55) where a (K, 64, 64) map bends: a bilinear map is straight between the
    centres of its grid cells, so its second difference along y is zero except beside them."""
    d2 = (score_map[:, 2:] - 2 * score_map[:, 1:-1] + score_map[:, :-2]).abs().sum(dim=(0, 2))
    rows = torch.nonzero(d2 > 1e-3 * d2.max()).flatten() + 1
    return {int(r) for r in rows if 8 <= r < 56}


def test_sub_patch_shifts_put_the_map_on_a_finer_grid():
    images = blocky_uint8(2, 64, 64, seed=11)
    single = _labeler("infer.short_side=64").score_maps(images)
    shifted = _labeler("infer.short_side=64", "infer.shifts=2").score_maps(images)
    for a, b in zip(single, shifted, strict=True):
        assert a.shape == b.shape == (len(VOCAB), 64, 64)
        # patch centres every 8 px (between rows 8k+3 and 8k+4); with 2 shifts, every 4 px
        assert _bend_rows(a) == {r for r in range(8, 56) if r % 8 in (3, 4)}
        assert _bend_rows(b) == {r for r in range(8, 56) if r % 4 in (3, 0)}


def test_a_window_covering_the_image_equals_whole_image_inference():
    images = blocky_uint8(2, 64, 64, seed=1)
    whole = _labeler("infer.short_side=64", "infer.crop=0").score_maps(images)
    window = _labeler("infer.short_side=64", "infer.crop=64").score_maps(images)
    for a, b in zip(whole, window, strict=True):
        assert a.shape == (len(VOCAB), 64, 64) and torch.allclose(a, b, atol=1e-5)


def test_windows_of_all_images_run_as_one_batch_with_the_same_result_as_one_by_one():
    images = blocky_uint8(3, 80, 100, seed=2) + blocky_uint8(1, 120, 90, seed=3)
    together = _labeler("infer.short_side=80", "infer.crop=64", "infer.stride=32", "infer.batch_size=4")
    alone = _labeler("infer.short_side=80", "infer.crop=64", "infer.stride=32", "infer.batch_size=1")
    for a, b in zip(together.score_maps(images), alone.score_maps(images), strict=True):
        assert torch.allclose(a, b, atol=1e-4)
    assert [m.shape[1:] for m in together.score_maps(images)] == [(80, 100)] * 3 + [(107, 80)]


def test_labels_and_confidence_at_the_original_size():
    lab = _labeler("infer.short_side=64", "infer.crop=0")
    images = blocky_uint8(2, 50, 70, seed=4)
    results = lab(images)
    for img, res in zip(images, results, strict=True):
        assert res.labels.shape == img.shape[:2] and res.labels.dtype == np.uint8
        assert res.confidence.dtype == np.float32 and 0 <= res.confidence.min() <= res.confidence.max() <= 1
        assert res.labels.max() < len(VOCAB)
    score = lab.score_maps(images[:1])[0]
    up = F.interpolate(score[None], size=(50, 70), mode="bilinear", align_corners=False)[0]
    prob = torch.softmax(40 * up, dim=0)
    assert np.array_equal(results[0].labels, prob.argmax(0).numpy())
    assert np.allclose(results[0].confidence, prob.max(0).values.numpy(), atol=1e-5)


def test_finalize_in_stripes_equals_one_full_size_upsampling(monkeypatch):
    lab = _labeler()
    score = torch.randn(len(VOCAB), 17, 23) * 0.1
    monkeypatch.setattr(infer, "_STRIPE_BYTES", 4 * 3 * len(VOCAB) * 101 * 7)  # 7 rows per stripe
    striped = lab.finalize(score, (83, 101))
    prob = torch.softmax(40 * F.interpolate(score[None], size=(83, 101), mode="bilinear", align_corners=False)[0], 0)
    assert np.array_equal(striped.labels, prob.argmax(0).numpy())
    assert np.allclose(striped.confidence, prob.max(0).values.numpy(), atol=1e-5)


def test_thresholds_make_background_and_ignore():
    score = torch.zeros(len(VOCAB), 1, 4)
    score[1, 0, 0] = 1.0  # confident red circle
    score[2, 0, 1] = 0.005  # weak blue square: probability 0.289 at logit scale 40
    # pixels 2, 3: all classes equal (probability 1/4)
    plain = _labeler().finalize(score, (1, 4))
    assert plain.labels[0, :2].tolist() == [1, 2] and np.allclose(
        plain.confidence[0, 1:], [0.289, 0.25, 0.25], atol=1e-3
    )
    bg = _labeler("vocab.background_threshold=0.3").finalize(score, (1, 4))
    assert bg.labels.tolist() == [[1, 0, 0, 0]]
    ignore = _labeler("infer.conf_threshold=0.3").finalize(score, (1, 4))
    assert ignore.labels.tolist() == [[1] + [schema.IGNORE_U8] * 3]
    # between the two thresholds: unknown (ignore); below both: background
    both = _labeler("vocab.background_threshold=0.27", "infer.conf_threshold=0.3").finalize(score, (1, 4))
    assert both.labels.tolist() == [[1, schema.IGNORE_U8, 0, 0]]


def test_background_offset_and_model_calibration():
    images = blocky_uint8(1, 64, 64, seed=5)
    base = _labeler("infer.short_side=64").score_maps(images)[0]
    shifted = _labeler("infer.short_side=64", "vocab.background_offset=0.5").score_maps(images)[0]
    assert torch.allclose(shifted[0], base[0] + 0.5, atol=1e-6) and torch.allclose(shifted[1:], base[1:])
    with pytest.raises(ValueError, match="need a background class"):
        _labeler("vocab.background_offset=0.5", vocab=Vocabulary.from_entries(["cat", "dog"]))
    bb = tiny_backbone("vit")
    bb.meta.update(background_offset=0.25, logit_scale=70.0, templates=["a {} here."])
    try:
        lab = DenseLabeler(load_config(None, ["vocab.background_offset=0.5"]), VOCAB, backbone=bb)
        assert lab.background_offset == 0.75 and lab.logit_scale == 70.0 and lab.templates == ("a {} here.",)
        assert _labeler("infer.logit_scale=30").logit_scale == 30.0  # set in the config: the config wins
        assert _labeler().templates == ("a photo of a {}.",)
    finally:
        bb.meta.clear()


def test_the_models_recommended_inference_settings_apply_where_the_config_leaves_them_unset():
    bb = tiny_backbone("vit")
    bb.meta.update(infer={"shifts": 2, "pamr_steps": 10})
    try:
        lab = DenseLabeler(load_config(None, ["prompts.templates=single"]), VOCAB, backbone=bb)
        assert (lab.infer.shifts, lab.infer.pamr_steps) == (2, 10)
        explicit = ["prompts.templates=single", "infer.shifts=1", "infer.pamr_steps=0"]
        lab = DenseLabeler(load_config(None, explicit), VOCAB, backbone=bb)
        assert (lab.infer.shifts, lab.infer.pamr_steps) == (1, 0)
        bb.meta["infer"] = {"crop": 224}
        with pytest.raises(ValueError, match=r"recommends infer keys \['crop'\]"):
            DenseLabeler(load_config(None, ["prompts.templates=single"]), VOCAB, backbone=bb)
        bb.meta["infer"] = {"shifts": 0}
        with pytest.raises(ValueError, match="infer.shifts must be a whole number >= 1, got 0"):
            DenseLabeler(load_config(None, ["prompts.templates=single"]), VOCAB, backbone=bb)
    finally:
        bb.meta.clear()
    plain = _labeler()
    assert (plain.infer.shifts, plain.infer.pamr_steps) == (1, 0)  # a model without recommendations
    with pytest.raises(ValueError, match="^infer.shifts must be a whole number >= 1, got 0"):
        _labeler("infer.shifts=0")  # refused when the labeler is built, before any image
    with pytest.raises(ValueError, match="^infer.pamr_steps must be a whole number >= 0, got -1"):
        _labeler("infer.pamr_steps=-1")


def test_many_classes_give_16_bit_labels():
    vocab = Vocabulary.from_entries([f"thing {i}" for i in range(300)])
    res = _labeler("infer.conf_threshold=0.5", vocab=vocab)(blocky_uint8(1, 40, 40, seed=6))[0]
    assert res.labels.dtype == np.uint16
    assert set(np.unique(res.labels).tolist()) <= set(range(300)) | {schema.IGNORE_U16}


def test_score_crops_run_at_the_model_input_size():
    lab = _labeler("infer.short_side=64", "infer.crop=0")
    crops = blocky_uint8(2, 64, 64, seed=7) + blocky_uint8(1, 30, 50, seed=8)
    maps = lab.score_crops(crops)
    assert [m.shape for m in maps] == [(len(VOCAB), 64, 64)] * 3
    assert torch.allclose(maps[0], lab.score_maps(crops[:1])[0], atol=1e-5)
    resized = lab.score_crops(crops[2:], sizes=[(30, 50)])
    assert resized[0].shape == (len(VOCAB), 30, 50)


def test_pamr_pulls_scores_along_colour_regions():
    image = torch.zeros(1, 3, 32, 32)
    image[:, :, :, 16:] = 1.0  # left half black, right half white
    scores = torch.zeros(1, 2, 32, 32)
    scores[:, 0, :, :16] = 1.0
    scores[:, 1, :, 16:] = 1.0
    noisy = scores.clone()
    noisy[:, :, 8:12, 4:8] = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)  # a wrong patch inside the left half
    refined = pamr(noisy, image, steps=10, dilations=(2, 4))
    assert torch.equal(refined.argmax(1), scores.argmax(1))
    flat = torch.rand(1, 1, 1, 1).expand(1, 3, 32, 32)
    assert torch.allclose(pamr(torch.full((1, 2, 32, 32), 0.3), flat, steps=3), torch.full((1, 2, 32, 32), 0.3))


def test_pamr_refines_only_classes_that_can_win_and_keeps_the_labels_of_refining_all():
    gen = torch.Generator().manual_seed(3)
    image = torch.rand(2, 3, 40, 48, generator=gen).repeat_interleave(8, 2).repeat_interleave(8, 3)[..., :40, :48]
    scores = torch.rand(2, 6, 40, 48, generator=gen) * 0.2
    scores[:, :2] += 0.5  # two classes win everywhere; classes 2-5 never come near
    scores[1, 2] = 0.55  # image 1: a class that never wins but is the best one on average
    scores[1, :2] = torch.where(torch.arange(48) // 2 % 2 == 0, 1.0, 0.0)  # stripes of 2 px: 0 and 1 alternate
    scores[1, 1] = 1 - scores[1, 0]
    full = pamr(scores, image, steps=5, dilations=(2, 4), every_class=True)
    fast = pamr(scores, image, steps=5, dilations=(2, 4))
    assert torch.equal(fast.argmax(1), full.argmax(1))
    assert (full[1].argmax(0) == 2).any()  # it wins once refined: the bound brought it in
    assert torch.allclose(fast[:, :2], full[:, :2], atol=1e-6) and torch.allclose(fast[1, 2], full[1, 2], atol=1e-6)
    left_out = fast[0, 2:]  # never refined: their raw distance below the best, capped by the refined envelope
    envelope = scores[0, 2:].amax(0)
    refined_envelope = pamr(envelope[None, None], image[:1], steps=5, dilations=(2, 4))[0, 0]
    best, raw_best = full[0, :2].amax(0), scores[0, :2].amax(0)
    assert torch.allclose(left_out, torch.minimum(best - (raw_best - scores[0, 2:]), refined_envelope), atol=1e-5)
    assert (left_out < best).all() and (full[0, 2:] <= refined_envelope + 1e-6).all()


@pytest.mark.parametrize("bad", ["-inf", "nan", "nan everywhere"])
def test_pamr_of_the_winners_survives_scores_that_are_not_finite(bad):
    """Scores that are not finite end neither in a crash nor in a round without classes, and the
    labels are those of refining every class wherever both are finite (a class left out keeps its
    NaN; refining replaces a pixel by its neighbours')."""
    image = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(5))
    scores = torch.zeros(1, 3, 24, 24)
    scores[0, 1], scores[0, 2] = -1e-6, -5.0
    if bad == "nan everywhere":  # no class is best anywhere
        scores[0, 2] = float("nan")
    else:  # the other classes are all -inf (or NaN) at one pixel
        scores[0, 1:, 10, 10] = float(bad)
    full = pamr(scores, image, steps=1, dilations=(2, 4), every_class=True)
    fast = pamr(scores, image, steps=1, dilations=(2, 4))
    if bad == "nan everywhere":  # every class is refined, as `every_class` does
        assert torch.allclose(fast, full, equal_nan=True)
        return
    finite = full.isfinite().all(dim=1) & fast.isfinite().all(dim=1)
    assert finite.sum() > 500 and torch.equal(fast.argmax(1)[finite], full.argmax(1)[finite])


def test_pamr_in_the_labeler_reaches_half_a_patch_and_one_patch():
    """The labeler's PAMR dilations follow the model's feature stride (8 for the tiny ViT)."""
    images = blocky_uint8(1, 64, 64, seed=12)
    raw = _labeler("infer.short_side=64").score_maps(images)[0]
    refined = _labeler("infer.short_side=64", "infer.pamr_steps=2").score_maps(images)[0]
    image = torch.tensor(images[0]).permute(2, 0, 1)[None].float() / 255
    assert torch.allclose(refined, pamr(raw[None], image, 2, dilations=(4, 8))[0], atol=1e-5)
    assert not torch.allclose(refined, pamr(raw[None], image, 2, dilations=(8, 16))[0], atol=1e-3)


def test_pamr_steps_in_the_labeler_and_resnet_backbone():
    images = blocky_uint8(2, 64, 80, seed=9)
    results = _labeler("infer.pamr_steps=3", "infer.short_side=64", kind="resnet")(images)
    assert [r.labels.shape for r in results] == [(64, 80), (64, 80)]
