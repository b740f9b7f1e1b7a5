"""Member names real tars hold (non-UTF-8 bytes, long paths): read, labelled and written back byte for byte."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow.parquet as pq
from bad_corpus import gradient, image_bytes

from pipeline import schema
from pipeline.io import fs
from pipeline.io.read import Sample, iter_samples
from pipeline.stages.write import LabelShardSink, RowContext

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
