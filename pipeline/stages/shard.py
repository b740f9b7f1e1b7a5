"""One input shard → one committed label shard: read → batch → dense inference → write, overlapped.

This is the whole per-shard job of a worker, with no knowledge of Ray: a laptop loop and a cluster
actor run the same `ShardLabeler`. Three threads share the work so the model never waits on I/O:

    reader thread   tar stream → decoded samples → bounded queue (`prefetch` batches ahead)
    caller thread   batches of `infer.batch_size` images → DenseLabeler (the only model user)
    writer thread   PNG encoding + tar/Parquet writes, at most `prefetch` batches behind

A corrupt sample becomes a failed row with the reader's reason, never a crashed shard. A shard the
reader cannot open, or whose store keeps failing (`pipeline.io.read`), raises `ShardReadError`,
which the driver retries; it is never committed with part of its samples. The commit marker's
`read` entry records what the reader saw (members, end of archive reached), so a reader of the
output can check a shard's completeness.
"""

from __future__ import annotations

import logging
import os
import queue
import resource
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pipeline import schema
from pipeline.config import RunCfg, config_hash
from pipeline.io.read import ReadStats, Sample, SampleError, ShardReadError, iter_samples
from pipeline.stages.infer import DenseLabeler
from pipeline.stages.write import LabelShardSink, RowContext
from pipeline.stages.zoom import ZoomLabeler
from pipeline.vocab import Vocabulary

logger = logging.getLogger(__name__)

_END = object()


__all__ = ["ShardLabeler", "ShardReadError", "peak_rss_mb"]


@dataclass
class _Item:
    index: int  # position in the shard, so rows keep input order
    sample: Sample | SampleError
    read_s: float


@dataclass
class _Timer:
    read_s: float = 0.0  # reader thread busy (tar streaming + decoding)
    wait_s: float = 0.0  # caller waited for the reader: time the model sat idle for want of input
    infer_s: float = 0.0  # model calls
    write_s: float = 0.0  # writer thread busy (encoding + writing)
    backpressure_s: float = 0.0  # caller waited for the writer to catch up


class ShardLabeler:
    """Labels whole shards into `cfg.output`; builds its model once, from `cfg`, on construction."""

    def __init__(self, cfg: RunCfg, vocab: Vocabulary) -> None:
        self.cfg = cfg
        self.vocab = vocab
        self.dense = DenseLabeler(cfg, vocab, cfg.storage_options)
        self.labeler = ZoomLabeler(self.dense, cfg.zoom)  # passes results through when zoom is off
        self.context = RowContext(head=self.dense.head_name, model=cfg.model.name, config_hash=config_hash(cfg))
        self.prefetch = max(1, cfg.distribute.prefetch)

    def __call__(self, url: str, attempt: int = 1) -> dict[str, Any]:
        """Label the shard at `url` and commit it; returns its commit marker (`attempt` is recorded in it)."""
        started = time.perf_counter()
        name = schema.shard_name(url)
        timer = _Timer()
        self.labeler.take_skipped()  # what a failed attempt counted is not this shard's
        sink = LabelShardSink(self.cfg.output, name, len(self.vocab), self.context, self.cfg.storage_options)
        reader = _ReadAhead(url, self.cfg, maxsize=self.prefetch * self.cfg.infer.batch_size, timer=timer)
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"write-{name}")
        pending: deque[Future] = deque()
        try:
            batch: list[_Item] = []
            for item in reader:
                if isinstance(item.sample, SampleError):
                    if not item.sample.key:
                        raise ShardReadError(f"shard {url}: {item.sample.reason}")
                    self._submit(writer, pending, timer, self._write, [(item, item.sample.reason, 0.0)], sink)
                    continue
                batch.append(item)
                if len(batch) == self.cfg.infer.batch_size:
                    self._submit(writer, pending, timer, self._write, self._infer(batch, timer), sink)
                    batch = []
            if batch:
                self._submit(writer, pending, timer, self._write, self._infer(batch, timer), sink)
            _drain(pending, timer, keep=0)
        except BaseException:
            reader.close()
            writer.shutdown(wait=True, cancel_futures=True)
            sink.abort()
            raise
        writer.shutdown(wait=True)
        stats = {k: round(v, 4) for k, v in vars(timer).items()} | {"wall_s": round(time.perf_counter() - started, 4)}
        stats |= {"peak_rss_mb": peak_rss_mb(), "pid": os.getpid(), "committed_at": round(time.time(), 3)}
        stats["zoom_skipped"] = self.labeler.take_skipped()  # zoom proposals dropped and sample boxes skipped
        if sink.n_ok + sink.n_failed != reader.count:  # the promise of a committed shard: one row per sample
            sink.abort()
            raise RuntimeError(f"shard {url}: {reader.count} samples read but {sink.n_ok + sink.n_failed} rows")
        read = {"samples": reader.count, **vars(reader.stats)}
        marker = sink.commit({"input": url, "attempt": attempt, **stats}, read=read)
        logger.info("committed %s: %d ok, %d failed in %.1fs", name, marker["ok"], marker["failed"], stats["wall_s"])
        return marker

    def _submit(
        self, writer: ThreadPoolExecutor, pending: deque[Future], timer: _Timer, fn: Callable[..., float], *args: Any
    ) -> None:
        _drain(pending, timer, keep=self.prefetch)
        pending.append(writer.submit(fn, *args))

    def _infer(self, batch: list[_Item], timer: _Timer) -> list[tuple[_Item, Any, float]]:
        """Results per item as (item, DenseResult or error text, seconds of model time)."""
        t0 = time.perf_counter()
        boxes = [(item.sample.json or {}).get("boxes") for item in batch]  # zoom-in proposals of the sample
        try:
            results: list[Any] = list(self.labeler([item.sample.image for item in batch], boxes))
            per_item = [(time.perf_counter() - t0) / len(batch)] * len(batch)
        except Exception as exc:  # one bad image must not fail its batch: retry one by one
            logger.warning("batch of %d failed (%s); labelling its images one by one", len(batch), exc)
            results, per_item = [], []
            for item, boxes_i in zip(batch, boxes, strict=True):
                t1 = time.perf_counter()
                try:
                    results.append(self.labeler([item.sample.image], [boxes_i])[0])
                except Exception as one:  # recorded as the sample's failed row
                    results.append(f"inference failed: {type(one).__name__}: {one}")
                per_item.append(time.perf_counter() - t1)
            if len(batch) > 1 and all(isinstance(r, str) for r in results):
                raise  # every image fails alone too: the model, not the data, is broken; fail the attempt
        timer.infer_s += time.perf_counter() - t0
        return list(zip(batch, results, per_item, strict=True))

    def _write(self, labelled: list[tuple[_Item, Any, float]], sink: LabelShardSink) -> float:
        """Write labelled items (a result, or an error text for a failed row); returns seconds spent."""
        started = time.perf_counter()
        for item, result, infer_s in labelled:
            sample = item.sample
            if isinstance(result, str):
                sink.add_failed(item.index, sample.key, result, seconds=item.read_s + infer_s)
                continue
            sink.add(
                item.index,
                sample.key,
                result.labels,
                result.confidence,
                zoom_regions=getattr(result, "zoom_regions", ()),
                timings={"read_s": item.read_s, "infer_s": infer_s},
                extra=sample_extra(sample),
            )
        return time.perf_counter() - started


def sample_extra(sample: Sample) -> dict[str, Any]:
    """What a labelled sample's JSON carries over from its input: `caption` (its txt member) and
    `source` (its json member), when present."""
    return {k: v for k, v in (("caption", sample.txt), ("source", sample.json)) if v is not None}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (recorded per shard: a leak shows as growth)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def _drain(pending: deque[Future], timer: _Timer, keep: int) -> None:
    """Wait until at most `keep` writes are pending (re-raising a writer error)."""
    t0 = time.perf_counter()
    while len(pending) > keep:
        timer.write_s += pending.popleft().result()
    timer.backpressure_s += time.perf_counter() - t0


class _ReadAhead:
    """Iterates a shard's samples, decoded on a background thread into a bounded queue."""

    def __init__(self, url: str, cfg: RunCfg, maxsize: int, timer: _Timer) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=maxsize)
        self._stop = threading.Event()
        self._timer = timer
        self.stats = ReadStats()
        self.count = 0  # samples and failed samples handed out
        self._thread = threading.Thread(target=self._run, args=(url, cfg), name="read-ahead", daemon=True)
        self._thread.start()

    def _run(self, url: str, cfg: RunCfg) -> None:
        try:
            dist = cfg.distribute
            samples = iter_samples(url, cfg.storage_options, dist.max_pixels, dist.read_retry_s, self.stats)
            index = 0
            t0 = time.perf_counter()
            for sample in samples:
                read_s = time.perf_counter() - t0
                self._timer.read_s += read_s
                if not self._put(_Item(index, sample, read_s)):
                    return
                index += 1
                t0 = time.perf_counter()
            self._put(_END)
        except BaseException as exc:  # handed to the caller, which raises it
            self._put(exc)

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[_Item]:
        while True:
            t0 = time.perf_counter()
            item = self._queue.get()
            self._timer.wait_s += time.perf_counter() - t0
            if item is _END:
                return
            if isinstance(item, ShardReadError):
                raise item
            if isinstance(item, BaseException):
                raise ShardReadError(f"reading failed: {type(item).__name__}: {item}") from item
            self.count += 1
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
