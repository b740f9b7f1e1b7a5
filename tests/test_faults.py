"""Faults of a cluster's object store, injected by a proxy in front of the loopback S3 server
(`tests/faultproxy.py`): what the reader and the output folder do when the store answers 500/503,
resets connections, cuts responses, or serves a listing that is out of date."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
from bad_corpus import image_bytes, tar_bytes
from faultproxy import Fault, FaultProxy

from pipeline import schema
from pipeline.config import load_config
from pipeline.io import fs
from pipeline.io.read import ReadStats, Sample, ShardReadError, iter_samples
from pipeline.outputs import committed_shards, prepare_output
from pipeline.stages.write import LabelShardSink, RowContext, read_commit
from pipeline.vocab import Vocabulary

BLOCK = 16_384  # s3fs block size in these tests: a small shard takes many ranged reads


@pytest.fixture
def proxy(s3):
    with FaultProxy(s3.endpoint_url) as running:
        yield running


def through(proxy: FaultProxy, s3) -> dict:
    """Storage options reaching S3 through the proxy, with the store client's own retries off, so
    every fault reaches our code (as it does on a real store once its retries are spent)."""
    return {
        **s3.storage_options,
        "endpoint_url": proxy.url,
        "default_block_size": BLOCK,
        "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}},
    }


def noisy_shard(url: str, n: int, storage_options: dict) -> int:
    """A shard of `n` incompressible 48 px PNGs (~7 kB each) at `url`; returns its size in bytes."""
    rng = np.random.default_rng(0)
    data = tar_bytes(
        [(f"{i:03d}.png", image_bytes(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))) for i in range(n)]
    )
    fs.put_atomic(url, data, storage_options)
    return len(data)


@pytest.mark.parametrize("kind", ["500", "503", "reset", "cut"])
def test_s3_failing_mid_shard_is_resumed_and_every_sample_is_read(s3, s3_root, proxy, kind):
    url = fs.join(s3_root, "in/shard-000000.tar")
    size = noisy_shard(url, 12, s3.storage_options)
    proxy.add(Fault(kind, method="GET", min_offset=BLOCK, times=12))  # after the first block; outlasts s3fs retries
    stats = ReadStats()
    records = list(iter_samples(url, through(proxy, s3), retry_s=30, stats=stats))
    assert [(type(r).__name__, r.key) for r in records] == [("Sample", f"{i:03d}") for i in range(12)]
    assert (stats.members, stats.end_of_archive, stats.bytes) == (12, True, size)
    assert stats.resumed_reads >= 1


def test_s3_failing_longer_than_the_retry_window_raises_and_yields_no_failed_row(s3, s3_root, proxy):
    url = fs.join(s3_root, "in/shard-000000.tar")
    noisy_shard(url, 12, s3.storage_options)
    proxy.add(Fault("500", method="GET", min_offset=BLOCK, seconds=60))
    records = []
    with pytest.raises(ShardReadError, match=r"failed at byte \d+ for 1s: OSError: .*Internal Server Error"):
        records.extend(iter_samples(url, through(proxy, s3), retry_s=1))
    assert records and all(isinstance(r, Sample) for r in records) and len(records) < 12


def _remove_from_another_process(url: str, endpoint: str) -> None:
    """Delete `url` on S3 from a separate process, as another job or an operator would."""
    code = (
        "import sys, fsspec; fsspec.filesystem('s3', client_kwargs={'endpoint_url': sys.argv[1]}, key='testing', "
        "secret='testing', skip_instance_cache=True).rm(sys.argv[2])"
    )
    subprocess.run([sys.executable, "-c", code, endpoint, url], check=True, timeout=60)


def test_a_marker_removed_by_another_process_is_seen_as_gone_in_the_same_process(s3, s3_root):
    options = dict(s3.storage_options)
    cfg = load_config(None, [f"output={s3_root}/out", "input=shards/a.tar"])
    cfg = dataclasses.replace(cfg, storage_options=options)
    vocab = Vocabulary.from_entries(["background", "red circle"], background=0)
    prepare_output(cfg, vocab)
    for shard in ("a", "b"):
        sink = LabelShardSink(
            cfg.output, shard, n_classes=2, context=RowContext("maskclip", "m", "h"), storage_options=options
        )
        sink.add(0, "k", np.zeros((2, 2), np.uint8), np.ones((2, 2), np.float32))
        sink.commit()
    marker = fs.join(cfg.output, schema.commit_path("b"))
    assert prepare_output(cfg, vocab) == {"a", "b"} and fs.exists(marker, options)  # listings now cached
    _remove_from_another_process(marker, s3.endpoint_url)
    assert not fs.exists(marker, options)
    assert committed_shards(cfg.output, options) == {"a"}
    assert prepare_output(cfg, vocab) == {"a"}
    with pytest.raises(FileNotFoundError):
        read_commit(cfg.output, "b", options)
    _remove_from_another_process(fs.join(cfg.output, schema.commit_path("a")), s3.endpoint_url)
    assert fs.listdir(fs.join(cfg.output, schema.COMMITS_DIR), options) == []
