"""The labeling runs a fine-tune reads: their vocabulary, their input shards, their committed shards.

A run is trusted only through FORMAT.md's contract: a label shard exists when its commit marker
`_commits/<shard>.json` exists, and it is read only when its size and SHA-256 match the marker
(checked by `verify`, streaming). The input shard a label shard was made from is found by name among
the run's own input (`_run/config.yaml`). Runs with different vocabularies (class names, order or
background id, from `_run/vocabulary.json`) are refused: their class ids would mean different things.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

from pipeline import schema
from pipeline.config import RunCfg
from pipeline.io import fs
from pipeline.io.shards import expand_shards
from pipeline.outputs import committed_shards, read_run_config
from pipeline.stages.write import read_commit
from pipeline.vocab import Vocabulary, load_vocabulary

logger = logging.getLogger(__name__)

_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class LabelRun:
    output: str  # the run's output URL
    config: RunCfg  # its `_run/config.yaml`
    vocab: Vocabulary  # its `_run/vocabulary.json`
    inputs: dict[str, str]  # shard name -> input shard URL


@dataclass(frozen=True, order=True)
class Unit:
    """One committed label shard and the input shard it labels: the unit of work given to a worker."""

    run: int  # index into the list of runs
    shard: str  # shard name
    labels: str  # label tar URL
    image: str  # input shard URL
    samples: int  # rows in the shard (ok and failed), from the marker
    ok: int  # labelled samples, from the marker


def open_runs(urls: list[str], storage_options: dict | None = None) -> list[LabelRun]:
    """Read each run's config and vocabulary; ValueError when a run is not one or vocabularies differ."""
    runs = []
    for url in urls:
        url = url.rstrip("/")
        if not fs.exists(fs.join(url, schema.CONFIG_FILE), storage_options):
            raise ValueError(f"{url} is not a labeling run's output: no {schema.CONFIG_FILE}")
        config = read_run_config(url, storage_options)
        vocab = load_vocabulary(fs.join(url, schema.VOCAB_FILE), storage_options)
        inputs = {
            schema.shard_name(u): u for u in expand_shards(config.input, config.storage_options or storage_options)
        }
        runs.append(LabelRun(url, config, vocab, inputs))
    first = runs[0]
    for run in runs[1:]:
        _check_same_vocabulary(first, run)
    return runs


def _check_same_vocabulary(a: LabelRun, b: LabelRun) -> None:
    if a.vocab.background != b.vocab.background:
        raise ValueError(
            f"{b.output}: its background class id ({b.vocab.background}) differs from {a.output}'s "
            f"({a.vocab.background}); runs with different vocabularies cannot be mixed"
        )
    if len(a.vocab) != len(b.vocab):
        raise ValueError(f"{b.output}: {len(b.vocab)} classes, {a.output} has {len(a.vocab)}; vocabularies must match")
    for i, (x, y) in enumerate(zip(a.vocab.names, b.vocab.names, strict=True)):
        if x != y:
            raise ValueError(
                f"{b.output}: class {i} is {', '.join(y)!r} there and {', '.join(x)!r} in {a.output}; "
                "runs with different vocabularies cannot be mixed"
            )


def committed_units(runs: list[LabelRun], storage_options: dict | None = None) -> tuple[list[Unit], dict[str, int]]:
    """Every committed label shard of every run, sorted, and counts of shards left out (and why)."""
    units, skipped = [], {"no_input_shard": 0}
    for i, run in enumerate(runs):
        for shard in sorted(committed_shards(run.output, storage_options)):
            if shard not in run.inputs:
                logger.warning("%s: shard %s is not among the run's input shards; skipped", run.output, shard)
                skipped["no_input_shard"] += 1
                continue
            marker = read_commit(run.output, shard, storage_options)
            labels = fs.join(run.output, schema.labels_path(shard))
            units.append(Unit(i, shard, labels, run.inputs[shard], int(marker["samples"]), int(marker["ok"])))
    return units, skipped


def verify(unit: Unit, output: str, storage_options: dict | None = None) -> str | None:
    """None when the label tar's size and SHA-256 match its commit marker, else the reason (streaming)."""
    expected = read_commit(output, unit.shard, storage_options)["files"]["labels"]
    digest, size = hashlib.sha256(), 0
    try:
        filesystem, path = fs.url_to_fs(unit.labels, storage_options)
        with filesystem.open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        return f"{unit.labels} is missing although its commit marker exists"
    if size != expected["bytes"] or digest.hexdigest() != expected["sha256"]:
        return f"{unit.labels}: size or SHA-256 differs from its commit marker"
    return None
