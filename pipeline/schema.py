"""The on-disk contract (FORMAT.md) in one place: sample keys, output layout, Parquet schema.

Every reader and writer imports its names from here, so the format cannot drift between the
labeling job, the evaluator and the fine-tuning job. Columns are only ever added, never renamed.
"""

from __future__ import annotations

import pyarrow as pa

FORMAT_VERSION = 1

# Input sample members (WebDataset: key = member name up to the first dot of its basename).
# Image members, matched in lower case (read.py); when a sample has several, the first listed wins.
# WebDataset's image extensions plus what cameras and tools write (jpe/jfif, tif/tiff, bmp, gif).
IMAGE_EXTS = ("jpg", "jpeg", "jpe", "jfif", "png", "webp", "tif", "tiff", "bmp", "gif", "ppm", "pgm", "pbm", "pnm")
JSON_EXT = "json"
TEXT_EXT = "txt"
TRUTH_EXT = "seg.png"  # optional ground-truth class map (ShapeWorld, evaluation sets)

# Output sample members in labels/<shard>.tar.
LABEL_EXT = "seg.png"  # label map at the original image size
CONF_EXT = "conf.png"  # max class probability quantised to 8 bits
META_EXT = "json"  # per-sample metadata

IGNORE_U8 = 255
IGNORE_U16 = 65535

# Output layout below the run's output URL.
RUN_DIR = "_run"
CONFIG_FILE = "_run/config.yaml"
VOCAB_FILE = "_run/vocabulary.json"
SUMMARY_FILE = "_run/summary.json"
LABELS_DIR = "labels"
META_DIR = "meta"
COMMITS_DIR = "_commits"


def ignore_value(n_classes: int) -> int:
    """The ignore label: 255 for 8-bit maps (fewer than 255 classes), 65535 for 16-bit ones."""
    return IGNORE_U8 if n_classes < IGNORE_U8 else IGNORE_U16


# Input shard names: a tar, or a tar compressed as WebDataset reads it (tarfile's transparent "r|*").
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def shard_name(url: str) -> str:
    """Output name of an input shard: its basename without its shard suffix (`x.tar`, `x.tar.gz` → `x`)."""
    base = url.rstrip("/").rsplit("/", 1)[-1]
    suffix = next((s for s in SHARD_SUFFIXES if base.endswith(s)), "")
    return base[: len(base) - len(suffix)]


def labels_path(shard: str) -> str:
    return f"{LABELS_DIR}/{shard}.tar"


def meta_path(shard: str) -> str:
    return f"{META_DIR}/{shard}.parquet"


def commit_path(shard: str) -> str:
    return f"{COMMITS_DIR}/{shard}.json"


ZOOM_REGION = pa.list_(pa.int32(), 4)  # x0, y0, x1, y1 in original image pixels

ROW_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # see key_columns for keys that are not UTF-8
        pa.field("shard", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # ok | failed
        pa.field("error", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("n_classes_present", pa.int32()),
        pa.field("class_ids", pa.list_(pa.int32())),
        pa.field("class_pixels", pa.list_(pa.int64())),
        pa.field("mean_confidence", pa.float32()),
        pa.field("ignored_fraction", pa.float32()),
        pa.field("zoom_regions", pa.list_(ZOOM_REGION)),
        pa.field("head", pa.string()),
        pa.field("model", pa.string()),
        pa.field("config_hash", pa.string()),
        pa.field("seconds", pa.float32()),
        pa.field("key_bytes", pa.binary()),  # the key's bytes when they are not UTF-8, else null
    ]
)


def key_columns(key: str) -> dict[str, str | bytes | None]:
    """Parquet `key` and `key_bytes` of a sample key.

    Keys are tar member names, which may be any bytes; the reader keeps bytes that are not UTF-8 as
    surrogate escapes (`"caf\\udce9"` for Latin-1 b"caf\\xe9", PEP 383), which Parquet's UTF-8
    strings cannot hold. Such a key is stored as readable text with backslash escapes
    (`"caf\\\\xe9"`) plus its exact bytes in `key_bytes`, from which the key is
    `key_bytes.decode("utf-8", "surrogateescape")`.
    """
    try:
        key.encode("utf-8")
        return {"key": key, "key_bytes": None}
    except UnicodeEncodeError:
        return {"key": text_column(key), "key_bytes": key.encode("utf-8", "surrogateescape")}


def text_column(name: str) -> str:
    """`name` (a key or a shard name) as Parquet UTF-8 text: bytes that are not UTF-8, which Python
    keeps as surrogate escapes, written as `\\xNN` escapes (a local shard file may be named in Latin-1)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


ERROR_FIELDS = ("shard", "key", "reason")  # an error record from the reader
