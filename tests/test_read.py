"""iter_samples and the decoders: round trips on every store, the bad-input corpus, truncation, streaming."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import threading

import fsspec
import numpy as np
import pytest
from bad_corpus import (
    bad_corpus,
    corrupt_header,
    gradient,
    image_bytes,
    member_end,
    png_header_only,
    tar_bytes,
)
from fsspec.spec import AbstractFileSystem
from PIL import Image

from pipeline.io import fs
from pipeline.io.decode import decode_image, decode_label_png
from pipeline.io.read import ReadStats, Sample, SampleError, ShardReadError, iter_samples
from pipeline.io.tarwrite import TarShardWriter


def _split(records: list) -> tuple[dict[str, Sample], dict[str, SampleError]]:
    samples = {r.key: r for r in records if isinstance(r, Sample)}
    errors = {r.key: r for r in records if isinstance(r, SampleError)}
    assert len(samples) + len(errors) == len(records), "a key was reported twice"
    return samples, errors


def test_round_trip_through_the_project_writer(storage):
    root, options = storage
    url = fs.join(root, "in/shard-000000.tar")
    rgb = gradient()
    ids8 = np.arange(24 * 32, dtype=np.uint8).reshape(24, 32) % 37
    ids16 = (np.arange(24 * 32, dtype=np.uint16).reshape(24, 32) * 83) % 65535
    with TarShardWriter(url, options) as writer:
        writer.write(
            "000", {"jpg": image_bytes(rgb, "JPEG", quality=95), "txt": "légende".encode(), "json": b'{"a": 1}'}
        )
        writer.write("sub/001", {"png": image_bytes(rgb), "seg.png": image_bytes(ids8)})
        writer.write("002", {"webp": image_bytes(rgb, "WEBP", lossless=True), "seg.png": image_bytes(ids16)})
    records = list(iter_samples(url, options))
    assert [r.key for r in records] == ["000", "sub/001", "002"]
    assert all(isinstance(r, Sample) and r.shard == url for r in records)
    jpg, png, webp = records
    assert jpg.image.shape == (24, 32, 3) and jpg.image.dtype == np.uint8 and jpg.image.flags.writeable
    assert np.abs(jpg.image.astype(int) - rgb).max() <= 8  # lossy
    assert (jpg.txt, jpg.json, jpg.extra) == ("légende", {"a": 1}, {})
    np.testing.assert_array_equal(png.image, rgb)
    np.testing.assert_array_equal(webp.image, rgb)
    assert png.txt is None and png.json is None and set(png.extra) == {"seg.png"}
    label8, label16 = decode_label_png(png.extra["seg.png"]), decode_label_png(webp.extra["seg.png"])
    assert label8.dtype == np.uint8 and label16.dtype == np.uint16
    np.testing.assert_array_equal(label8, ids8)
    np.testing.assert_array_equal(label16, ids16)


def test_bad_corpus_gives_one_error_per_bad_sample_and_keeps_every_good_one(storage, tmp_path, monkeypatch):
    root, options = storage
    data, good, expected = bad_corpus()
    url = fs.join(root, "bad.tar")
    fs.put_atomic(url, data, options)
    work = tmp_path / "a" / "b"  # a reader writing "../../etc/x.jpg" from here would create tmp_path/etc/x.jpg
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    before = sorted(str(p) for p in tmp_path.rglob("*"))

    records = list(iter_samples(url, options))

    samples, errors = _split(records)
    assert list(samples) == good
    assert set(errors) == set(expected)
    for key, fragment in expected.items():
        assert fragment.lower() in errors[key].reason.lower(), (key, errors[key].reason)
        assert errors[key].shard == url
    assert "testing" not in " ".join(e.reason for e in errors.values())  # storage options never in a reason
    assert " at 0x" not in " ".join(e.reason for e in errors.values())  # same fault, same text: reasons group
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before  # nothing written anywhere
    assert samples["good-001"].json == {"boxes": [[0, 0, 4, 4]]}
    assert set(samples["nested/dir/good-002"].extra) == {"seg.png"}


def test_huge_header_is_refused_before_decoding():
    with pytest.raises(ValueError, match=r"40000x40000 = 1600000000 pixels, above max_pixels=100000000"):
        decode_image(png_header_only(40000, 40000))
    with pytest.raises(ValueError, match="above max_pixels=100"):
        decode_label_png(png_header_only(20, 20), max_pixels=100)


def test_max_pixels_is_the_callers_limit(tmp_path):
    url = str(tmp_path / "s.tar")
    fs.put_atomic(url, tar_bytes([("small.png", image_bytes(gradient(8, 8))), ("big.png", image_bytes(gradient()))]))
    samples, errors = _split(list(iter_samples(url, max_pixels=64)))
    assert list(samples) == ["small"]
    assert "32x24 = 768 pixels, above max_pixels=64" in errors["big"].reason


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "I;16"])
def test_any_image_mode_comes_out_rgb_uint8(mode):
    img = gradient()[..., 0]
    array = {"L": img, "P": img, "RGBA": np.dstack([gradient(), img]), "I;16": img.astype(np.uint16) * 257}[mode]
    data = io.BytesIO()
    source = Image.fromarray(array).convert("P") if mode == "P" else Image.fromarray(array)
    source.save(data, format="PNG")
    out = decode_image(data.getvalue())
    assert out.shape == (24, 32, 3) and out.dtype == np.uint8


def test_label_png_refuses_colour_and_non_png():
    with pytest.raises(ValueError, match="single-channel"):
        decode_label_png(image_bytes(gradient()))
    with pytest.raises(ValueError, match="must be a PNG"):
        decode_label_png(image_bytes(gradient()[..., 0], "JPEG"))


def test_tar_cut_mid_member_keeps_earlier_samples_and_reports_the_last(storage):
    root, options = storage
    jpg = image_bytes(gradient(), "JPEG")
    data = tar_bytes([(f"{k}.jpg", jpg) for k in ("a", "b", "c")] + [("c.txt", b"t")])
    url = fs.join(root, "cut.tar")
    fs.put_atomic(url, data[: member_end(data, "b.jpg") + 700], options)  # inside c.jpg's data
    samples, errors = _split(list(iter_samples(url, options)))
    assert list(samples) == ["a", "b"]
    assert list(errors) == ["c"] and "truncated" in errors["c"].reason


def test_tar_cut_between_members_reports_the_last_sample(tmp_path):
    jpg = image_bytes(gradient(), "JPEG")
    data = tar_bytes([("a.jpg", jpg), ("b.jpg", jpg), ("b.json", b"{}"), ("c.jpg", jpg)])
    url = str(tmp_path / "cut.tar")
    fs.put_atomic(url, data[: member_end(data, "b.jpg")])  # b's json may have followed: b is not trusted
    samples, errors = _split(list(iter_samples(url)))
    assert list(samples) == ["a"]
    assert list(errors) == ["b"] and "no end-of-archive marker" in errors["b"].reason


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(None, "no such file"), (b"", "not a tar archive"), (b"plain text, not a tar" * 40, "not a tar archive")],
)
def test_unreadable_shard_is_one_error_with_empty_key(storage, content, fragment):
    root, options = storage
    url = fs.join(root, "shard.tar")
    if content is not None:
        fs.put_atomic(url, content, options)
    records = list(iter_samples(url, options))
    assert len(records) == 1 and isinstance(records[0], SampleError)
    assert (records[0].shard, records[0].key) == (url, "")
    assert fragment in records[0].reason and "testing" not in records[0].reason


def test_other_bad_member_kinds_are_named(tmp_path):
    jpg = image_bytes(gradient(), "JPEG")
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name in ("a.jpg", "link.jpg", "a.json", "b.jpg", "b.jpg", "a.txt"):
            info = tarfile.TarInfo(name)
            if name == "link.jpg":
                info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
                tar.addfile(info)
            else:
                info.size = len(jpg)
                tar.addfile(info, io.BytesIO(jpg))
    url = str(tmp_path / "odd.tar")
    fs.put_atomic(url, out.getvalue())
    records = list(iter_samples(url))
    assert [(type(r).__name__, r.key) for r in records] == [
        ("Sample", "a"),
        ("SampleError", "link"),
        ("SampleError", "a"),  # a.json after another key: not adjacent
        ("SampleError", "b"),  # b.jpg twice
        ("SampleError", "a"),
    ]
    reasons = [r.reason for r in records[1:]]
    assert "link or special file" in reasons[0] and "not adjacent" in reasons[1] and "duplicate" in reasons[2]


class _PipeFileSystem(AbstractFileSystem):
    """A store whose files are non-seekable streams, like HTTP bodies: here, named pipes."""

    protocol = "testpipe"

    def _open(self, path: str, mode: str = "rb", **kwargs: object) -> io.RawIOBase:
        return open(path, mode, buffering=0)


def test_reading_streams_without_waiting_for_the_whole_shard(tmp_path):
    """Through a pipe: the first sample must come out while the writer is still holding back the rest."""
    fsspec.register_implementation(_PipeFileSystem.protocol, _PipeFileSystem, clobber=True)
    fifo = str(tmp_path / "pipe.tar")
    os.mkfifo(fifo)
    big = image_bytes(gradient(), "JPEG") + b"\0" * 64_000  # JPEG decoders ignore trailing bytes
    release, writer_done = threading.Event(), threading.Event()

    def write() -> None:
        with open(fifo, "wb") as f, tarfile.open(fileobj=f, mode="w|") as tar:
            for i in range(4):
                if i == 2:
                    f.flush()
                    release.wait(timeout=20)
                info = tarfile.TarInfo(f"{i:03d}.jpg")
                info.size = len(big)
                tar.addfile(info, io.BytesIO(big))
        writer_done.set()

    thread = threading.Thread(target=write, daemon=True)
    thread.start()
    records = iter_samples(f"testpipe://{fifo}")
    first = next(records)
    assert isinstance(first, Sample) and first.key == "000"
    assert not release.is_set() and not writer_done.is_set()  # only samples 0 and 1 were written so far
    release.set()
    assert [r.key for r in records] == ["001", "002", "003"]
    thread.join(timeout=20)


class _FlakyFileSystem(AbstractFileSystem):
    """Local files whose reads raise OSError from byte `FAIL_AT` on, `failures` times in all: a store
    that breaks mid-read (a 500, a reset) and recovers, or never does."""

    protocol = "testflaky"
    FAIL_AT = 20_000
    failures = 0

    def _open(self, path: str, mode: str = "rb", **kwargs: object) -> io.RawIOBase:
        f = open(path, mode)
        read = f.read

        def failing_read(size: int = -1) -> bytes:
            cls = type(self)
            if f.tell() >= cls.FAIL_AT and cls.failures > 0:
                cls.failures -= 1
                raise OSError("connection reset by peer")
            return read(size)

        f.read = failing_read
        return f


def _flaky_shard(tmp_path, failures: int) -> tuple[str, int]:
    fsspec.register_implementation(_FlakyFileSystem.protocol, _FlakyFileSystem, clobber=True)
    _FlakyFileSystem.failures = failures
    noisy = np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)  # ~7 kB per image
    data = tar_bytes([(f"{i:03d}.png", image_bytes(noisy)) for i in range(6)])
    path = tmp_path / "flaky.tar"
    path.write_bytes(data)
    return f"testflaky://{path}", len(data)


def test_a_read_error_mid_shard_resumes_at_its_offset_and_loses_no_sample(tmp_path):
    url, size = _flaky_shard(tmp_path, failures=2)  # fails at 20 kB, twice in a row
    stats = ReadStats()
    records = list(iter_samples(url, retry_s=30, stats=stats))
    assert [(type(r).__name__, r.key) for r in records] == [("Sample", f"{i:03d}") for i in range(6)]
    assert (stats.members, stats.end_of_archive, stats.bytes, stats.resumed_reads) == (6, True, size, 2)


def test_a_read_error_that_outlasts_the_retries_fails_the_shard_instead_of_truncating_it(tmp_path):
    url, _ = _flaky_shard(tmp_path, failures=10**6)
    stats = ReadStats()
    records = []
    with pytest.raises(ShardReadError, match=r"failed at byte \d+ for 0.3s: OSError: connection reset"):
        records.extend(iter_samples(url, retry_s=0.3, stats=stats))
    assert [r.key for r in records] == ["000", "001"]  # what came before the failure, and no failed row
    assert all(isinstance(r, Sample) for r in records) and not stats.end_of_archive


def test_a_cut_shard_records_that_it_did_not_reach_the_end(tmp_path):
    jpg = image_bytes(gradient(), "JPEG")
    data = tar_bytes([(f"{k}.jpg", jpg) for k in ("a", "b", "c")])
    url = str(tmp_path / "cut.tar")
    fs.put_atomic(url, data[: member_end(data, "b.jpg") + 700])
    stats = ReadStats()
    assert [r.key for r in iter_samples(url, stats=stats)] == ["a", "b", "c"]
    assert (stats.members, stats.end_of_archive, stats.resumed_reads) == (3, False, 0)


@pytest.mark.parametrize("compress", [False, True])
def test_a_corrupt_header_mid_shard_is_reported_as_a_cut_never_as_the_end(tmp_path, compress):
    jpg = image_bytes(gradient(), "JPEG")
    data = tar_bytes([("a.jpg", jpg), ("a.json", b"{}"), ("b.jpg", jpg), ("b.json", b"{}"), ("c.jpg", jpg)])
    damaged = corrupt_header(data, "b.jpg")
    url = str(tmp_path / ("bad.tar.gz" if compress else "bad.tar"))
    fs.put_atomic(url, gzip.compress(damaged) if compress else damaged)
    stats = ReadStats()
    records = list(iter_samples(url, stats=stats))
    # tarfile alone ends quietly at the damage, and a would pass as the shard's last, whole sample
    assert [(r.key, type(r).__name__) for r in records] == [("a", "SampleError")]
    assert records[0].reason == (
        "shard truncated or corrupt while reading this sample "
        "(a corrupt tar header follows (bad checksum); nothing after it is read)"
    )
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert stats.corrupt_header_at == tar.getmember("b.jpg").offset
    assert not stats.end_of_archive and stats.members == 2


def test_a_corrupt_header_after_a_pax_header_is_reported_too(tmp_path):
    jpg = image_bytes(gradient(), "JPEG")
    long_name = "x" * 120
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("a.jpg", f"{long_name}.jpg", "c.jpg"):
            info = tarfile.TarInfo(name)
            info.size = len(jpg)
            tar.addfile(info, io.BytesIO(jpg))
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        offset = tar.getmember(f"{long_name}.jpg").offset_data - tarfile.BLOCKSIZE  # the member's own header
    damaged = bytearray(out.getvalue())
    damaged[offset + 148 : offset + 156] = b"0000001\0"
    url = str(tmp_path / "bad.tar")
    fs.put_atomic(url, bytes(damaged))
    stats = ReadStats()
    records = list(iter_samples(url, stats=stats))
    assert [(r.key, type(r).__name__) for r in records] == [("a", "SampleError")]
    assert "truncated or corrupt" in records[0].reason and not stats.end_of_archive


def test_tars_joined_with_cat_are_read_to_the_first_end_and_the_rest_is_named(tmp_path, caplog):
    jpg = image_bytes(gradient(), "JPEG")
    first, second = tar_bytes([("a.jpg", jpg), ("b.jpg", jpg)]), tar_bytes([("c.jpg", jpg)])
    joined, single = str(tmp_path / "joined.tar"), str(tmp_path / "single.tar")
    fs.put_atomic(joined, first + second)
    fs.put_atomic(single, first + bytes(10 * tarfile.BLOCKSIZE))  # more zero padding is still padding
    stats = ReadStats()
    assert [r.key for r in iter_samples(joined, stats=stats)] == ["a", "b"]
    assert stats.end_of_archive and stats.data_after_end
    assert "data follows its end-of-archive marker" in caplog.text
    stats = ReadStats()
    assert [r.key for r in iter_samples(single, stats=stats)] == ["a", "b"]
    assert stats.end_of_archive and not stats.data_after_end
