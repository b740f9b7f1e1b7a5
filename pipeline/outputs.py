"""The output folder of a labeling run as a whole: its config, vocabulary, commit markers and summary.

A run's identity is `_run/config.yaml`, written once when the output is new. A later run into the
same output resumes only when its config hashes equal (`config_hash`, which leaves out the execution
keys such as the Ray address) and its vocabulary is the same; otherwise it is refused with the keys
that differ, because mixing two configs' labels in one output would be silent corruption.
Committed shards are those with a marker in `_commits/`; everything else is redone.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
from typing import Any

import yaml

from pipeline import schema
from pipeline.config import (
    DEFAULT_HEAD,
    HeadCfg,
    ModelCfg,
    RunCfg,
    config_hash,
    diff_keys,
    dump_yaml,
    from_dict,
    hashed_fields,
    hide_secrets,
)
from pipeline.io import fs
from pipeline.vocab import Vocabulary

logger = logging.getLogger(__name__)

_RUN_DIRS = (schema.RUN_DIR, schema.COMMITS_DIR, schema.LABELS_DIR, schema.META_DIR)


class OutputConflict(ValueError):
    """The output already holds a run with a different config or vocabulary."""


class OutputNotWritable(ValueError):
    """The output cannot be written (read-only, a file, under a file): bad input, nothing was written."""


def public_config(cfg: RunCfg) -> RunCfg:
    """`cfg` without credentials in `storage_options` (the form written to `_run/config.yaml`)."""
    return dataclasses.replace(cfg, storage_options=hide_secrets(cfg.storage_options))


def canonical_config(cfg: RunCfg) -> RunCfg:
    """`cfg` with the local paths it names spelled one way: absolute and normalised, `file://` dropped.

    `data/shards`, `./data/shards/` and `/home/me/data/shards` name the same input from the same
    folder, so they are one run: a resume compares what a config means, not how it was spelled.
    Relative paths are taken from the current folder. URLs of other stores are kept as written;
    `model.name`, `model.pretrained` and `prompts.templates` change only when they name an existing
    local file or folder (otherwise they are an architecture, a tag or a template set).
    """
    return dataclasses.replace(
        cfg,
        input=[local_path(p) for p in cfg.input],
        output=local_path(cfg.output),
        model=canonical_model(cfg.model),
        vocab=dataclasses.replace(cfg.vocab, file=local_path(cfg.vocab.file)),
        prompts=dataclasses.replace(cfg.prompts, templates=existing_path(cfg.prompts.templates)),
    )


def canonical_model(model: ModelCfg) -> ModelCfg:
    """`model` with `name` and `pretrained` absolute when they name an existing local file or folder
    (`existing_path`); an architecture, a tag or a URL stays as written."""
    return dataclasses.replace(model, name=existing_path(model.name), pretrained=existing_path(model.pretrained))


def local_path(url: str) -> str:
    """`url` absolute and normalised when it is a local path (relative ones from the current folder,
    `~` expanded, `file://` dropped); a URL of another store, or "" (unset), as written."""
    if not url:
        return url
    if url.startswith("file://"):
        url = url[len("file://") :]
    elif "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def existing_path(value: str) -> str:
    """`value` as `local_path` when it names an existing local file or folder, else as written (a name
    or tag that is not a path, such as an open_clip architecture)."""
    local = local_path(value)
    return local if value and "://" not in local and os.path.exists(local) else value


def prepare_output(cfg: RunCfg, vocab: Vocabulary, overwrite: bool = False) -> set[str]:
    """Make `cfg.output` ready for this run and return the names of shards already committed.

    A new output gets `_run/config.yaml`. An existing one is resumed when config and vocabulary are
    equal, cleared first when `overwrite`, and refused otherwise (OutputConflict naming the keys).
    An output that cannot be written (a read-only mount or bucket, a file, a folder under a file)
    raises OutputNotWritable before anything is written.
    """
    try:
        return _prepare(cfg, vocab, overwrite)
    except OSError as exc:
        refused = (PermissionError, NotADirectoryError, FileExistsError, IsADirectoryError)
        if isinstance(exc, refused) or exc.errno in (errno.EROFS, errno.EACCES, errno.ENOTDIR):
            raise OutputNotWritable(f"output {cfg.output} cannot be written: {exc.strerror or exc}") from None
        raise


def _prepare(cfg: RunCfg, vocab: Vocabulary, overwrite: bool) -> set[str]:
    out, options = cfg.output, cfg.storage_options
    filesystem, path = fs.fresh(out, options)
    if filesystem.isfile(path):
        raise OutputNotWritable(f"output {out} is a file, not a folder")
    config_url = fs.join(out, schema.CONFIG_FILE)
    if overwrite:
        for name in _RUN_DIRS:
            fs.remove(fs.join(out, name), options)
    elif fs.exists(config_url, options):
        _check_same_run(canonical_config(cfg), vocab, canonical_config(read_run_config(out, options)))
    elif committed_shards(out, options):
        raise OutputConflict(
            f"{out} holds committed shards but no {schema.CONFIG_FILE}; use --overwrite or a new output"
        )
    if not fs.exists(config_url, options):
        fs.put_atomic(config_url, dump_yaml(public_config(cfg)).encode(), options)
    remove_temporaries(out, options)
    return committed_shards(out, options)


def read_run_config(output: str, storage_options: dict | None = None) -> RunCfg:
    """The config an output was started with (`_run/config.yaml`).

    A recorded `head.name` of `DEFAULT_HEAD` (or "") without options is read as unset (null): releases before
    `head.name` could be null recorded it for every run, a student's included, whose own head labelled;
    for any other model the two label alike."""
    text = fs.read_text(fs.join(output, schema.CONFIG_FILE), storage_options)
    cfg = from_dict(RunCfg, yaml.safe_load(text) or {}, schema.CONFIG_FILE)
    unset = not cfg.head.options and cfg.head.name in ("", DEFAULT_HEAD)
    return dataclasses.replace(cfg, head=HeadCfg()) if unset else cfg


def recorded_storage_options(output: str, storage_options: dict | None = None) -> dict[str, Any]:
    """The `storage_options` that `output` (a labeling run's or a fine-tune's) was written with, under
    `storage_options` (which win): `_run/config.yaml` keeps the non-secret ones such as `endpoint_url`,
    so a reader needs only what reaches `output` itself; credentials come from the environment."""
    given = dict(storage_options or {})
    url = fs.join(output, schema.CONFIG_FILE)
    if not fs.exists(url, given):
        return given
    recorded = (yaml.safe_load(fs.read_text(url, given)) or {}).get("storage_options") or {}
    return {**recorded, **given}


def _check_same_run(cfg: RunCfg, vocab: Vocabulary, previous: RunCfg) -> None:
    if config_hash(previous) != config_hash(cfg):
        keys = diff_keys(hashed_fields(previous), hashed_fields(cfg))  # only what the hash sees differ
        raise OutputConflict(
            f"{cfg.output} was written with a different config (differing keys: {', '.join(keys)}); "
            "rerun with --overwrite to replace it, or choose a new output"
        )
    vocab_url = fs.join(cfg.output, schema.VOCAB_FILE)
    if fs.exists(vocab_url, cfg.storage_options):
        written = fs.read_json(vocab_url, cfg.storage_options)
        mine = vocab.to_json()
        if [written.get("classes"), written.get("background")] != [mine["classes"], mine["background"]]:
            raise OutputConflict(
                f"{cfg.output} was labelled with a different vocabulary (differing keys: vocab); "
                "rerun with --overwrite to replace it, or choose a new output"
            )


def write_vocabulary(
    output: str, vocab: Vocabulary, templates: list[str], text_checksum: str, storage_options: dict | None = None
) -> None:
    """`_run/vocabulary.json`: class ids (the list position), names, templates, text-embedding checksum.

    Written by the first model that starts; on a resume, a different checksum (other weights or
    numerics behind the same config) is logged, since labels from both would share one output.
    """
    url = fs.join(output, schema.VOCAB_FILE)
    content = {**vocab.to_json(), "templates": list(templates), "text_embedding_sha256": text_checksum}
    if fs.exists(url, storage_options):
        previous = fs.read_json(url, storage_options).get("text_embedding_sha256")
        if previous != text_checksum:
            logger.warning(
                "text embeddings differ from the ones this output was started with (%s vs %s)",
                text_checksum[:12],
                str(previous)[:12],
            )
        return
    fs.put_json(url, content, storage_options)


def committed_shards(output: str, storage_options: dict | None = None) -> set[str]:
    """Names of the shards under `output` that have a commit marker (listed now, never from a cache)."""
    names = fs.listdir(fs.join(output, schema.COMMITS_DIR), storage_options)
    return {n[: -len(".json")] for n in names if n.endswith(".json") and not fs.is_temp_name(n)}


def marker_bytes(output: str, shards: list[str], storage_options: dict | None = None) -> dict[str, bytes]:
    """The commit markers of `shards` under `output` as written ({shard: bytes}, in `shards` order),
    fetched together (concurrently on object stores) and never from a cache."""
    if not shards:
        return {}
    filesystem, _ = fs.url_to_fs(output, storage_options)
    paths = [fs.url_to_fs(fs.join(output, schema.commit_path(s)), storage_options)[1] for s in shards]
    found = filesystem.cat(paths)
    return {s: found[p] for s, p in zip(shards, paths, strict=True)}


def read_markers(output: str, shards: list[str], storage_options: dict | None = None) -> list[dict[str, Any]]:
    """The commit markers of `shards` under `output`, parsed, in `shards` order."""
    return [json.loads(data) for data in marker_bytes(output, shards, storage_options).values()]


def remove_temporaries(output: str, storage_options: dict | None = None) -> int:
    """Delete partial files left by killed attempts (`_tmp.*` in labels/, meta/, _commits/), and the
    labels/ and meta/ files of shards without a commit marker (an attempt killed between moving its
    files to their final names and writing the marker): final names are for committed output only.

    Call only while no worker writes into `output`: a live attempt's temporary files look the same.
    """
    removed = 0
    for folder in (schema.LABELS_DIR, schema.META_DIR, schema.COMMITS_DIR, schema.RUN_DIR):
        for name in fs.listdir(fs.join(output, folder), storage_options):
            if fs.is_temp_name(name):
                fs.remove(fs.join(output, folder, name), storage_options)
                removed += 1
    removed += _remove_uncommitted(output, storage_options)
    if removed:
        logger.info("removed %d partial files of interrupted attempts", removed)
    return removed


def _remove_uncommitted(output: str, storage_options: dict | None) -> int:
    committed = committed_shards(output, storage_options)
    removed = 0
    for folder, suffix in ((schema.LABELS_DIR, ".tar"), (schema.META_DIR, ".parquet")):
        for name in fs.listdir(fs.join(output, folder), storage_options):
            if name.endswith(suffix) and not fs.is_temp_name(name) and name[: -len(suffix)] not in committed:
                fs.remove(fs.join(output, folder, name), storage_options)
                removed += 1
    return removed


def write_summary(output: str, summary: dict[str, Any], storage_options: dict | None = None) -> None:
    fs.put_json(fs.join(output, schema.SUMMARY_FILE), summary, storage_options)
