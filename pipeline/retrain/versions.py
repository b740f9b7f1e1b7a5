"""Model versions under MODELS/: numbered folders, a claim per number, and the `latest` pointer.

    MODELS/latest.json             {"version": "v0002", ...}: the live version, rewritten last
    MODELS/v0002/_claim.json       {"key": ...}: created exclusively; a number belongs to one key
    MODELS/v0002/model/            the exported model (config.json, weights.safetensors, meta.json)
    MODELS/v0002/version.json      the publishing step's record: trained on what, scores, why;
                                   written after model/, so a version without it is incomplete
                                   and never pointed to
    MODELS/records/<time>-<key>.json   one record per step that did work: what, why, scores, outcome
    MODELS/_steps/<key>/           the step's lease and fine-tune output (checkpoints, for resuming)

A step claims the next free number with `fs.put_exclusive`; before that it looks for a number its key
already claimed (a step killed mid-publish), and finishes that one instead. So one key publishes at
most one version, however many steps run it and wherever they are killed.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any

from pipeline.io import fs

logger = logging.getLogger(__name__)

LATEST = "latest.json"
CLAIM = "_claim.json"
VERSION = "version.json"
MODEL_DIR = "model"
RECORDS_DIR = "records"
STEPS_DIR = "_steps"
_VERSION_NAME = re.compile(r"^v(\d{4,})$")


def version_name(number: int) -> str:
    return f"v{number:04d}"


def list_versions(models: str, storage_options: dict | None = None) -> list[int]:
    """Numbers of every claimed version folder, complete or not, ascending."""
    names = fs.listdir(models, storage_options)
    return sorted(int(m.group(1)) for n in names if (m := _VERSION_NAME.match(n)))


def read_latest(models: str, storage_options: dict | None = None) -> dict[str, Any] | None:
    """The live version's `version.json` (with its `version` name), or None before the first publish."""
    name = live_version(models, storage_options)
    return fs.read_json(fs.join(models, name, VERSION), storage_options) if name else None


def publish(
    models: str,
    key: str,
    model: str,
    info: dict[str, Any],
    expected: str | None,
    storage_options: dict | None = None,
) -> tuple[str, bool]:
    """Publish the model folder `model` as the version of `key`; return its name (e.g. "v0003") and
    whether `latest` now points to it.

    Order: claim a number, copy the model, write version.json, then point `latest` at it, but only if
    `latest` is still `expected` (the version the step trained from and was gated against; None for
    none), checked and written as one compare-and-swap (`fs.replace_if`). Otherwise another step
    published in between and this version is superseded: `latest` never moves backwards, nor to a
    version that was not gated against the live one. A kill between any two writes leaves `latest` as
    it was or pointing to this complete version; a rerun for the same key finishes the same number.
    """
    number = _claim(models, key, storage_options)
    name = version_name(number)
    _copy_folder(model, fs.join(models, name, MODEL_DIR), storage_options)
    fs.put_json(fs.join(models, name, VERSION), {**info, "version": name, "key": key}, storage_options)
    url = fs.join(models, LATEST)
    try:
        raw: bytes | None = fs.read_bytes(url, storage_options)  # read last
    except FileNotFoundError:
        raw = None
    live = json.loads(raw)["version"] if raw is not None else None
    if live == name:
        return name, True  # a rerun of a step killed after it moved `latest`
    pointer = fs.json_bytes({"version": name, "key": key, "published_at": _utc_now()})
    # Compare-and-swap: a step for another key that moved `latest` since this read makes it fail.
    if live == expected:
        if fs.replace_if(url, pointer, raw, storage_options):
            return name, True
        live = live_version(models, storage_options)  # moved between the read and the swap
    logger.warning("not moving latest to %s: it moved from %s to %s meanwhile", name, expected, live)
    return name, False


def live_version(models: str, storage_options: dict | None = None) -> str | None:
    """The name `latest` points to, read now (None before the first publish)."""
    url = fs.join(models, LATEST)
    return fs.read_json(url, storage_options)["version"] if fs.exists(url, storage_options) else None


def _copy_folder(src: str, dst: str, storage_options: dict | None) -> None:
    """Copy every file under folder `src` into `dst`, listed now (no cached listing), without the
    `_tmp.*` files of an unfinished write (an export killed midway leaves them beside its files)."""
    filesystem, dst_path = fs.url_to_fs(dst, storage_options)
    filesystem.makedirs(dst_path, exist_ok=True)  # a local folder must exist; a no-op on object stores
    for name in fs.listdir(src, storage_options):
        if fs.is_temp_name(name):
            continue
        _, path = fs.url_to_fs(fs.join(src, name), storage_options)
        if filesystem.isdir(path):
            _copy_folder(fs.join(src, name), fs.join(dst, name), storage_options)
        else:
            filesystem.copy(path, f"{dst_path}/{name}")


def _claim(models: str, key: str, storage_options: dict | None) -> int:
    """The number `key` claimed before, else the next free one, claimed now."""
    numbers = list_versions(models, storage_options)
    for number in numbers:
        if _claim_key(models, number, storage_options) == key:
            logger.info("%s was claimed by this key before; finishing it", version_name(number))
            return number
    number = (numbers[-1] if numbers else 0) + 1
    while True:
        url = fs.join(models, version_name(number), CLAIM)
        if fs.put_exclusive(url, json.dumps({"key": key, "claimed_at": _utc_now()}).encode(), storage_options):
            return number
        if _claim_key(models, number, storage_options) == key:
            return number
        number += 1


def _claim_key(models: str, number: int, storage_options: dict | None) -> str | None:
    url = fs.join(models, version_name(number), CLAIM)
    return fs.read_json(url, storage_options)["key"] if fs.exists(url, storage_options) else None


def record_url(models: str, key: str) -> str:
    """The URL of a step's record under MODELS/records/ (names sort by the time it is asked for)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return fs.join(models, RECORDS_DIR, f"{stamp}-{key[:12]}.json")


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
