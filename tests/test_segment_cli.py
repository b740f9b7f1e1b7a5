"""`clipdense segment`: label PNG + overlay per image, and one-line errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from tiny_models import CONFIGS, blocky_uint8

from jobs.cli import main
from pipeline import schema


@pytest.fixture()
def image_path(tmp_path):
    path = tmp_path / "street.jpg"
    Image.fromarray(blocky_uint8(1, 48, 72, seed=1)[0]).save(path)
    return path


def test_segment_writes_a_label_map_and_an_overlay(tmp_path, image_path, capsys):
    out = tmp_path / "out"
    argv = ["segment", str(image_path), "--classes", "cat, dog, grass", "--model", CONFIGS["vit"], "--out", str(out)]
    assert main([*argv, "infer.conf_threshold=0.4", "prompts.templates=single"]) == 0
    labels = np.asarray(Image.open(out / "street.seg.png"))
    assert labels.shape == (48, 72) and labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, schema.IGNORE_U8}
    with Image.open(out / "street.overlay.png") as overlay:
        assert overlay.mode == "RGB" and overlay.size[1] >= 48 and overlay.size[0] > 72  # image + legend
    assert "street.seg.png" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["missing.jpg", "--classes", "cat, dog"], "missing.jpg: no such file"),
        (["IMG", "--classes", " , "], "--classes is empty"),
        (["IMG", "--classes", "cat"], "the vocabulary has one class ('cat')"),
        (["IMG", "--classes", "cat, dog", "--head", "segformer"], "unknown head 'segformer'"),
        (["IMG", "--classes", "cat, dog", "--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["IMG"], 'knows no classes of its own: name them, e.g. --classes "cat, dog"'),
        (["IMG", "--classes", "cat, dog", "--head", "naclip", "head.name=sclip"], "--head naclip and head.name=sclip"),
    ],
)
def test_bad_input_exits_non_zero_with_one_line(tmp_path, image_path, capsys, args, reason):
    args = [str(image_path) if a == "IMG" else str(tmp_path / a) if a.endswith(".jpg") else a for a in args]
    model = [] if "--model" in args else ["--model", CONFIGS["vit"]]
    assert main(["segment", *args, *model, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert reason in err and len(err.splitlines()) == 1
