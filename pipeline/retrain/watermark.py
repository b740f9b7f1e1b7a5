"""The watermark: exactly which committed label shards a model version was trained on.

A watermark maps each labeling run's output URL to `{shard: sha256 of its commit marker}`. Only
committed shards count (a shard without a marker does not exist, FORMAT.md), and storage listings
are re-read, never served from an fsspec listing cache, so a shard committed a second ago is seen.
A marker's checksum changes when its shard is redone (`--overwrite`), so a relabelled shard counts
as new data.
"""

from __future__ import annotations

import hashlib
import json
import logging

from pipeline import schema
from pipeline.io import fs
from pipeline.outputs import committed_shards, local_path, marker_bytes

logger = logging.getLogger(__name__)

Watermark = dict[str, dict[str, str]]  # run output URL -> {shard name: marker sha256 (hex)}


def find_runs(specs: list[str], storage_options: dict | None = None) -> list[str]:
    """Labeling run outputs named by `specs`: each a run itself (it has `_run/`) or a prefix whose
    direct sub-folders with a `_run/` are runs. Sorted. A prefix with no run yet adds none (before
    the first labeling run, there is nothing to train on) and logs a warning naming it, as a mistyped
    object-store prefix looks the same; raises ValueError for a local folder that does not exist (a
    mistyped path; object-store prefixes exist only once written)."""
    runs: list[str] = []
    for spec in specs:
        if fs.exists(fs.join(spec, schema.RUN_DIR), storage_options):
            runs.append(spec.rstrip("/"))
            continue
        filesystem, path = fs.url_to_fs(spec, storage_options)
        if fs.is_local(filesystem) and not filesystem.isdir(path):
            raise ValueError(f"labels: {spec} does not exist")
        found = [
            fs.join(spec, name)
            for name in fs.listdir(spec, storage_options)
            if fs.exists(fs.join(spec, name, schema.RUN_DIR), storage_options)
        ]
        if not found:
            logger.warning(
                "labels: %s holds no labeling run (no %s/ in it or a sub-folder): mistyped, or none ran yet?",
                spec,
                schema.RUN_DIR,
            )
        runs.extend(found)
    return sorted(dict.fromkeys(runs))


def current_watermark(specs: list[str], storage_options: dict | None = None) -> Watermark:
    """The committed shards of every run named by `specs`, with their markers' checksums."""
    mark: Watermark = {}
    for run in find_runs(specs, storage_options):
        markers = marker_bytes(run, sorted(committed_shards(run, storage_options)), storage_options)
        mark[run] = {s: hashlib.sha256(data).hexdigest() for s, data in markers.items()}
    n = sum(len(m) for m in mark.values())
    logger.info("%d committed shards in %d labeling runs", n, len(mark))
    return mark


def canonical(mark: Watermark) -> Watermark:
    """`mark` with its local run URLs absolute (`pipeline.outputs.local_path`), from the current folder:
    versions published before the step made its paths absolute recorded them as spelled, and are still
    trained on the same shards."""
    return {local_path(run): shards for run, shards in mark.items()}


def digest(mark: Watermark) -> str:
    """One checksum of a whole watermark (equal watermarks, equal digests)."""
    return hashlib.sha256(json.dumps(mark, sort_keys=True).encode()).hexdigest()


def new_shards(mark: Watermark, trained: Watermark) -> int:
    """Shards of `mark` that `trained` does not hold with the same marker (new or redone)."""
    return sum(1 for run, shards in mark.items() for s, h in shards.items() if trained.get(run, {}).get(s) != h)
