"""A labeling run's output as the review report reads it: rows, commit markers, and chosen samples.

Only committed shards are read (FORMAT.md). The Parquet rows of every committed shard are read with
the few columns the report needs (a million rows are tens of megabytes); the images, label maps and
confidence maps are read only for the samples the report shows, one input shard at a time, streamed.
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.eval.truth import read_label_map
from pipeline.io import fs
from pipeline.io.read import Sample, iter_samples
from pipeline.outputs import committed_shards, read_markers
from pipeline.vocab import Vocabulary, load_vocabulary

logger = logging.getLogger(__name__)

COLUMNS = ["key", "key_bytes", "shard", "status", "error", "width", "height", "class_ids", "class_pixels"]
COLUMNS += ["mean_confidence", "ignored_fraction", "zoom_regions"]
SORTS = ("lowest-confidence", "highest-confidence", "class:NAME", "random")


@dataclass
class RunOutput:
    """What the report needs of a run at `url`: rows (one per sample), markers, vocabulary, config."""

    url: str
    rows: pa.Table  # COLUMNS of every committed shard's Parquet rows, shard by shard
    markers: list[dict[str, Any]]  # commit markers, in shard-name order
    vocab: Vocabulary
    config_text: str  # _run/config.yaml as written
    summary: dict[str, Any] | None  # _run/summary.json, None while the run has not finished
    storage_options: dict | None = None

    @property
    def ignore(self) -> int:
        return schema.ignore_value(len(self.vocab))


def open_run(url: str, storage_options: dict | None = None) -> RunOutput:
    """Read the rows, markers, vocabulary, config and summary of the labeling run at `url`.

    Raises:
        FileNotFoundError: `url` is not a labeling run's output (no `_run/config.yaml`).
    """
    url = url.rstrip("/")
    config_url = fs.join(url, schema.CONFIG_FILE)
    if not fs.exists(config_url, storage_options):
        raise FileNotFoundError(f"{url} is not a labeling run's output: no {schema.CONFIG_FILE}")
    shards = sorted(committed_shards(url, storage_options))
    filesystem, _ = fs.url_to_fs(url, storage_options)
    meta_paths = [fs.url_to_fs(fs.join(url, schema.meta_path(s)), storage_options)[1] for s in shards]
    markers = read_markers(url, shards, storage_options)
    tables = [pq.read_table(io.BytesIO(data), columns=COLUMNS) for data in _cat(filesystem, meta_paths)]
    rows = pa.concat_tables(tables) if tables else schema.ROW_SCHEMA.empty_table().select(COLUMNS)
    summary_url = fs.join(url, schema.SUMMARY_FILE)
    summary = fs.read_json(summary_url, storage_options) if fs.exists(summary_url, storage_options) else None
    return RunOutput(
        url=url,
        rows=rows,
        markers=markers,
        vocab=load_vocabulary(fs.join(url, schema.VOCAB_FILE), storage_options),
        config_text=fs.read_text(config_url, storage_options),
        summary=summary,
        storage_options=storage_options,
    )


def _cat(filesystem: Any, paths: list[str], chunk: int = 256) -> Iterator[bytes]:
    """File contents in `paths` order, fetched `chunk` files at a time: bounded memory, and on object
    stores one batch of concurrent requests per chunk (fsspec's `cat` of a list)."""
    for start in range(0, len(paths), chunk):
        part = paths[start : start + chunk]
        data = filesystem.cat(part)
        yield from (data[p] for p in part)


def parse_sort(sort: str, vocab: Vocabulary) -> tuple[str, int | None]:
    """`sort` as (kind, class id or None). `class:NAME` names a class of `vocab` (any case).

    Raises:
        ValueError: an unknown sort or class name (the message lists what is allowed).
    """
    if sort.startswith("class:"):
        name = sort[len("class:") :].strip().lower()
        ids = {n.lower(): i for i, n in enumerate(vocab.display_names)}
        if name not in ids:
            raise ValueError(f"--sort {sort}: no class {name!r} in the run (classes: {', '.join(vocab.display_names)})")
        return "class", ids[name]
    if sort not in SORTS:
        raise ValueError(f"--sort {sort}: unknown order (one of {', '.join(SORTS)})")
    return sort, None


def select(rows: pa.Table, n: int, sort: str, vocab: Vocabulary, seed: int = 0) -> list[int]:
    """Row indices of up to `n` labelled (status ok) samples in the order the report shows them.

    `lowest-confidence` / `highest-confidence` sort by mean confidence (ties in row order);
    `class:NAME` keeps samples where the class is present, largest share of the image first;
    `random` draws `n` without replacement with a seeded generator.
    """
    kind, cls = parse_sort(sort, vocab)
    ok = np.flatnonzero(pc.equal(rows.column("status"), "ok").to_numpy(zero_copy_only=False))
    if kind == "random":
        return np.random.default_rng(seed).choice(ok, size=min(n, ok.size), replace=False).tolist()
    if kind == "class":
        ids = pc.list_flatten(rows.column("class_ids")).to_numpy(zero_copy_only=False)
        pixels = pc.list_flatten(rows.column("class_pixels")).to_numpy(zero_copy_only=False)
        owner = pc.list_parent_indices(rows.column("class_ids")).to_numpy(zero_copy_only=False)
        area = pc.multiply(rows.column("width"), rows.column("height")).to_numpy(zero_copy_only=False)
        share = np.zeros(rows.num_rows)
        hit = ids == cls
        share[owner[hit]] = pixels[hit] / area[owner[hit]]
        ok = ok[share[ok] > 0]
        key = -share[ok]
    else:
        confidence = rows.column("mean_confidence").to_numpy(zero_copy_only=False)[ok]
        key = confidence if kind == "lowest-confidence" else -confidence
    return ok[np.argsort(key, kind="stable")][:n].tolist()


@dataclass
class Shown:
    """One shown sample: its row, input image, label map and confidence map."""

    row: dict[str, Any]
    image: np.ndarray  # (H, W, 3) uint8 RGB
    labels: np.ndarray  # (H, W) uint8/uint16 class ids, run.ignore = ignored
    confidence: np.ndarray  # (H, W) uint8, v stands for v / 255


def iter_shown(run: RunOutput, indices: list[int]) -> Iterator[Shown]:
    """The samples at row `indices`, shard by shard (not in `indices` order), one in memory at a time.

    The image comes from the input shard its commit marker names (`stats.input`); label and
    confidence maps from the run's `labels/<shard>.tar`. A sample missing from either is logged and
    skipped.
    """
    inputs = {m["shard"]: m.get("stats", {}).get("input") for m in run.markers}
    wanted: dict[str, dict[str, dict[str, Any]]] = {}
    for i in indices:
        row = run.rows.slice(i, 1).to_pylist()[0]
        wanted.setdefault(row["shard"], {})[sample_key(row)] = row
    for shard, rows in wanted.items():
        maps = _label_members(run, shard, set(rows))
        found = 0
        for sample in iter_samples(inputs[shard], run.storage_options) if inputs.get(shard) else ():
            if not isinstance(sample, Sample) or sample.key not in rows or sample.key not in maps:
                continue
            seg, conf = maps[sample.key]
            labels = read_label_map(seg, f"{shard}:{sample.key}.{schema.LABEL_EXT}")
            confidence = read_label_map(conf, f"{shard}:{sample.key}.{schema.CONF_EXT}")
            yield Shown(rows[sample.key], sample.image, labels, confidence)
            found += 1
            if found == len(rows):
                break
        if found < len(rows):
            logger.warning("%d of %d chosen samples of shard %s could not be read", len(rows) - found, len(rows), shard)


def sample_key(row: dict[str, Any]) -> str:
    """The key of a Parquet row as the reader gives it (`Sample.key`): from `key_bytes` when the key is
    not UTF-8 (`key` then holds readable escapes; see `schema.key_columns`)."""
    raw = row.get("key_bytes")
    return raw.decode("utf-8", "surrogateescape") if raw is not None else row["key"]


def _label_members(run: RunOutput, shard: str, keys: set[str]) -> dict[str, tuple[bytes, bytes]]:
    """{key: (seg.png bytes, conf.png bytes)} of `keys` (reader keys) in the run's `labels/<shard>.tar`, streamed."""
    filesystem, path = fs.url_to_fs(fs.join(run.url, schema.labels_path(shard)), run.storage_options)
    found: dict[str, dict[str, bytes]] = {}
    # Member names decode as the reader decodes keys, whatever the machine's locale: bytes that are not
    # UTF-8 become surrogate escapes.
    with (
        filesystem.open(path, "rb") as f,
        tarfile.open(fileobj=f, mode="r|", encoding="utf-8", errors="surrogateescape") as tar,
    ):
        for member in tar:
            for ext in (schema.LABEL_EXT, schema.CONF_EXT):
                key = member.name[: -len(ext) - 1]
                if member.name.endswith("." + ext) and key in keys:
                    found.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return {k: (v[schema.LABEL_EXT], v[schema.CONF_EXT]) for k, v in found.items() if len(v) == 2}
