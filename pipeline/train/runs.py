"""The labeling runs a fine-tune reads: their vocabulary, their input shards, their committed shards.

A run is trusted only through FORMAT.md's contract: a label shard exists when its commit marker
`_commits/<shard>.json` exists, and it is read only when its size and SHA-256 match the marker
(checked by `verify`, streaming). The input shard a label shard was made from is found by name among
the run's own input (`_run/config.yaml`). Runs with different vocabularies (class names, order or
background id, from `_run/vocabulary.json`) are refused: their class ids would mean different things.
Runs whose labels must agree (`data.combine: agree`) are refused when a shard of the same name labels
different input shards, or when no shard is committed in all of them.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schema
from pipeline.config import RunCfg
from pipeline.io import fs
from pipeline.io.shards import expand_shards
from pipeline.models.backbone import model_meta
from pipeline.models.heads import labelling_head_name
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
    """The label shards of one input shard, one per run it joins, and that input shard: the unit of
    work given to a worker. `data.combine: each` makes a unit per run's shard; `agree`, one for every
    run's shard of the same name."""

    runs: tuple[int, ...]  # indices into the list of runs
    shard: str  # shard name
    labels: tuple[str, ...]  # label tar URLs, one per run
    image: str  # input shard URL
    samples: int  # rows in the shard (ok and failed), from the (first run's) marker
    ok: int  # labelled samples (with `agree`: labelled in every run, from their Parquet rows)
    digests: tuple[tuple[int, str], ...]  # per label tar: the size in bytes and SHA-256 its marker records


@dataclass(frozen=True)
class LabelSet:
    """What a fine-tune reads of its labeling runs (`read_label_set`), read once and handed to every
    worker: the runs, their committed shards as units, the label shards left out, and per run the
    model and head that labelled it."""

    runs: tuple[LabelRun, ...]
    units: tuple[Unit, ...]
    skipped: dict[str, int]  # label shards left out, by reason (`committed_units`)
    labelled_by: tuple[dict[str, str], ...]  # per run: labels (its URL), model, pretrained, head

    @property
    def usable(self) -> tuple[Unit, ...]:
        """The units with labelled samples, the ones workers share out (a shard whose rows all failed
        has nothing to train on)."""
        return tuple(unit for unit in self.units if unit.ok)


def read_label_set(runs: Sequence[LabelRun], storage_options: dict | None = None, combine: str = "each") -> LabelSet:
    """The `LabelSet` of `runs` (`open_runs`), their units by `combine` (`committed_units`).

    Raises:
        ValueError: `committed_units`'s refusals, no committed label shard in any run, no labelled
            sample in them, or a committed shard whose marker or Parquet rows cannot be read (named).
    """
    units, skipped = committed_units(runs, storage_options, combine)
    if not units:
        raise ValueError(f"no committed label shard in {', '.join(run.output for run in runs)}")
    labelled_by = tuple(
        {
            "labels": run.output,
            "model": run.config.model.name,
            "pretrained": run.config.model.pretrained,
            "head": labelling_head(i, units, runs, storage_options),
        }
        for i, run in enumerate(runs)
    )
    label_set = LabelSet(tuple(runs), tuple(units), skipped, labelled_by)
    if not label_set.usable:
        where = ", ".join(run.output for run in runs)
        if combine == "agree":
            raise ValueError(f"data.combine=agree: no sample is labelled in every run of {where}")
        raise ValueError(f"no labelled sample in {where}: all {sum(unit.samples for unit in units)} rows failed")
    for i, run in enumerate(runs):
        if not any(i in unit.runs for unit in label_set.usable):
            logger.warning(
                "%s: no committed label shard with labelled samples; it adds nothing to the fine-tune", run.output
            )
    return label_set


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


def committed_units(
    runs: Sequence[LabelRun], storage_options: dict | None = None, combine: str = "each"
) -> tuple[list[Unit], dict[str, int]]:
    """Every committed label shard of every run as units (`Unit`, by `combine`: each | agree), in run
    then shard order, and counts of shards left out: label shards whose input shard is not among
    their run's (`no_input_shard`), and with `agree`, shard names committed in some runs only
    (`not_in_every_run`, after those).

    Raises:
        ValueError: a commit marker that cannot be read (named); with `agree`, a shard of the same
            name labelling different input shards in two runs, or no shard committed in every run.
    """
    skipped = {"no_input_shard": 0}
    found: list[dict[str, _Committed]] = []  # per run: shard -> what its commit marker says
    for run in runs:
        shards = {}
        for shard in sorted(committed_shards(run.output, storage_options)):
            if shard not in run.inputs:
                logger.warning("%s: shard %s is not among the run's input shards; skipped", run.output, shard)
                skipped["no_input_shard"] += 1
                continue
            shards[shard] = _read_marker(run.output, shard, storage_options)
        found.append(shards)
    if combine == "each":
        units = [
            Unit((i,), shard, (c.labels,), runs[i].inputs[shard], c.samples, c.ok, (c.digest,))
            for i, shards in enumerate(found)
            for shard, c in shards.items()
        ]
        return units, skipped
    everywhere = set.intersection(*(set(shards) for shards in found))
    skipped["not_in_every_run"] = len(set.union(*(set(shards) for shards in found)) - everywhere)
    units = []
    for shard in sorted(everywhere):
        image = runs[0].inputs[shard]
        for run in runs[1:]:
            if run.inputs[shard] != image:
                raise ValueError(
                    f"data.combine=agree: shard {shard} of {run.output} labels {run.inputs[shard]}, that of "
                    f"{runs[0].output} labels {image}; runs that agree must label the same input"
                )
        labels = tuple(shards[shard].labels for shards in found)
        digests = tuple(shards[shard].digest for shards in found)
        ok = len(set.intersection(*(_ok_keys(run.output, shard, storage_options) for run in runs)))
        units.append(Unit(tuple(range(len(runs))), shard, labels, image, found[0][shard].samples, ok, digests))
    if not units:
        committed = ", ".join(f"{len(shards)} in {run.output}" for run, shards in zip(runs, found, strict=True))
        raise ValueError(f"data.combine=agree: no shard is committed in every run (committed: {committed})")
    return units, skipped


@dataclass(frozen=True)
class _Committed:
    labels: str  # the label tar's URL
    samples: int
    ok: int
    digest: tuple[int, str]  # the label tar's size in bytes and SHA-256


def _read_marker(output: str, shard: str, storage_options: dict | None) -> _Committed:
    """What the commit marker of `shard` under `output` records; ValueError naming it when it is not
    JSON or lacks `samples`, `ok` or `files.labels` (bytes, sha256)."""
    url = fs.join(output, schema.commit_path(shard))
    try:
        marker = read_commit(output, shard, storage_options)
        labels = marker["files"]["labels"]
        digest = (int(labels["bytes"]), str(labels["sha256"]))
        return _Committed(fs.join(output, schema.labels_path(shard)), int(marker["samples"]), int(marker["ok"]), digest)
    except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{url}: not a readable commit marker ({type(exc).__name__}: {exc})") from None


def labelling_head(
    run: int, units: Sequence[Unit], runs: Sequence[LabelRun], storage_options: dict | None = None
) -> str:
    """The dense head that labelled run `run` (an index into `runs`), from the Parquet rows of its first
    shard among `units` that has rows. When no shard has rows, the head its config and model select
    (`labelling_head_name`), or the config's ("" when it names none) when the model can no longer be
    found."""
    for unit in units:
        if run in unit.runs and unit.samples:
            heads = _columns(runs[run].output, unit.shard, ["head"], storage_options)[0]
            if heads:
                return heads[0]
    config = runs[run].config
    try:
        return labelling_head_name(
            config.head, model_meta(config.model.name, config.storage_options or storage_options), config.model.name
        )
    except ValueError:  # a student folder since removed, or a head it refuses: no row of the run is read
        return config.head.name or ""


def _ok_keys(output: str, shard: str, storage_options: dict | None) -> set[tuple[str, bytes | None]]:
    """The keys of a committed shard's labelled samples (status ok), from its Parquet rows."""
    rows = zip(*_columns(output, shard, ["key", "key_bytes", "status"], storage_options), strict=True)
    return {(key, raw) for key, raw, status in rows if status == "ok"}


def _columns(output: str, shard: str, names: list[str], storage_options: dict | None) -> list[list]:
    url = fs.join(output, schema.meta_path(shard))
    try:
        table = pq.read_table(io.BytesIO(fs.read_bytes(url, storage_options)), columns=names)
    except (OSError, pa.ArrowException) as exc:  # missing, cut or not Parquet, although committed
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{url}: the rows of committed shard {shard} cannot be read: {reason}") from None
    return [table.column(name).to_pylist() for name in names]


def verify(labels: str, expected: tuple[int, str], storage_options: dict | None = None) -> str | None:
    """None when the label tar `labels` has the size in bytes and SHA-256 `expected` (`Unit.digests`:
    its commit marker's), else the reason (streaming)."""
    digest, size = hashlib.sha256(), 0
    try:
        filesystem, path = fs.url_to_fs(labels, storage_options)
        with filesystem.open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        return f"{labels} is missing although its commit marker exists"
    if (size, digest.hexdigest()) != expected:
        return f"{labels}: size or SHA-256 differs from its commit marker"
    return None
