"""Training batches from pseudo-label shards: streamed, joined by key, shuffled, augmented.

Each worker (rank r of W distributed workers, and each of its loader processes) reads its own
disjoint share of the committed label shards (`runs.Unit`), one shard at a time: the label tar and the
input shard it labels are streamed side by side and joined by key (both are in input order), so memory
holds a sample, never a shard. Samples go through a shuffle buffer of `data.shuffle_buffer` samples,
then into batches. A pass over the worker's shards is followed by another, in a new order, for as long
as training asks.

With `data.combine: agree` a unit joins the same input shard's label tars of several runs, streamed
side by side too; a sample's pixels that the runs label differently get the ignore value.

Skipped, and counted over the first pass: input samples that failed to decode (`failed`), samples
without a label (`missing_label`: their row failed in the labeling run, or in one of the runs that
must agree), labels whose size differs from the image (`size_mismatch`), and label shards whose
checksum does not match their commit marker (`bad_checksum`) or that are missing although their commit
marker exists (`missing_file`), each the whole unit, never read.

Augmentation (`torchvision.transforms.v2`, the image and its labels and confidences together, the
last two as `tv_tensors.Mask` so they are resized with nearest neighbours): random scale of the short
side, random crop (padded with the ignore value), horizontal flip, brightness/contrast/saturation jitter
(image only).
Every random draw comes from (seed, worker, batch index), so the stream is the same on every run and
a resumed run skips the batches it has already trained on (`start`) and continues identically.
"""

from __future__ import annotations

import logging
import random
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from pipeline import schema
from pipeline.io import fs
from pipeline.io.decode import decode_label_png
from pipeline.io.read import Sample, SampleError, iter_samples
from pipeline.train.config import DataCfg
from pipeline.train.runs import LabelRun, Unit, verify

logger = logging.getLogger(__name__)


def augmentation(cfg: DataCfg, crop: int, ignore: int) -> v2.Compose:
    """The joint image/label/confidence augmentation (module docstring) to `crop` x `crop` pixels."""
    short = cfg.short_side or crop
    low, high = round(short * cfg.scale[0]), round(short * cfg.scale[1])
    ops: list[v2.Transform] = [
        v2.RandomResize(max(1, low), max(low, high) + 1, antialias=True),
        v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore}),
    ]
    if cfg.flip:
        ops.append(v2.RandomHorizontalFlip())
    if cfg.jitter > 0:
        # No hue jitter: torchvision's hue shift (an HSV round trip) was measured at about 60 ms per 64 px
        # image on a CPU core, more than the rest of the pipeline and the model's step together.
        ops.append(v2.ColorJitter(brightness=cfg.jitter, contrast=cfg.jitter, saturation=cfg.jitter))
    return v2.Compose(ops)


class LabelStream(torch.utils.data.IterableDataset):
    """Endless stream of batches `{"image": (B, 3, S, S) uint8, "labels": (B, S, S) int64, "conf": (B, S, S)
    uint8, "skipped": {reason: n}, "used": n}` for one distributed worker; `start` batches are skipped.

    `skipped`/`used` are the producing loader process's first-pass counts so far (for the run summary).
    """

    def __init__(
        self,
        runs: Sequence[LabelRun],
        units: Sequence[Unit],
        cfg: DataCfg,
        batch_size: int,
        crop: int,
        ignore: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        start: int = 0,
        storage_options: dict | None = None,
    ) -> None:
        self.runs, self.units = runs, units[rank::world]
        if not self.units:
            raise ValueError(f"worker {rank} of {world} has no label shard: {len(units)} in all")
        self.cfg, self.batch_size, self.crop, self.ignore = cfg, batch_size, crop, ignore
        self.seed, self.rank, self.start, self.storage_options = seed, rank, start, storage_options
        self.augment = augmentation(cfg, crop, ignore)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        part, parts = (info.id, info.num_workers) if info else (0, 1)
        units = self.units[part::parts]
        if not units:
            return
        stream = _Stream(self, units, (self.seed, self.rank, part))
        index = part  # batches of all loader processes interleave round-robin (DataLoader's order)
        while True:
            samples = stream.take(self.batch_size)
            if index >= self.start:
                yield self._batch(samples, index) | {"skipped": dict(stream.skipped), "used": stream.used}
            index += parts

    def _batch(self, samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]], index: int) -> dict:
        images, labels, confs = [], [], []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.rank, index)) & 0x7FFFFFFF)
            for image, label, conf in samples:
                img = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
                lab = tv_tensors.Mask(torch.from_numpy(label.astype(np.int64)))
                cnf = tv_tensors.Mask(torch.from_numpy(conf))
                img, lab, cnf = self.augment(img, lab, cnf)
                images.append(img.as_subclass(torch.Tensor))
                labels.append(lab.as_subclass(torch.Tensor))
                confs.append(cnf.as_subclass(torch.Tensor))
        return {"image": torch.stack(images), "labels": torch.stack(labels), "conf": torch.stack(confs)}


class _Stream:
    """Shuffled samples of some units, pass after pass, with the counts of the first pass."""

    def __init__(self, owner: LabelStream, units: Sequence[Unit], key: tuple[int, ...]) -> None:
        self.owner, self.units, self.key = owner, units, key
        self.rng = random.Random(hash(key))
        self.buffer: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.skipped: Counter[str] = Counter()
        self.used = 0
        self.epoch = 0
        self.bad: set[Unit] = set()
        self.samples = self._passes()

    def take(self, n: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        size = max(n, self.owner.cfg.shuffle_buffer)
        out = []
        while len(out) < n:
            while len(self.buffer) < size:
                self.buffer.append(next(self.samples))
            out.append(self.buffer.pop(self.rng.randrange(len(self.buffer))))
        return out

    def _passes(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        while True:
            order = list(self.units)
            random.Random(hash((*self.key, self.epoch))).shuffle(order)
            yielded = 0
            for unit in order:
                for sample in self._unit(unit):
                    yielded += 1
                    yield sample
            if not yielded:
                raise ValueError(f"no usable sample in {len(order)} label shards (skipped: {dict(self.skipped)})")
            self.epoch += 1

    def _count(self, reason: str) -> None:
        if self.epoch == 0:
            self.skipped[reason] += 1

    def _unit(self, unit: Unit) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        so = self.owner.storage_options
        if unit in self.bad:
            return
        if self.epoch == 0:
            for labels, expected in zip(unit.labels, unit.digests, strict=True):
                problem = verify(labels, expected, so)
                if problem:
                    logger.warning("%s; shard skipped", problem)
                    self.bad.add(unit)
                    self.skipped["bad_checksum" if fs.exists(labels, so) else "missing_file"] += 1
                    return
        streams = [_label_members(labels, so) for labels in unit.labels]
        pending = [next(stream, None) for stream in streams]
        for sample in iter_samples(unit.image, so):
            if isinstance(sample, SampleError):
                self._count("failed")
                continue
            # A run without this sample (its row failed there) has its next label further on.
            found = [p is not None and p[0] == sample.key for p in pending]
            members = [p[1] for p, hit in zip(pending, found, strict=True) if hit]
            pending = [next(s, None) if hit else p for s, p, hit in zip(streams, pending, found, strict=True)]
            if not all(found):
                self._count("missing_label")
                continue
            pair = self._pair(sample, members)
            if pair is not None:
                if self.epoch == 0:
                    self.used += 1
                yield pair

    def _pair(self, sample: Sample, runs: list[dict[str, bytes]]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The image with its label and confidence maps; with several runs' members (`combine: agree`),
        pixels they label differently get the ignore value and the confidence is the lowest."""
        label = conf_map = None
        for members in runs:
            if schema.LABEL_EXT not in members:
                self._count("missing_label")
                return None
            run_label = decode_label_png(members[schema.LABEL_EXT])
            conf = members.get(schema.CONF_EXT)
            run_conf = decode_label_png(conf) if conf is not None else np.full(run_label.shape, 255, np.uint8)
            if run_label.shape != sample.image.shape[:2] or run_conf.shape != run_label.shape:
                self._count("size_mismatch")
                return None
            if label is None:
                label, conf_map = run_label, run_conf.astype(np.uint8)
            else:
                label = np.where(label == run_label, label, self.owner.ignore).astype(label.dtype)
                conf_map = np.minimum(conf_map, run_conf.astype(np.uint8))
        return sample.image, label, conf_map


def _label_members(url: str, storage_options: dict | None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of a label tar, streamed, one sample's members at a time."""
    filesystem, path = fs.url_to_fs(url, storage_options)
    key, members = None, {}
    with filesystem.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            prefix = member.name[: len(member.name) - len(base)]
            stem, _, ext = base.partition(".")
            if prefix + stem != key:
                if key is not None:
                    yield key, members
                key, members = prefix + stem, {}
            members[ext] = tar.extractfile(member).read()
    if key is not None:
        yield key, members
