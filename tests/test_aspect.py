"""Work per image is bounded by the working-pixel budget, whatever the image's aspect ratio."""

from __future__ import annotations

import pytest
import torch
from tiny_models import blocky_uint8, tiny_backbone

from pipeline.config import load_config
from pipeline.stages.infer import MAX_ASPECT, DenseLabeler
from pipeline.vocab import Vocabulary

VOCAB = Vocabulary.from_entries(["red circle", "blue square", "grey background"])
SIDE = 64  # the tiny ViT's input size: the default short side


def _labeler(*overrides: str) -> DenseLabeler:
    cfg = load_config(None, ["prompts.templates=single", "infer.shifts=1", "infer.pamr_steps=0", *overrides])
    return DenseLabeler(cfg, VOCAB, backbone=tiny_backbone())


@pytest.mark.parametrize(("height", "width"), [(64, 192), (48, 192), (100, 75)])
def test_images_up_to_the_aspect_limit_keep_their_short_side(height, width):
    (score,) = _labeler().score_maps(blocky_uint8(1, height, width))
    assert min(score.shape[1:]) == SIDE
    assert score.shape[1] * width == pytest.approx(score.shape[2] * height, rel=0.02)


@pytest.mark.parametrize(("height", "width"), [(8, 1920), (1920, 8), (8, 640), (3, 50_000), (1, 20_000), (20_000, 2)])
def test_strips_are_scaled_to_the_pixel_budget_and_labelled_at_their_size(height, width):
    labeler = _labeler()
    seen: list[tuple[int, ...]] = []  # shapes of the window batches reaching the patch embedding
    hook = labeler.backbone.model.visual.conv1.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape))
    try:
        (result,) = labeler(blocky_uint8(1, height, width))
    finally:
        hook.remove()
    assert result.labels.shape == (height, width)
    (batch_shape,) = seen
    assert batch_shape[0] * batch_shape[2] * batch_shape[3] <= MAX_ASPECT * SIDE * SIDE  # padding included


def test_sliding_windows_over_a_strip_stay_within_the_budget():
    labeler = _labeler("infer.crop=32", "infer.stride=32")
    (score,) = labeler.score_maps(blocky_uint8(1, 8, 1920))
    assert score.shape[1] * score.shape[2] <= MAX_ASPECT * SIDE * SIDE
    assert isinstance(score, torch.Tensor) and score.shape[0] == len(VOCAB)
