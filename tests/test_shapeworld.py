"""ShapeWorld: deterministic scenes, class maps that agree with the objects, and readable shards."""

from __future__ import annotations

import colorsys
import io
import json
import tarfile

import fsspec
import numpy as np
import pytest
from PIL import Image

from jobs.cli import main
from pipeline.data.shapeworld import CLASSES, SMALL_AREA, caption, class_id, render_scene, render_single
from pipeline.data.shapeworld_shards import write_dataset, write_shard
from pipeline.vocab import load_vocabulary


def test_scenes_are_a_function_of_their_seed():
    a, b = render_scene((3, 1, 4), 48), render_scene((3, 1, 4), 48)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.seg, b.seg)
    assert a.objects == b.objects and a.caption == b.caption
    c = render_scene((3, 1, 5), 48)
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("small", [False, True])
def test_class_map_matches_objects(small):
    for i in range(20):
        scene = render_scene((0, 0, i), 64, small_objects=small)
        assert scene.image.shape == (64, 64, 3) and scene.image.dtype == np.uint8
        assert scene.seg.shape == (64, 64) and scene.seg.dtype == np.uint8
        assert 1 <= len(scene.objects) <= 3
        assert set(np.unique(scene.seg)) == {0} | {o.class_id for o in scene.objects}
        for obj in scene.objects:
            ys, xs = np.nonzero(scene.seg == obj.class_id)
            assert obj.area == len(xs)
            assert obj.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert obj.name == CLASSES[obj.class_id]
        assert scene.caption == caption([o.name for o in scene.objects])


def test_single_object_has_its_class_and_colour():
    hues = {"red": 0, "orange": 28, "yellow": 55, "green": 125, "blue": 220, "purple": 285}
    for colour, hue in hues.items():
        cls = class_id(colour, "square")
        scene = render_single((1, cls), 64, class_id=cls)
        assert [o.class_id for o in scene.objects] == [cls]
        assert scene.caption == f"{'an' if colour == 'orange' else 'a'} {colour} square on a background"
        inner = scene.seg == cls
        r, g, b = scene.image[inner].mean(axis=0) / 255
        measured = colorsys.rgb_to_hsv(r, g, b)[0] * 360
        assert min(abs(measured - hue), 360 - abs(measured - hue)) < 15, colour


def test_class_ids_and_bad_names():
    assert len(CLASSES) == 37 and CLASSES[0] == "background"
    assert CLASSES[class_id("red", "circle")] == "red circle" == CLASSES[1]
    assert CLASSES[class_id("orange", "square")] == "orange square" == CLASSES[1 + 1 * 6 + 1]
    with pytest.raises(ValueError, match="pink"):
        class_id("pink", "circle")
    with pytest.raises(ValueError, match="class_id 0"):
        render_single((0,), 32, class_id=0)


def test_small_objects_flag_makes_objects_under_three_percent():
    def smallest(scene):
        return min(o.area for o in scene.objects) / scene.seg.size

    small = [smallest(render_scene((7, 0, i), 64, small_objects=True)) for i in range(20)]
    assert all(s < SMALL_AREA for s in small)
    large = [smallest(render_scene((7, 0, i), 64)) for i in range(20)]
    assert np.median(large) > SMALL_AREA


def _read_tar(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_cli_writes_readable_shards_and_vocabulary(tmp_path):
    assert main(["shapes", str(tmp_path), "--shards", "2", "--per-shard", "3", "--size", "32", "--seed", "5"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes-000000.tar", "shapes-000001.tar", "vocabulary.json"]
    vocab = load_vocabulary(str(tmp_path / "vocabulary.json"))
    assert len(vocab) == 37 and vocab.background == 0 and vocab.display_names[7] == "orange circle"
    members = _read_tar(tmp_path / "shapes-000001.tar")
    assert sorted(members) == sorted(
        f"000001_{i:06d}.{ext}" for i in range(3) for ext in ("jpg", "txt", "seg.png", "json")
    )
    scene = render_scene((5, 1, 2), 32)
    seg = np.asarray(Image.open(io.BytesIO(members["000001_000002.seg.png"])))
    assert seg.dtype == np.uint8 and np.array_equal(seg, scene.seg)
    image = np.asarray(Image.open(io.BytesIO(members["000001_000002.jpg"])).convert("RGB"))
    assert image.shape == (32, 32, 3) and np.abs(image.astype(int) - scene.image).mean() < 8
    assert members["000001_000002.txt"].decode() == scene.caption
    meta = json.loads(members["000001_000002.json"])
    assert meta["seed"] == [5, 1, 2] and meta["size"] == [32, 32]
    assert meta["objects"] == [o.to_json() for o in scene.objects]


def test_a_shard_regenerated_alone_is_byte_identical(tmp_path):
    write_dataset(str(tmp_path / "all"), shards=3, per_shard=4, size=32, seed=2, small_objects=True)
    write_shard(str(tmp_path / "one"), shard=2, per_shard=4, size=32, seed=2, small_objects=True)
    assert (tmp_path / "all/shapes-000002.tar").read_bytes() == (tmp_path / "one/shapes-000002.tar").read_bytes()


def test_writes_to_any_fsspec_url():
    urls = write_dataset("memory://shapeworld-test/out", shards=1, per_shard=2, size=32)
    assert urls == ["memory://shapeworld-test/out/shapes-000000.tar"]
    memfs = fsspec.filesystem("memory")
    assert memfs.exists("/shapeworld-test/out/vocabulary.json")
    with memfs.open("/shapeworld-test/out/shapes-000000.tar", "rb") as f:
        assert len(tarfile.open(fileobj=f).getmembers()) == 8


def test_bad_counts_are_a_clear_cli_error(tmp_path, capsys):
    assert main(["shapes", str(tmp_path), "--shards", "0", "--per-shard", "3"]) == 2
    assert "shards" in capsys.readouterr().err
