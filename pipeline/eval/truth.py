"""Ground truth for evaluation: ShapeWorld (or any) shards with `seg.png`, or a VOC-style folder.

Both give the same stream of `TruthSample`s, so synthetic scenes and a user's real labelled set are
scored by the same code.

Shards: each sample carries `seg.png` (class ids, 8- or 16-bit) and optionally a `json` with
`objects` (each with a class and a box) for the small-object score; the class names are the
`vocabulary.json` beside the shards (or a file given explicitly).

VOC-style folder::

    FOLDER/JPEGImages/<key>.jpg             images (any of jpg jpeg png webp)
    FOLDER/SegmentationClass/<key>.png      class-index PNGs (palette or grey), 255 = void
    FOLDER/SegmentationObject/<key>.png     optional instance PNGs: give objects for small-object IoU
    FOLDER/ImageSets/Segmentation/<split>.txt  optional key lists (`split=` picks one)
    FOLDER/vocabulary.json | classes.txt | labels.txt   class names, line i = class id i
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from pipeline import schema
from pipeline.eval import counted
from pipeline.eval.metrics import TruthObject
from pipeline.io import fs
from pipeline.io.decode import decode_image, decode_label_png
from pipeline.io.read import Sample, SampleError, iter_samples
from pipeline.io.shards import expand_shards
from pipeline.vocab import Vocabulary, load_vocabulary

logger = logging.getLogger(__name__)

VOC_LABELS_DIR = "SegmentationClass"
VOC_IMAGES_DIR = "JPEGImages"
VOC_OBJECTS_DIR = "SegmentationObject"
VOC_CLASS_FILES = ("vocabulary.json", "classes.txt", "labels.txt")


@dataclass(frozen=True, slots=True)
class TruthSample:
    shard: str  # output shard name (schema.shard_name) the sample belongs to; "" in a folder
    key: str
    truth: np.ndarray  # (H, W) uint8/uint16 class ids; ids >= K (e.g. 255) are void and not scored
    image: np.ndarray | None  # (H, W, 3) uint8 RGB, None when images were not asked for
    objects: tuple[TruthObject, ...] = ()


def read_label_map(data: bytes, where: str) -> np.ndarray:
    """A class-id PNG (palette, grey 8-bit or 16-bit) as an (H, W) uint8/uint16 array; errors name `where`."""
    try:
        return decode_label_png(data)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


@dataclass(frozen=True, slots=True)
class TruthSet:
    """A benchmark: where it lives, what kind it is, and its class names. Iterate with `samples()`."""

    url: str
    kind: Literal["shards", "voc"]
    vocab: Vocabulary
    shards: tuple[str, ...] = ()  # shard URLs (kind "shards")
    keys: tuple[str, ...] = ()  # sample keys (kind "voc")
    storage_options: dict | None = None
    # Samples that could not be read, one line each naming the sample ("URL:KEY: reason"), in the order
    # met; they are left out of every score and the others are still scored (filled in while iterating).
    unreadable: dict[str, None] = field(default_factory=dict)

    def samples(self, images: bool = True) -> Iterator[TruthSample]:
        """Stream the samples in a fixed order (shard by shard); decode images only when asked."""
        if self.kind == "shards":
            yield from _shard_samples(self)
        else:
            yield from _voc_samples(self, images)


def open_truth(
    url: str | list[str], vocab_file: str = "", split: str = "", storage_options: dict | None = None
) -> TruthSet:
    """Find out what `url` holds (VOC-style folder, or shards: list, pattern, glob, folder) and open it."""
    first = url[0] if isinstance(url, list) and len(url) == 1 else url
    if isinstance(first, str) and fs.exists(fs.join(first, VOC_LABELS_DIR), storage_options):
        return _open_voc(first, vocab_file, split, storage_options)
    if split:
        raise ValueError(f"split={split!r} applies to VOC-style folders only; {url} is a set of shards")
    shards = expand_shards(url, storage_options)
    if not shards:
        raise FileNotFoundError(f"no truth shards or VOC-style folder at {url}")
    near = shards[0].rsplit("/", 1)[0] if "/" in shards[0] else "."
    vocab_url = vocab_file or fs.join(near, "vocabulary.json")
    if not fs.exists(vocab_url, storage_options):
        raise FileNotFoundError(f"no vocabulary for the truth shards: {vocab_url} is missing (give --vocab FILE)")
    vocab = load_vocabulary(vocab_url, storage_options)
    name = url if isinstance(url, str) else " ".join(url)
    return TruthSet(name, "shards", vocab, shards=tuple(shards), storage_options=storage_options)


def _shard_samples(truth: TruthSet) -> Iterator[TruthSample]:
    missing = 0
    for url in truth.shards:
        shard = schema.shard_name(url)
        for sample in iter_samples(url, truth.storage_options):
            try:
                found = _shard_sample(truth, url, shard, sample)
            except ValueError as exc:
                _unreadable(truth, str(exc))
                continue
            if found is None:
                missing += 1
                continue
            yield found
    if missing:
        logger.warning("%s in %s without %s, not scored", counted(missing, "sample"), truth.url, schema.TRUTH_EXT)


def _shard_sample(truth: TruthSet, url: str, shard: str, sample: Sample | SampleError) -> TruthSample | None:
    """The truth sample of a read sample; None when it has no `seg.png`; ValueError naming it when unreadable."""
    if isinstance(sample, SampleError):
        raise ValueError(f"{url}:{sample.key}: {sample.reason}" if sample.key else f"{url}: {sample.reason}")
    data = sample.extra.get(schema.TRUTH_EXT)
    if data is None:
        return None
    labels = read_label_map(data, f"{url}:{sample.key}.{schema.TRUTH_EXT}")
    if labels.shape != sample.image.shape[:2]:
        raise ValueError(f"{url}:{sample.key}: seg.png {labels.shape} and image {sample.image.shape[:2]} differ")
    try:
        objects = json_objects(sample.json, labels, truth.vocab)
    except ValueError as exc:
        raise ValueError(f"{url}:{sample.key}.json: {exc}") from None
    return TruthSample(shard, sample.key, labels, sample.image, objects)


def _unreadable(truth: TruthSet, problem: str) -> None:
    if problem not in truth.unreadable:  # samples() may run more than once (calibration, then scoring)
        logger.warning("truth sample not scored: %s", problem)
        truth.unreadable[problem] = None


def json_objects(meta: dict | None, labels: np.ndarray, vocab: Vocabulary) -> tuple[TruthObject, ...]:
    """Objects of a sample's json (`{"objects": [{"class": id or name, "box": [x0, y0, x1, y1]}]}`).

    The area is the number of the object's class pixels visible inside its box, measured on the truth
    map, so occlusion and the source of the boxes never change which objects count as small.
    """
    if not meta or not meta.get("objects"):
        return ()
    ids = {name.lower(): i for i, name in enumerate(vocab.display_names)}
    out = []
    for obj in meta["objects"]:
        cls = obj.get("class_id", obj.get("class"))
        class_id = ids.get(cls.lower()) if isinstance(cls, str) else cls
        if not isinstance(class_id, int) or "box" not in obj:
            raise ValueError(f"object {obj!r}: needs a known class (id or name) and a box [x0, y0, x1, y1]")
        x0, y0, x1, y1 = (int(round(v)) for v in obj["box"])
        area = int(np.count_nonzero(labels[max(0, y0) : y1, max(0, x0) : x1] == class_id))
        out.append(TruthObject(class_id, (x0, y0, x1, y1), area))
    return tuple(out)


def _open_voc(root: str, vocab_file: str, split: str, storage_options: dict | None) -> TruthSet:
    if vocab_file:
        vocab = load_vocabulary(vocab_file, storage_options)
    else:
        found = [f for f in VOC_CLASS_FILES if fs.exists(fs.join(root, f), storage_options)]
        if not found:
            raise FileNotFoundError(f"{root}: no class list ({', '.join(VOC_CLASS_FILES)}); give --vocab FILE")
        vocab = load_vocabulary(fs.join(root, found[0]), storage_options)
    if split:
        text = fs.read_text(fs.join(root, "ImageSets", "Segmentation", f"{split}.txt"), storage_options)
        keys = [line.split()[0] for line in text.splitlines() if line.strip()]
    else:
        filesystem, path = fs.url_to_fs(fs.join(root, VOC_LABELS_DIR), storage_options)
        keys = sorted(
            p.rsplit("/", 1)[-1][: -len(".png")] for p in filesystem.ls(path, detail=False) if p.endswith(".png")
        )
    if not keys:
        raise FileNotFoundError(f"{root}: no label maps in {VOC_LABELS_DIR}/")
    return TruthSet(root, "voc", vocab, keys=tuple(keys), storage_options=storage_options)


def _voc_samples(truth: TruthSet, images: bool) -> Iterator[TruthSample]:
    root, so = truth.url, truth.storage_options
    for key in truth.keys:
        try:
            found = _voc_sample(root, key, images, so)
        except (ValueError, FileNotFoundError) as exc:
            _unreadable(truth, str(exc))
            continue
        yield found


def _voc_sample(root: str, key: str, images: bool, so: dict | None) -> TruthSample:
    label_url = fs.join(root, VOC_LABELS_DIR, f"{key}.png")
    labels = read_label_map(fs.read_bytes(label_url, so), label_url)
    image = _voc_image(root, key, so) if images else None
    if image is not None and image.shape[:2] != labels.shape:
        raise ValueError(f"{label_url}: size {labels.shape} differs from its image {image.shape[:2]}")
    objects_url = fs.join(root, VOC_OBJECTS_DIR, f"{key}.png")
    objects = ()
    if fs.exists(objects_url, so):
        objects = instance_objects(read_label_map(fs.read_bytes(objects_url, so), objects_url), labels)
    return TruthSample("", key, labels, image, objects)


def _voc_image(root: str, key: str, storage_options: dict | None) -> np.ndarray:
    for ext in schema.IMAGE_EXTS:
        url = fs.join(root, VOC_IMAGES_DIR, f"{key}.{ext}")
        if fs.exists(url, storage_options):
            try:
                return decode_image(fs.read_bytes(url, storage_options), where=url)
            except ValueError as exc:
                raise ValueError(f"{url}: {exc}") from None
    raise FileNotFoundError(f"{root}: no image for {key} in {VOC_IMAGES_DIR}/")


def instance_objects(instances: np.ndarray, labels: np.ndarray) -> tuple[TruthObject, ...]:
    """Objects of an instance map (VOC SegmentationObject: 0 = none, 255 = void): class by majority vote."""
    out = []
    for inst in np.unique(instances):
        if inst in (0, 255):
            continue
        ys, xs = np.nonzero(instances == inst)
        classes = labels[ys, xs]
        class_id = int(np.bincount(classes).argmax())
        out.append(TruthObject(class_id, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1), len(ys)))
    return tuple(out)
