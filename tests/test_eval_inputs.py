"""`clipdense eval` with bad truth samples: each is one line naming it, the others are still scored."""

from __future__ import annotations

import json

import numpy as np
from jobs_fixtures import corrupt_image
from PIL import Image
from test_eval import _seg, _write_run
from tiny_models import CONFIGS

from jobs.cli import main
from pipeline.data.shapeworld_shards import write_dataset
from pipeline.io.read import Sample, iter_samples


def test_unreadable_truth_samples_are_named_and_the_rest_scored(tmp_path, capsys):
    truth = tmp_path / "truth"
    write_dataset(str(truth), shards=2, per_shard=3, size=32, seed=7)
    run = _write_run(str(tmp_path / "run"), str(truth), lambda s: _seg(s))  # perfect labels for every sample
    keys = [s.key for s in iter_samples(str(truth / "shapes-000000.tar")) if isinstance(s, Sample)]
    corrupt_image(str(truth / "shapes-000000.tar"), keys[1])
    voc = tmp_path / "voc"  # and a VOC-style folder with one label map missing its image
    out = tmp_path / "report.json"

    assert main(["eval", "--truth", str(truth), "--pred", run, "--json", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("clipdense eval: error: ")]
    assert len(errors) == 1 and f"shapes-000000.tar:{keys[1]}: " in errors[0] and errors[0].endswith("(not scored)")
    report = json.loads(out.read_text())
    assert report["n_images"] == 5 and report["mIoU"] == 1.0
    assert len(report["unreadable"]) == 1 and keys[1] in report["unreadable"][0]

    (voc / "SegmentationClass").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    (voc / "classes.txt").write_text("background\nthing\n")
    for key in ("a", "b", "c"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(voc / "SegmentationClass" / f"{key}.png")
        if key != "b":
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(voc / "JPEGImages" / f"{key}.jpg")
    tiny = ["--model", CONFIGS["vit"], "prompts.templates=single", "infer.shifts=1", "infer.pamr_steps=0"]
    assert main(["eval", "--truth", str(voc), "--head", "clip", "--no-random-baseline", *tiny]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("clipdense eval: error: ")]
    assert errors == [f"clipdense eval: error: {voc}: no image for b in JPEGImages/ (not scored)"]
