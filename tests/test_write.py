"""The label shard sink: PNG encodings, Parquet rows, commit marker written last, retries replace files."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import schema
from pipeline.io import fs
from pipeline.stages.write import LabelShardSink, RowContext, encode_confidence, encode_labels, read_commit

CONTEXT = RowContext(head="maskclip", model="tiny", config_hash="abc123")


def _decode(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)))


def _members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_label_png_is_8_bit_below_255_classes_and_keeps_ignore():
    labels = np.array([[0, 1, 2], [36, 255, 0]], dtype=np.uint8)
    image = Image.open(io.BytesIO(encode_labels(labels, n_classes=37)))
    assert image.mode == "L"
    np.testing.assert_array_equal(np.array(image), labels)


def test_label_png_is_16_bit_from_255_classes_and_keeps_ignore():
    labels = np.array([[0, 300, 254], [65535, 1, 299]], dtype=np.uint16)
    image = Image.open(io.BytesIO(encode_labels(labels, n_classes=301)))
    assert image.mode.startswith("I")
    np.testing.assert_array_equal(np.array(image).astype(np.int64), labels.astype(np.int64))


def test_label_png_rejects_values_beyond_its_bit_depth():
    with pytest.raises(ValueError, match="does not fit a uint8"):
        encode_labels(np.array([[300]], dtype=np.uint16), n_classes=10)


def test_confidence_png_quantises_to_8_bits():
    conf = np.array([[0.0, 0.5, 1.0], [0.2, 1.7, -1.0]], dtype=np.float32)
    np.testing.assert_array_equal(_decode(encode_confidence(conf)), [[0, 128, 255], [51, 255, 0]])


def _write_shard(out: str, shard: str = "shapes-000000", storage_options=None) -> dict:
    sink = LabelShardSink(out, shard, n_classes=37, context=CONTEXT, storage_options=storage_options)
    labels_a = np.zeros((4, 6), dtype=np.uint8)
    labels_a[:, 3:] = 5
    labels_a[0, 0] = 255
    sink.add(0, "a", labels_a, np.full((4, 6), 0.75, np.float32), timings={"infer_s": 0.5}, extra={"caption": "hi"})
    # The reader reports a corrupt sample before the batch holding "b" is written: order comes from index.
    sink.add_failed(2, "c", "cannot identify image file")
    sink.add(1, "b", np.full((3, 2), 7, np.uint8), np.ones((3, 2), np.float32), zoom_regions=[(0, 0, 2, 2)])
    return sink.commit({"infer_s": 1.0})


def test_commit_writes_tar_parquet_and_marker(tmp_path):
    out = str(tmp_path / "out")
    marker = _write_shard(out)

    members = _members(tmp_path / "out/labels/shapes-000000.tar")
    assert sorted(members) == ["a.conf.png", "a.json", "a.seg.png", "b.conf.png", "b.json", "b.seg.png"]
    assert _decode(members["a.seg.png"]).shape == (4, 6)
    assert _decode(members["b.seg.png"]).shape == (3, 2)
    meta_a = json.loads(members["a.json"])
    timings = meta_a.pop("timings")
    assert meta_a == {"width": 6, "height": 4, "zoom_regions": [], "caption": "hi"}
    assert sorted(timings) == ["infer_s", "write_s"] and timings["infer_s"] == 0.5 and timings["write_s"] > 0

    table = pq.read_table(tmp_path / "out/meta/shapes-000000.parquet")
    assert table.schema.equals(schema.ROW_SCHEMA)
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == ["a", "b", "c"]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    a, b, c = rows
    assert (a["width"], a["height"], a["class_ids"], a["class_pixels"]) == (6, 4, [0, 5], [11, 12])
    assert a["ignored_fraction"] == pytest.approx(1 / 24)
    assert a["mean_confidence"] == pytest.approx(0.75)
    assert a["seconds"] == pytest.approx(0.5 + timings["write_s"], abs=1e-5)
    assert b["zoom_regions"] == [[0, 0, 2, 2]] and b["n_classes_present"] == 1
    assert c["error"] == "cannot identify image file" and c["width"] is None and c["class_ids"] is None
    assert {r["config_hash"] for r in rows} == {"abc123"} and {r["head"] for r in rows} == {"maskclip"}

    assert marker == read_commit(out, "shapes-000000")
    assert (marker["samples"], marker["ok"], marker["failed"]) == (3, 2, 1)
    assert marker["errors"] == {"cannot identify image file": 1}
    assert marker["stats"]["infer_s"] == 1.0 and marker["stats"]["commit_s"] >= 0
    for name, path in (("labels", "labels/shapes-000000.tar"), ("meta", "meta/shapes-000000.parquet")):
        data = (tmp_path / "out" / path).read_bytes()
        assert marker["files"][name] == {"path": path, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_no_marker_and_no_final_files_until_commit(tmp_path):
    out = str(tmp_path / "out")
    sink = LabelShardSink(out, "s", n_classes=3, context=CONTEXT)
    sink.add(0, "a", np.zeros((2, 2), np.uint8), np.ones((2, 2), np.float32))
    assert not fs.exists(fs.join(out, schema.commit_path("s")))
    assert not fs.exists(fs.join(out, schema.labels_path("s")))
    assert not fs.exists(fs.join(out, schema.meta_path("s")))
    sink.abort()
    assert list((tmp_path / "out/labels").iterdir()) == []


def test_a_retry_replaces_the_partial_files_of_a_dead_attempt(tmp_path):
    out = str(tmp_path / "out")
    first = _write_shard(out)
    # A second attempt died half way: its partial tar stays behind under a temporary name.
    partial = fs.temp_name(fs.join(out, schema.labels_path("shapes-000000")))
    fs.put_atomic(partial, b"partial tar bytes")
    assert read_commit(out, "shapes-000000") == first
    before = _members(tmp_path / "out/labels/shapes-000000.tar")
    again = _write_shard(out)
    assert {k: v["path"] for k, v in again["files"].items()} == {k: v["path"] for k, v in first["files"].items()}
    after = _members(tmp_path / "out/labels/shapes-000000.tar")
    assert {k: v for k, v in after.items() if k.endswith(".png")} == {
        k: v for k, v in before.items() if k.endswith(".png")
    }
    finals = sorted(p.name for p in (tmp_path / "out/labels").iterdir() if not p.name.startswith("_tmp."))
    assert finals == ["shapes-000000.tar"]


def test_sink_works_on_an_object_store_url():
    out = "memory://write-test/out"
    marker = _write_shard(out)
    data = fs.read_bytes(fs.join(out, "labels/shapes-000000.tar"))
    assert marker["files"]["labels"]["sha256"] == hashlib.sha256(data).hexdigest()
    rows = pq.read_table(io.BytesIO(fs.read_bytes(fs.join(out, "meta/shapes-000000.parquet")))).to_pylist()
    assert len(rows) == 3


def test_mismatched_label_and_confidence_sizes_name_the_sample(tmp_path):
    sink = LabelShardSink(str(tmp_path), "s", n_classes=3, context=CONTEXT)
    with pytest.raises(ValueError, match="'k'"):
        sink.add(0, "k", np.zeros((2, 2), np.uint8), np.ones((2, 3), np.float32))
