"""`clipdense segment` on several inputs: a bad image is one line and the rest are labelled; no output
overwrites another's."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from tiny_models import CONFIGS, blocky_uint8

from jobs.cli import main
from jobs.segment import output_stems

FAST = ["--model", CONFIGS["vit"], "prompts.templates=single", "infer.shifts=1", "infer.pamr_steps=0"]


def _jpeg(path, height: int = 48, width: int = 72, seed: int = 1) -> bytes:
    out = io.BytesIO()
    Image.fromarray(blocky_uint8(1, height, width, seed=seed)[0]).save(out, format="JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out.getvalue())
    return out.getvalue()


def test_bad_images_are_one_line_each_and_the_others_are_labelled(tmp_path, capsys):
    good = tmp_path / "good.jpg"
    data = _jpeg(good)
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.jpg").write_text("not an image")
    (tmp_path / "folder.jpg").mkdir()
    strip = tmp_path / "strip.png"
    Image.fromarray(blocky_uint8(1, 8, 1920)[0]).save(strip)
    bad = ["truncated.jpg", "notes.jpg", "missing.jpg", "folder.jpg"]
    argv = ["segment", str(good), *(str(tmp_path / b) for b in bad), str(strip), "--classes", "cat, dog"]
    assert main([*argv, *FAST, "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("clipdense segment: error: ")]
    assert [line.split(": ", 3)[2] for line in errors] == [str(tmp_path / b) for b in bad]  # one line each, named
    assert "Traceback" not in captured.err
    assert np.asarray(Image.open(tmp_path / "out/good.seg.png")).shape == (48, 72)
    assert np.asarray(Image.open(tmp_path / "out/strip.seg.png")).shape == (8, 1920)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "good.overlay.png",
        "good.seg.png",
        "strip.overlay.png",
        "strip.seg.png",
    ]


def test_inputs_with_the_same_name_get_outputs_of_their_own(tmp_path, capsys):
    paths = [tmp_path / "a/x.jpg", tmp_path / "b/x.jpg", tmp_path / "a/x.png"]
    sizes = [(40, 56), (48, 72), (32, 48)]
    for path, (height, width) in zip(paths, sizes, strict=True):
        Image.fromarray(blocky_uint8(1, height, width)[0]).save(path.parent.mkdir(exist_ok=True) or path)
    argv = ["segment", *map(str, paths), "--classes", "cat, dog", *FAST, "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    stems = ["a_x_jpg", "b_x_jpg", "x_png"]
    for stem, (height, width) in zip(stems, sizes, strict=True):
        assert np.asarray(Image.open(tmp_path / f"out/{stem}.seg.png")).shape == (height, width)
    printed = capsys.readouterr().out
    assert all(f"{stem}.seg.png" in printed for stem in stems)


def test_output_stems_differ_for_any_inputs():
    assert output_stems(["street.jpg", "s3://bkt/park.png"]) == ["street", "park"]
    assert output_stems(["x.jpg", "x.png", "x_jpg.gif"]) == ["x_jpg", "x_png", "x_jpg_gif"]
    assert output_stems(["a/x.jpg", "b/x.jpg", "c/y.png"]) == ["a_x_jpg", "b_x_jpg", "y"]
    assert output_stems(["d/a/x.jpg", "e/a/x.jpg"]) == ["d_a_x_jpg", "e_a_x_jpg"]
    assert output_stems(["a/x.jpg", "a//x.jpg"]) == ["a_x_jpg", "a_x_jpg-2"]
