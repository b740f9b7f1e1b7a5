"""The ShapeWorld CLIP trainer: deterministic batches, a short run that learns, and a model folder that loads."""

from __future__ import annotations

import json
import math

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file

from jobs.pretrain_shapes import PretrainCfg
from jobs.pretrain_shapes_data import BatchSampler, _dihedral, object_caption, render_pool
from jobs.pretrain_shapes_eval import DENSE_STREAM, dense_labeler
from jobs.pretrain_shapes_train import pretrain
from pipeline.config import load_config
from pipeline.data.shapeworld import CLASSES, render_scene
from pipeline.stages.infer import DenseLabeler
from pipeline.vocab import Vocabulary

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1},
}


@pytest.fixture(scope="module")
def pools():
    return [
        render_pool(kind, n, 32, seed=0, workers=1) for kind, n in (("scene", 64), ("single", 72), ("background", 4))
    ]


def test_captions_follow_the_prompt_template():
    assert object_caption(["red circle"]) == "a photo of a red circle."
    assert object_caption(["red circle", "orange star", "blue ring"]) == (
        "a photo of a red circle, a orange star and a blue ring."
    )


def _listed(caption):
    return caption.removeprefix("a photo of a ").removesuffix(".").replace(" and a ", ", a ").split(", a ")


def test_batches_are_a_function_of_seed_and_step(pools):
    sample = BatchSampler(*pools, batch_size=32, seed=3, group=4)
    images, captions = sample(5)
    again, captions_again = BatchSampler(*pools, batch_size=32, seed=3, group=4)(5)
    assert np.array_equal(images, again) and captions == captions_again
    assert not np.array_equal(images, sample(6)[0])
    assert images.shape == (32, 32, 32, 3) and len(captions) == 32
    singles = captions[-5:-1]  # 32 // 7 single objects of distinct classes, then one background
    assert len(set(singles)) == 4 and all(len(_listed(c)) == 1 for c in singles)
    assert captions[-1] == "a photo of a background."
    names = set(CLASSES[1:])
    scenes = [_listed(c) for c in captions[:-5]]
    assert all(set(listed) <= names for listed in scenes)
    for start in range(0, 24, 4):  # 27 scenes: 6 groups of 4 sharing their colours, then 3 free ones
        colours = {tuple(sorted(name.split()[0] for name in listed)) for listed in scenes[start : start + 4]}
        assert len(colours) == 1, scenes[start : start + 4]


def test_dihedral_transforms_are_flips_and_quarter_turns():
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    out = _dihedral(images, np.array([0, 3]))
    assert np.array_equal(out[0], images[0])
    assert np.array_equal(out[1], np.rot90(images[1][:, ::-1], k=1, axes=(0, 1)))


def test_short_run_learns_and_writes_a_loadable_model(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    cfg = PretrainCfg(
        config=str(config), steps=150, batch_size=32, lr=2e-3, warmup=5, threads=1, precision="fp32",
        pool_scenes=200, pool_singles=144, pool_backgrounds=8, log_every=50, eval_n=20, calibration_n=40,
    )  # fmt: skip
    metrics = pretrain(cfg, str(tmp_path / "model"), command="clipdense pretrain-shapes test")
    saved = json.loads((tmp_path / "model/metrics.json").read_text())
    losses = [h["loss"] for h in saved["history"]]
    # Each interval's loss is lower than the last, and the end is below chance (ln of the batch size).
    assert len(losses) == 3 and losses == sorted(losses, reverse=True), losses
    assert losses[-1] < math.log(cfg.batch_size) - 0.03, losses
    assert 0.0 <= metrics["zero_shot_accuracy"] <= 1.0 and 0.0 <= metrics["dense_miou"] <= 1.0
    meta = json.loads((tmp_path / "model/meta.json").read_text())
    assert meta["templates"] == ["a photo of a {}."] and meta["image_size"] == 32
    assert meta["background_offset"] == metrics["background_offset"]
    assert meta["infer"] == {"shifts": 2, "pamr_steps": 10}  # the settings the offset was calibrated under
    assert {"dense_miou_single_pass", "background_offset_single_pass", "dense_miou_value_only"} <= metrics.keys()
    model_cfg = json.loads((tmp_path / "model/config.json").read_text())
    model = open_clip.CLIP(**model_cfg)
    model.load_state_dict(load_file(tmp_path / "model/weights.safetensors"))
    tokenizer = open_clip.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])
    # A labeling run on the written folder, with nothing set but the model, scores what the trainer
    # measured and calibrated: its recommended settings and offset come from meta.json.
    images = [render_scene((0, DENSE_STREAM, i), 32).image for i in range(2)]
    trainer = dense_labeler(model.eval(), tokenizer, background_offset=meta["background_offset"])
    cfg = load_config(None, [f"model.name={tmp_path / 'model'}", "model.precision=fp32"])
    labeler = DenseLabeler(cfg, Vocabulary.from_entries(list(CLASSES), 0))
    assert (labeler.infer.shifts, labeler.infer.pamr_steps) == (2, 10)
    for a, b in zip(labeler.score_maps(images), trainer.score_maps(images), strict=True):
        assert a.shape == (37, 32, 32) and torch.allclose(a, b, atol=1e-4)
    assert (tmp_path / "model/card.md").read_text().count("clipdense pretrain-shapes test") == 1
