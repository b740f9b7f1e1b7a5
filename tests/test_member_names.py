"""Shards as users have them: names that are not UTF-8 or long, macOS dotfiles, any-case extensions,
compressed tars, and files that are no tar at all."""

from __future__ import annotations

import bz2
import gzip
import io
import logging
import lzma
import os
import sys
import tarfile
import zipfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from bad_corpus import gradient, image_bytes
from jobs_fixtures import job_config, tiny_model

from pipeline import schema
from pipeline.distribute.actor import LabelActor
from pipeline.distribute.driver import PoolResult, ShardOutcome
from pipeline.distribute.job import summarize
from pipeline.io import fs
from pipeline.io.read import ReadStats, Sample, SampleError, iter_samples
from pipeline.obs import setup_logging
from pipeline.stages.shard import ShardLabeler, ShardReadError
from pipeline.stages.write import LabelShardSink, RowContext
from pipeline.vocab import Vocabulary

CONTEXT = RowContext(head="maskclip", model="tiny", config_hash="abc123")
LATIN1 = b"caf\xe9"  # Latin-1 bytes: not UTF-8
LONG = ("deep/" * 40 + "x" * 120).encode()  # 320 bytes: beyond ustar's 100 + 155
UTF8 = "naïve/東京".encode()
KEYS = [b"good", LATIN1, LONG, UTF8]


def _raw_tar(members: list[tuple[bytes, bytes]], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    """A tar whose member names are the given bytes exactly (GNU long names, as GNU tar writes them)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name.decode("utf-8", "surrogateescape"))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _member_names(data: bytes) -> list[bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*", encoding="utf-8", errors="surrogateescape") as tar:
        return [m.name.encode("utf-8", "surrogateescape") for m in tar]


def test_keys_round_trip_byte_for_byte_into_the_label_tar_and_parquet(tmp_path):
    jpg = image_bytes(gradient(), "JPEG")
    src = tmp_path / "names.tar"
    src.write_bytes(_raw_tar([(key + b".jpg", jpg) for key in KEYS]))
    samples = list(iter_samples(str(src)))
    assert all(isinstance(s, Sample) for s in samples), samples
    assert [s.key.encode("utf-8", "surrogateescape") for s in samples] == KEYS

    out = str(tmp_path / "out")
    sink = LabelShardSink(out, "names", n_classes=3, context=CONTEXT)
    for i, sample in enumerate(samples):
        sink.add(i, sample.key, np.zeros((24, 32), np.uint8), np.ones((24, 32), np.float32))
    marker = sink.commit()
    assert (marker["ok"], marker["failed"]) == (4, 0)

    written = fs.read_bytes(fs.join(out, schema.labels_path("names")))
    expected = [key + b"." + ext.encode() for key in KEYS for ext in (schema.LABEL_EXT, schema.CONF_EXT, "json")]
    assert _member_names(written) == expected
    rows = pq.read_table(fs.join(out, schema.meta_path("names"))).to_pylist()
    assert [r["key"] for r in rows] == ["good", "caf\\xe9", LONG.decode(), UTF8.decode()]
    assert [r["key_bytes"] for r in rows] == [None, LATIN1, None, None]
    assert [(r["key_bytes"] or r["key"].encode()).decode("utf-8", "surrogateescape") for r in rows] == [
        s.key for s in samples
    ]


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    return _raw_tar([(name.encode(), data) for name, data in members])


def test_hidden_and_webdataset_metadata_members_are_skipped_and_counted(tmp_path):
    jpg = image_bytes(gradient(), "JPEG")
    appledouble = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 16
    members = [
        ("IMG_1.jpg", jpg),
        ("._IMG_1.jpg", appledouble),
        (".DS_Store", b"\x00\x00\x00\x01Bud1" + b"\x00" * 24),
        ("__index__", b"{}"),
        ("trip/._IMG_2.jpg", appledouble),
        ("trip/IMG_2.jpg", jpg),
        ("./.hidden.txt", b"x"),
        ("__MACOSX/trip/._IMG_3.jpg", appledouble),
        ("trip/IMG_3.jpg", jpg),
    ]
    url = str(tmp_path / "macos.tar")
    fs.put_atomic(url, _tar(members))
    stats = ReadStats()
    records = list(iter_samples(url, stats=stats))
    assert [(type(r).__name__, r.key) for r in records] == [
        ("Sample", "IMG_1"),
        ("Sample", "trip/IMG_2"),
        ("Sample", "trip/IMG_3"),
    ]
    assert stats.skipped == {"hidden": 5, "metadata": 1}
    assert stats.members == len(members) and stats.end_of_archive


@pytest.mark.parametrize(
    "name",
    [
        "IMG_0001.JPG",
        "DSC01.Jpeg",
        "scan.TIF",
        "scan.tiff",
        "pic.jfif",
        "x.JPE",
        "shot.PNG",
        "icon.bmp",
        "anim.GIF",
        "raw.pgm",
        "web.WebP",
    ],
)
def test_image_extensions_match_in_any_case(tmp_path, name):
    ext = name.rsplit(".", 1)[1].lower()
    fmt = {"jfif": "JPEG", "jpe": "JPEG", "jpg": "JPEG", "jpeg": "JPEG", "tif": "TIFF", "pgm": "PPM"}.get(
        ext, ext.upper()
    )
    grey = ext in ("gif", "pgm")  # formats whose exact round trip is a grey (palette) image
    picture = gradient()[..., 0] if grey else gradient()
    save = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}.get(fmt, {})
    stem = name.rsplit(".", 1)[0]
    url = str(tmp_path / "cams.tar")
    fs.put_atomic(url, _tar([(name, image_bytes(picture, fmt, **save)), (f"{stem}.JSON", b'{"a": 1}')]))
    (sample,) = list(iter_samples(url))
    assert isinstance(sample, Sample), sample
    assert sample.key == stem and sample.json == {"a": 1} and sample.extra == {}
    expected = np.repeat(picture[..., None], 3, axis=2) if grey else picture
    assert np.abs(sample.image.astype(int) - expected).max() <= (8 if fmt == "JPEG" else 0)


def test_the_same_extension_in_two_cases_is_a_duplicate_member(tmp_path):
    jpg = image_bytes(gradient(), "JPEG")
    url = str(tmp_path / "dup.tar")
    fs.put_atomic(url, _tar([("a.jpg", jpg), ("a.JPG", jpg), ("b.jpg", jpg)]))
    records = list(iter_samples(url))
    assert [(type(r).__name__, r.key) for r in records] == [("SampleError", "a"), ("Sample", "b")]
    assert "duplicate member 'a.JPG'" in records[0].reason


def test_an_image_named_with_a_second_dot_fails_with_a_reason_that_says_where_the_key_ends(tmp_path):
    jpg = image_bytes(gradient(), "JPEG")
    members = [
        ("IMG_0001.edited.jpg", jpg),
        ("IMG_0002.edited.jpg", jpg),
        ("IMG_0003.jpg", jpg),
        ("IMG_0003.edited.jpg", jpg),  # beside its own image: an extra member, not a fault
        ("truth_only.seg.png", image_bytes(gradient()[..., 0])),
    ]
    url = str(tmp_path / "edits.tar")
    fs.put_atomic(url, _tar(members))
    records = list(iter_samples(url))
    assert [(type(r).__name__, r.key) for r in records] == [
        ("SampleError", "IMG_0001"),
        ("SampleError", "IMG_0002"),
        ("Sample", "IMG_0003"),
        ("SampleError", "truth_only"),
    ]
    hint = "members: edited.jpg (the key ends at the first dot: a member named KEY.edited.jpg belongs to key KEY)"
    assert records[0].reason.endswith(hint)
    assert records[0].reason == records[1].reason  # one fault, one reason: summaries group it
    assert records[2].extra == {"edited.jpg": jpg}
    assert records[3].reason.endswith("; members: seg.png")  # a truth map is no misnamed image


@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"])
def test_compressed_shards_stream_to_the_same_samples(storage, suffix):
    root, options = storage
    jpg = image_bytes(gradient(), "JPEG")
    plain = _tar([("a.jpg", jpg), ("a.txt", b"caption"), ("b.png", image_bytes(gradient()))])
    packed = {".tar.gz": gzip.compress, ".tgz": gzip.compress, ".tar.bz2": bz2.compress, ".tar.xz": lzma.compress}
    url = fs.join(root, f"s{suffix}")
    fs.put_atomic(url, packed[suffix](plain), options)
    stats = ReadStats()
    records = list(iter_samples(url, options, stats=stats))
    assert [(type(r).__name__, r.key) for r in records] == [("Sample", "a"), ("Sample", "b")]
    assert records[0].txt == "caption" and stats.end_of_archive
    np.testing.assert_array_equal(records[1].image, gradient())


def test_a_cut_gzip_shard_keeps_its_good_samples(tmp_path):
    jpg = image_bytes(gradient(), "JPEG")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8).tobytes()  # does not compress
    data = gzip.compress(_tar([("a.jpg", jpg), ("b.bin", noise), ("b.jpg", jpg), ("c.jpg", jpg)]))
    url = str(tmp_path / "cut.tar.gz")
    fs.put_atomic(url, data[: len(data) * 2 // 3])
    records = list(iter_samples(url))
    assert [(type(r).__name__, r.key) for r in records] == [("Sample", "a"), ("SampleError", "b")]
    assert "truncated or corrupt" in records[-1].reason


def _zip() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("a.jpg", b"x")
    return out.getvalue()


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (_zip, "a ZIP archive"),
        (lambda: b"\x28\xb5\x2f\xfd" + b"\x00" * 600, "a Zstandard-compressed file"),
        (lambda: gzip.compress(b"not a tar" * 100), "a gzip file that does not hold a tar"),
        (lambda: image_bytes(gradient()), "a PNG image"),
        (lambda: b"", "the file is empty"),
    ],
)
def test_a_file_that_is_not_a_tar_is_named(tmp_path, content, named):
    url = str(tmp_path / "shard.tar")
    fs.put_atomic(url, content())
    (record,) = list(iter_samples(url))
    assert isinstance(record, SampleError) and record.key == ""
    assert record.reason.startswith(f"not a tar archive: {named}"), record.reason


def test_a_shard_of_odd_names_commits_every_sample_under_its_exact_key(tmp_path):
    """The shard worker on macOS dotfiles, a Latin-1 name and a long name: no sample lost, none renamed."""
    jpg = image_bytes(gradient(), "JPEG")
    members = [(b"good.jpg", jpg), (b"._good.jpg", b"\x00\x05\x16\x07"), (b".DS_Store", b"Bud1")]
    members += [(LATIN1 + b".JPG", jpg), (LONG + b".jpeg", jpg), (b"broken.jpg", b"not an image")]
    url = str(tmp_path / "in/odd.tar")
    fs.put_atomic(url, _raw_tar(members))
    cfg = job_config(url, str(tmp_path / "out"), tiny_model(tmp_path / "model"))
    marker = ShardLabeler(cfg, Vocabulary.from_entries(["background", "red circle"], background=0))(url)

    assert (marker["samples"], marker["ok"], marker["failed"]) == (4, 3, 1)
    assert marker["read"]["skipped"] == {"hidden": 2}
    pool = PoolResult([ShardOutcome(url, attempts=1, marker=marker, status="committed")])
    assert summarize(cfg, [url], [], pool, seconds=1.0)["samples"]["skipped_members"] == {"hidden": 2}
    rows = pq.read_table(fs.join(cfg.output, schema.meta_path("odd"))).to_pylist()
    keys = [(r["key_bytes"] or r["key"].encode()) for r in rows]
    assert keys == [b"good", LATIN1, LONG, b"broken"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "failed"]
    written = _member_names(fs.read_bytes(fs.join(cfg.output, schema.labels_path("odd"))))
    assert written[::3] == [b"good.seg.png", LATIN1 + b".seg.png", LONG + b".seg.png"]


def test_a_shard_file_named_in_latin1_commits(tmp_path):
    out = str(tmp_path / "out")
    shard = (b"train-" + LATIN1).decode("utf-8", "surrogateescape")  # as os.listdir names such a file
    sink = LabelShardSink(out, shard, n_classes=3, context=CONTEXT)
    sink.add(0, "a", np.zeros((4, 4), np.uint8), np.ones((4, 4), np.float32))
    assert sink.commit()["ok"] == 1
    rows = pq.read_table(io.BytesIO(fs.read_bytes(fs.join(out, schema.meta_path(shard))))).to_pylist()
    assert [r["shard"] for r in rows] == ["train-caf\\xe9"]
    assert os.listdir(os.fsencode(tmp_path / "out/labels")) == [b"train-" + LATIN1 + b".tar"]


def test_log_lines_naming_undecodable_names_reach_a_strict_utf8_stream(monkeypatch):
    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict", write_through=True)
    monkeypatch.setattr(sys, "stderr", stream)
    try:
        setup_logging()
        logging.getLogger("pipeline.test").warning("committed %s", LATIN1.decode("utf-8", "surrogateescape"))
        written = stream.buffer.getvalue().decode("utf-8")
    finally:
        monkeypatch.undo()
        setup_logging()
    assert written.rstrip().endswith("| WARNING | pipeline.test | committed caf\\udce9")


def test_a_failing_shard_named_in_latin1_fails_with_a_message_ray_can_send(tmp_path):
    url = os.fsdecode(os.fsencode(tmp_path) + b"/bad-" + LATIN1 + b".tar")
    with open(os.fsencode(url), "wb") as f:
        f.write(b"not a tar" * 100)
    cfg = job_config(url, str(tmp_path / "out"), tiny_model(tmp_path / "model"))
    actor = LabelActor(cfg, Vocabulary.from_entries(["background", "red circle"], background=0))
    with pytest.raises(ShardReadError) as err:
        actor.label(url)
    assert "bad-caf\\xe9.tar" in str(err.value) and str(err.value).encode("utf-8")
