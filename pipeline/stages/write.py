"""Label shard sink: the last stage of a shard, writing `labels/<shard>.tar`, `meta/<shard>.parquet`
and, last of all, the commit marker `_commits/<shard>.json` (FORMAT.md).

The tar streams sample by sample to a temporary name; the Parquet rows (small) are kept in memory.
`commit()` moves both to their final names and only then writes the marker, so a shard whose writer
dies at any point has no marker and does not exist for readers or resume. A retried shard writes the
same final names, replacing its own partial files, never a second copy.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.io import fs
from pipeline.io.png import encode_png
from pipeline.io.tarwrite import TarShardWriter
from pipeline.obs import CappedCounter

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RowContext:
    """Columns every row of a run shares."""

    head: str  # dense head name (HeadCfg.name)
    model: str  # model name (ModelCfg.name)
    config_hash: str  # pipeline.config.config_hash of the run


def encode_labels(labels: np.ndarray, n_classes: int) -> bytes:
    """PNG of an (H, W) class map: 8-bit when `n_classes` < 255, else 16-bit; the ignore value is kept."""
    if labels.ndim != 2:
        raise ValueError(f"a label map must be (H, W), got shape {labels.shape}")
    dtype = np.uint8 if schema.ignore_value(n_classes) == schema.IGNORE_U8 else np.uint16
    if labels.dtype != dtype:
        if labels.size and int(labels.max()) > np.iinfo(dtype).max:
            raise ValueError(f"label value {int(labels.max())} does not fit a {np.dtype(dtype).name} label map")
        labels = labels.astype(dtype)
    return encode_png(labels)


def encode_confidence(confidence: np.ndarray) -> bytes:
    """8-bit PNG of an (H, W) float confidence in [0, 1]: value v stands for v / 255."""
    if confidence.ndim != 2:
        raise ValueError(f"a confidence map must be (H, W), got shape {confidence.shape}")
    return encode_png(np.round(np.clip(confidence, 0.0, 1.0) * 255.0).astype(np.uint8), up_filter=True)


def label_stats(labels: np.ndarray, confidence: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Per-sample Parquet statistics: classes present with their pixel counts, mean confidence,
    fraction of ignored pixels. `labels` (H, W) int class ids (ignore value allowed), `confidence`
    (H, W) float in [0, 1]."""
    ignore = schema.ignore_value(n_classes)
    flat = labels.reshape(-1)
    valid = flat[flat != ignore].astype(np.int64)
    counts = np.bincount(valid, minlength=n_classes)
    ids = np.flatnonzero(counts)
    return {
        "n_classes_present": int(ids.size),
        "class_ids": ids.astype(np.int32).tolist(),
        "class_pixels": counts[ids].astype(np.int64).tolist(),
        "mean_confidence": float(confidence.mean()) if confidence.size else 0.0,
        "ignored_fraction": float(1.0 - valid.size / flat.size) if flat.size else 0.0,
    }


class LabelShardSink:
    """Collects one shard's label maps and rows; `commit()` publishes them (marker last).

    Rows carry the input position `index`, so failed samples (which arrive from the reader before the
    batch they interrupted has been labelled) still land in input order.
    """

    def __init__(
        self,
        output: str,
        shard: str,
        n_classes: int,
        context: RowContext,
        storage_options: dict | None = None,
    ) -> None:
        self.output = output
        self.shard = shard
        self.n_classes = n_classes
        self.context = context
        self.storage_options = storage_options
        self._rows: list[tuple[int, dict[str, Any]]] = []
        self.errors = CappedCounter()
        self.n_ok = 0
        self.n_failed = 0
        self._tar = TarShardWriter(fs.join(output, schema.labels_path(shard)), storage_options)

    def add(
        self,
        index: int,
        key: str,
        labels: np.ndarray,
        confidence: np.ndarray,
        *,
        zoom_regions: Sequence[Sequence[int]] = (),
        timings: dict[str, float] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Write one labelled sample. `labels` (H, W) uint8/uint16 at the original image size,
        `confidence` (H, W) float32 in [0, 1]; `timings` (seconds by phase) gain `write_s`, the time
        spent here; `extra` goes into the sample's JSON (caption, source json)."""
        t0 = time.perf_counter()
        if labels.shape != confidence.shape:
            raise ValueError(f"sample {key!r}: labels {labels.shape} and confidence {confidence.shape} differ in size")
        height, width = labels.shape
        members = {
            schema.LABEL_EXT: encode_labels(labels, self.n_classes),
            schema.CONF_EXT: encode_confidence(confidence),
        }
        row = self._row(key, "ok", None, seconds=0.0)
        regions = [[int(v) for v in box] for box in zoom_regions]
        row.update(width=width, height=height, zoom_regions=regions, **label_stats(labels, confidence, self.n_classes))
        timings = {**(timings or {}), "write_s": time.perf_counter() - t0}
        timings = {k: round(float(v), 6) for k, v in timings.items()}
        row["seconds"] = sum(timings.values())
        meta = {"width": width, "height": height, "zoom_regions": regions, "timings": timings, **(extra or {})}
        members[schema.META_EXT] = json.dumps(meta, sort_keys=True).encode()
        self._tar.write(key, members)
        self._rows.append((index, row))
        self.n_ok += 1

    def add_failed(self, index: int, key: str, error: str, seconds: float = 0.0) -> None:
        """Record a sample that could not be labelled; it gets a row, never a label map."""
        self._rows.append((index, self._row(key, "failed", error, seconds=seconds)))
        self.errors.add(error)
        self.n_failed += 1

    def _row(self, key: str, status: str, error: str | None, seconds: float) -> dict[str, Any]:
        return {
            **schema.key_columns(key),
            "shard": schema.text_column(self.shard),
            "status": status,
            "error": error,
            "head": self.context.head,
            "model": self.context.model,
            "config_hash": self.context.config_hash,
            "seconds": float(seconds),
        }

    def commit(self, stats: dict[str, Any] | None = None, read: dict[str, Any] | None = None) -> dict[str, Any]:
        """Publish the shard: tar, then Parquet, then the marker. Returns the marker's content, whose
        `stats` are `stats` plus `commit_s`, the seconds spent publishing before the marker, and whose
        `read` is what the reader saw of the input (`pipeline.io.read.ReadStats` plus `samples`).

        Final names are for committed output only: the rows are serialised before anything moves (a
        row Parquet cannot hold fails here, with nothing published), and when publishing fails
        part-way, whatever already reached a final name is removed again, marker first."""
        started = time.perf_counter()
        table = rows_table([row for _, row in sorted(self._rows, key=lambda item: item[0])])
        buf = io.BytesIO()
        pq.write_table(table, buf)
        meta_bytes = buf.getvalue()
        try:
            return self._publish(meta_bytes, stats, read, started)
        except BaseException:
            for path in (schema.commit_path(self.shard), schema.labels_path(self.shard), schema.meta_path(self.shard)):
                try:
                    fs.remove(fs.join(self.output, path), self.storage_options)
                except Exception as exc:  # the store may be what failed; the job's end removes what is left
                    logger.warning("shard %s: could not remove %s after a failed commit: %s", self.shard, path, exc)
            raise

    def _publish(
        self, meta_bytes: bytes, stats: dict[str, Any] | None, read: dict[str, Any] | None, started: float
    ) -> dict[str, Any]:
        """Move the tar and the Parquet file to their final names, then write the marker."""
        self._tar.close()
        labels_file = {"path": schema.labels_path(self.shard), "bytes": self._tar.size, "sha256": self._tar.sha256}
        fs.put_atomic(fs.join(self.output, schema.meta_path(self.shard)), meta_bytes, self.storage_options)
        marker = {
            "format_version": schema.FORMAT_VERSION,
            "shard": self.shard,
            "config_hash": self.context.config_hash,
            "samples": len(self._rows),
            "ok": self.n_ok,
            "failed": self.n_failed,
            "errors": self.errors.to_dict(),
            "files": {
                "labels": labels_file,
                "meta": {
                    "path": schema.meta_path(self.shard),
                    "bytes": len(meta_bytes),
                    "sha256": hashlib.sha256(meta_bytes).hexdigest(),
                },
            },
            "read": dict(read or {}),
            "host": socket.gethostname(),
            "stats": {**(stats or {}), "commit_s": round(time.perf_counter() - started, 4)},
        }
        fs.put_json(fs.join(self.output, schema.commit_path(self.shard)), marker, self.storage_options)
        return marker

    def abort(self) -> None:
        """Drop the partial tar; nothing under a final name is touched."""
        self._tar.abort()


def rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows as a table of `schema.ROW_SCHEMA` (columns a row lacks are null)."""
    columns = {name: [row.get(name) for row in rows] for name in schema.ROW_SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=schema.ROW_SCHEMA)


def read_commit(output: str, shard: str, storage_options: dict | None = None) -> dict[str, Any]:
    """The commit marker of `shard` under `output` (FileNotFoundError when it is not committed)."""
    return fs.read_json(fs.join(output, schema.commit_path(shard)), storage_options)
