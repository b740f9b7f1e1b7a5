"""ShapeWorld as WebDataset shards: `shapes-{shard:06d}.tar` plus `vocabulary.json`, at any fsspec URL.

Per sample (key `{shard:06d}_{index:06d}`): `jpg` (quality 90, no chroma subsampling so small objects
keep their colour), `txt` caption, `seg.png` exact class map (uint8, 0 = background) and `json`
(`objects`: class id, name, box, visible area; plus `size` and `seed`). Sample `index` of shard
`shard` is `render_scene((seed, shard, index))`, so one shard can be regenerated alone and comes out
byte-identical.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
from PIL import Image

from pipeline import schema
from pipeline.data.shapeworld import Scene, render_scene, vocabulary_json
from pipeline.io import fs
from pipeline.io.tarwrite import TarShardWriter

logger = logging.getLogger(__name__)

JPEG_QUALITY = 90
VOCABULARY_FILE = "vocabulary.json"


def shard_url(out: str, shard: int) -> str:
    return fs.join(out, f"shapes-{shard:06d}.tar")


def encode_jpeg(image: np.ndarray) -> bytes:
    """(H, W, 3) uint8 RGB -> JPEG bytes at the fixed quality, 4:4:4."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def encode_png(seg: np.ndarray) -> bytes:
    """(H, W) uint8 class map -> 8-bit greyscale PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(seg).save(buf, format="PNG")
    return buf.getvalue()


def sample_members(scene: Scene, seed: tuple[int, ...]) -> dict[str, bytes]:
    meta = {
        "objects": [o.to_json() for o in scene.objects],
        "size": list(scene.seg.shape),
        "seed": list(seed),
    }
    return {
        "jpg": encode_jpeg(scene.image),
        schema.TEXT_EXT: scene.caption.encode(),
        schema.TRUTH_EXT: encode_png(scene.seg),
        schema.JSON_EXT: json.dumps(meta, sort_keys=True).encode(),
    }


def write_shard(
    out: str,
    shard: int,
    per_shard: int,
    size: int = 96,
    seed: int = 0,
    small_objects: bool = False,
    storage_options: dict | None = None,
) -> str:
    """Render and write shard `shard` of the dataset at `out`; returns its URL."""
    url = shard_url(out, shard)
    with TarShardWriter(url, storage_options) as writer:
        for index in range(per_shard):
            key = (seed, shard, index)
            writer.write(f"{shard:06d}_{index:06d}", sample_members(render_scene(key, size, small_objects), key))
    return url


def write_dataset(
    out: str,
    shards: int,
    per_shard: int,
    size: int = 96,
    seed: int = 0,
    small_objects: bool = False,
    storage_options: dict | None = None,
) -> list[str]:
    """Write `vocabulary.json` and shards 0..shards-1 under `out`; returns the shard URLs."""
    if shards < 1 or per_shard < 1:
        raise ValueError(f"shards and per-shard must be at least 1, got {shards} and {per_shard}")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    fs.put_json(fs.join(out, VOCABULARY_FILE), vocabulary_json(), storage_options)
    urls = []
    for shard in range(shards):
        urls.append(write_shard(out, shard, per_shard, size, seed, small_objects, storage_options))
        logger.info("wrote %s (%d/%d shards)", urls[-1], shard + 1, shards)
    return urls
