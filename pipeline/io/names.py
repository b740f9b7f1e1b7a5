"""Tar member names → WebDataset keys and extensions, which members are not samples, and what a file
that is not a tar is.

Keys and extensions follow WebDataset (`webdataset.tariterators`): the key is the member name up to
the first dot of its basename, directory prefix included (`a/b/000.seg.png` → key `a/b/000`,
extension `seg.png`), and extensions are matched in lower case (`IMG_0001.JPG` is a `jpg`), as
cameras and Windows tools write them. Keys keep their exact bytes: a name that is not UTF-8 comes
out of `tarfile` with surrogate escapes (PEP 383) and goes back into the label tar unchanged.

Members that are not samples are skipped and counted, never failed: hidden files (a basename that
starts with a dot: macOS `._NAME` AppleDouble sidecars and `.DS_Store`, editor and VCS files),
which WebDataset's key pattern also never matches, and WebDataset's own metadata members
(`__index__`, `__key__/...`: its `skip_meta` pattern).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# WebDataset's default `skip_meta` (tariterators.tar_file_iterator).
_WDS_META = re.compile(r"__[^/]*__($|/)")

HIDDEN = "hidden"
METADATA = "metadata"

# First bytes of files people pass as shards by mistake, and what to call them. gzip, bzip2 and xz
# tars are read (tarfile's transparent decompression); these prefixes only name a file that failed.
_MAGIC = (
    (b"PK\x03\x04", "a ZIP archive"),
    (b"PK\x05\x06", "an empty ZIP archive"),
    (b"\x28\xb5\x2f\xfd", "a Zstandard-compressed file (not read: recompress as .tar.gz or store a plain .tar)"),
    (b"\x04\x22\x4d\x18", "an LZ4-compressed file (not read: recompress as .tar.gz or store a plain .tar)"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!\x1a\x07", "a RAR archive"),
    (b"\x1f\x8b", "a gzip file that does not hold a tar"),
    (b"BZh", "a bzip2 file that does not hold a tar"),
    (b"\xfd7zXZ\x00", "an xz file that does not hold a tar"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"PAR1", "a Parquet file"),
    (b"%PDF", "a PDF document"),
)
MAGIC_BYTES = max(len(magic) for magic, _ in _MAGIC)


def split_name(name: str) -> tuple[str, str]:
    """WebDataset key and lower-case extension of a member name (`./` prefixes dropped)."""
    while name.startswith("./"):
        name = name[2:]
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{folder}/{stem}" if folder else stem
    return key, ext.lower() if dot else ""


def dotted_extension(exts: Iterable[str], wanted: Iterable[str]) -> str | None:
    """The first of `exts` that is one of `wanted` after a further dot (`edited.jpg` for `jpg`), else None.

    Such an extension comes from a name such as `IMG_0001.edited.jpg`, whose key ended at its first dot:
    the member belongs to key `IMG_0001` under extension `edited.jpg`, not to `IMG_0001.edited` as `jpg`.
    """
    wanted = set(wanted)
    return next((ext for ext in exts if "." in ext and ext.rpartition(".")[2] in wanted), None)


def skip_reason(name: str) -> str | None:
    """`HIDDEN` or `METADATA` for a member that is not part of any sample, else None."""
    while name.startswith("./"):
        name = name[2:]
    if name.rstrip("/").rpartition("/")[2].startswith("."):
        return HIDDEN
    if _WDS_META.match(name):
        return METADATA
    return None


def describe_non_tar(head: bytes) -> str:
    """What a file that tarfile could not open is, from its first `MAGIC_BYTES` bytes ("" if unknown)."""
    if not head:
        return "the file is empty"
    return next((what for magic, what in _MAGIC if head.startswith(magic)), "")
