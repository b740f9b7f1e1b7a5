"""Input spec → list of shard URLs: the plan every job starts from.

A spec is a list (each element itself a spec), a brace pattern (`train-{000000..000099}.tar`, zero
padding kept; `{train,val}` alternatives; several and nested groups), a glob (`s3://bkt/x/*.tar`)
or a folder. A glob or a folder gives the shards it lists: names ending in `schema.SHARD_SUFFIXES`
(`.tar` and its compressed forms), never hidden files (a name starting with a dot: macOS `._NAME`
AppleDouble sidecars and `.DS_Store`, the rule `names.skip_reason` applies to tar members), whose
count is logged once per spec. Brace
expansion comes first, so `s3://bkt/{a,b}/*.tar` works. A path that exists always means itself,
even when it holds `*`, `?`, `[` or braces (`photos[2019].tar`, `{raw}/`): a spec and each name its
braces spell out are looked up as written first, and only expanded or globbed when missing. So is a
folder of a glob whose name holds glob characters: in `set[2]/*.tar`, an existing folder `set[2]`
is that folder (braces in a glob's folders are still expanded).

Rules, chosen so a typo fails before any compute is spent:
- Every string spec (each list element) must match at least one shard, or ValueError names it.
- Names a brace pattern spells out but that do not exist are dropped with a warning (datasets
  downloaded shard by shard often have gaps); globs and folders match what is there.
- Globs and folders come out sorted; lists and brace patterns keep their order; a shard named twice
  is kept once. Temporary files of unfinished writers (`_tmp.*`) never match a glob or a folder.
- A file named as it is (a path, or a name a brace pattern spells out) is kept whatever its name.
- URLs keep their protocol (`s3://bkt/x.tar`); local shards come out as absolute paths.

Existence is checked with one listing per folder (not one request per shard), so a pattern of
100 000 shards on S3 costs a few list calls.
"""

from __future__ import annotations

import glob
import logging
import re
from collections import defaultdict

from fsspec.spec import AbstractFileSystem

from pipeline import schema
from pipeline.io import fs
from pipeline.io.names import HIDDEN, skip_reason

logger = logging.getLogger(__name__)

_RANGE = re.compile(r"(\d+)\.\.(\d+)")
_GLOB_CHARS = ("*", "?", "[")


def expand_shards(spec: str | list[str], storage_options: dict | None = None) -> list[str]:
    """Shard URLs named by `spec` (see the module docstring for the forms and rules)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    if not specs:
        raise ValueError("no input shards given (empty list)")
    urls: list[str] = []
    for one in specs:
        if not isinstance(one, str) or not one.strip():
            raise ValueError(f"input spec {one!r} is not a path, URL or pattern")
        found = _expand_one(one, storage_options)
        if not found:
            raise ValueError(f"input spec {one!r} matches no shard{_loose_images_hint(one, storage_options)}")
        urls.extend(found)
    return list(dict.fromkeys(urls))


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion: `a{0..2}` → a0 a1 a2, `{08..10}` → 08 09 10, `{x,y}z` → xz yz.

    A range keeps zero padding when either end has a leading zero; it may count down. Groups may
    be nested and repeated; the result follows the pattern's order.
    """
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise ValueError(f"unbalanced '}}' in input spec {pattern!r}")
        return [pattern]
    end = _matching_brace(pattern, start)
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    choices = _range_choices(body) if _RANGE.fullmatch(body) else _split_top_level(body)
    if len(choices) < 2 and not _RANGE.fullmatch(body):
        raise ValueError(f"brace group {{{body}}} in input spec {pattern!r} needs a range a..b or alternatives a,b")
    return [head + rest for choice in choices for rest in expand_braces(choice + tail)]


def _expand_one(spec: str, storage_options: dict | None) -> list[str]:
    filesystem, _ = fs.url_to_fs(spec, storage_options)
    filesystem.invalidate_cache()  # a listing cached earlier in this process may predate new shards
    literal = "{" in spec or "}" in spec
    patterns = [spec] if literal and _kind(filesystem, filesystem._strip_protocol(spec)) else expand_braces(spec)
    kinds = _kinds(filesystem, [filesystem._strip_protocol(p) for p in patterns])
    missing = [p for p in patterns if not _is_glob(p) and kinds[filesystem._strip_protocol(p)] is None]
    paths: list[str] = []
    hidden: list[str] = []
    for pattern in patterns:
        path = filesystem._strip_protocol(pattern)
        if kinds[path] is None and _is_glob(pattern):
            found = filesystem.glob(_escape_existing_folder(filesystem, path), detail=True)
            paths.extend(_listed_shards([p for p, info in found.items() if info["type"] == "file"], hidden))
        elif kinds[path] == "directory":
            entries = filesystem.ls(path, detail=True)
            paths.extend(_listed_shards([e["name"] for e in entries if e["type"] == "file"], hidden))
        elif kinds[path] == "file":
            paths.append(path)
    if missing and paths:
        logger.warning(
            "input spec %r: %d of %d names do not exist, e.g. %s", spec, len(missing), len(patterns), missing[:3]
        )
    if hidden:
        names = [p.rpartition("/")[2] for p in hidden[:3]]
        logger.info(
            "input spec %r: %d hidden files skipped (names starting with '.'), e.g. %s", spec, len(hidden), names
        )
    return [_to_url(filesystem, p) for p in paths]


def _listed_shards(files: list[str], hidden: list[str]) -> list[str]:
    """The shards among the files a folder or a glob listed, sorted: tar-like names, neither temporary
    nor hidden; the hidden ones are appended to `hidden`."""
    shards = []
    for path in sorted(files):
        if skip_reason(path) == HIDDEN:
            hidden.append(path)
        elif path.endswith(schema.SHARD_SUFFIXES) and not fs.is_temp_name(path):
            shards.append(path)
    return shards


def _kinds(filesystem: AbstractFileSystem, paths: list[str]) -> dict[str, str | None]:
    """Kind of each path ("file", "directory", or None when missing), with one listing per parent folder."""
    by_parent: dict[str, list[str]] = defaultdict(list)
    for path in paths:
        by_parent[filesystem._parent(path)].append(path)
    kinds: dict[str, str | None] = {}
    for parent, children in by_parent.items():
        if len(children) == 1:
            kinds[children[0]] = _kind(filesystem, children[0])
            continue
        try:
            listing = {e["name"].rstrip("/"): e["type"] for e in filesystem.ls(parent, detail=True)}
        except FileNotFoundError:
            listing = {}
        kinds.update({child: listing.get(child) for child in children})
    return kinds


def _kind(filesystem: AbstractFileSystem, path: str) -> str | None:
    try:
        return filesystem.info(path)["type"]
    except (FileNotFoundError, NotADirectoryError):  # the latter: a file's name used as a folder
        return None


def _escape_existing_folder(filesystem: AbstractFileSystem, path: str) -> str:
    """The glob `path` with its deepest folder that exists as written, when that folder's own path
    holds glob characters (`photos[2019]/*.tar` where `photos[2019]` exists), escaped: an existing
    path means itself, so the glob matches below that folder only (one lookup per such folder)."""
    parts = path.split("/")
    for end in range(len(parts) - 1, 0, -1):
        folder = "/".join(parts[:end])
        if _is_glob(folder) and _kind(filesystem, folder) == "directory":
            return "/".join([glob.escape(folder), *parts[end:]])
    return path


def _loose_images_hint(spec: str, storage_options: dict | None) -> str:
    """Why a folder matched no shard when it holds images instead (the commonest first mistake)."""
    filesystem, path = fs.url_to_fs(spec, storage_options)
    try:
        names = filesystem.ls(path, detail=False) if filesystem.isdir(path) else []
    except OSError:  # the spec is a pattern, or the store refuses the listing: no hint
        return ""
    images = [n for n in names if n.rsplit(".", 1)[-1].lower() in schema.IMAGE_EXTS]
    if not images:
        return ""
    return (
        f" (the folder holds {len(images)} image files, not tar shards: pack them into WebDataset shards, "
        "e.g. tar cf images-000000.tar *.jpg, or label single images with clipdense segment)"
    )


def _to_url(filesystem: AbstractFileSystem, path: str) -> str:
    return path if fs.is_local(filesystem) else filesystem.unstrip_protocol(path)


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in _GLOB_CHARS)


def _matching_brace(pattern: str, start: int) -> int:
    depth = 0
    for i in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[i], 0)
        if depth == 0:
            return i
    raise ValueError(f"unbalanced '{{' in input spec {pattern!r}")


def _split_top_level(body: str) -> list[str]:
    """Split on commas that are not inside a nested brace group."""
    parts, depth, current = [], 0, []
    for c in body:
        if c == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        depth += {"{": 1, "}": -1}.get(c, 0)
        current.append(c)
    parts.append("".join(current))
    return parts


def _range_choices(body: str) -> list[str]:
    first, last = _RANGE.fullmatch(body).groups()
    padded = any(len(end) > 1 and end.startswith("0") for end in (first, last))
    width = max(len(first), len(last)) if padded else 0
    lo, hi = int(first), int(last)
    step = 1 if hi >= lo else -1
    return [str(i).zfill(width) for i in range(lo, hi + step, step)]
