"""Training batches for `clipdense pretrain-shapes`: ShapeWorld images and their captions, from seeds.

Rendering a scene costs a few milliseconds of numpy, as much as a training step spends on it, so the
scenes are rendered once into a pool (in parallel) and each step draws from it, with a random flip or
quarter turn (ShapeWorld classes do not change under either). A batch mixes:
- multi-object scenes (a quarter of them with small objects), caption "a photo of a red circle and a
  blue star." with the objects in random order, in groups of scenes with the same colours: colour
  alone names most captions of a random batch, so without these hard negatives the contrastive loss
  barely asks for shape, which then stays at chance for the first hundred thousand images;
- single-object images of distinct classes, caption "a photo of a red circle.", exactly the zero-shot
  prompt, so each batch also holds a 36-way classification among its captions;
- a few empty backgrounds, caption "a photo of a background.", which gives the background class of
  the dense labels a meaning of its own.
Every draw is a pure function of (seed, step), so a run repeats exactly.

Seed streams: the pools use `(seed, stream, i)` with the streams below; evaluation uses other
streams (`pretrain_shapes_eval`), so train and evaluation scenes never coincide.
"""

from __future__ import annotations

import logging
import multiprocessing
from dataclasses import dataclass

import numpy as np
import open_clip
import torch

from pipeline.data.shapeworld import CLASSES, SHAPES, render_background, render_scene, render_single

logger = logging.getLogger(__name__)

TEMPLATE = "a photo of a {}."  # training captions and zero-shot prompts share it
SCENE_STREAM, SINGLE_STREAM, BACKGROUND_STREAM, BATCH_STREAM = 10, 11, 12, 13
N_OBJECT_CLASSES = len(CLASSES) - 1
MEAN = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)


def object_caption(names: list[str]) -> str:
    """ "a photo of a red circle, a blue star and a green ring." (article "a" throughout, like the template)."""
    listed = names[0] if len(names) == 1 else f"{', a '.join(names[:-1])} and a {names[-1]}"
    return TEMPLATE.format(listed)


@dataclass(frozen=True)
class Pool:
    images: np.ndarray  # (N, S, S, 3) uint8 RGB
    classes: tuple[tuple[int, ...], ...]  # object class ids per image, bottom to top; () = background only


def _render(job: tuple[str, int, int, int, int]) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    kind, seed, start, stop, size = job
    images, classes = [], []
    for i in range(start, stop):
        if kind == "scene":
            scene = render_scene((seed, SCENE_STREAM, i), size, small_objects=i % 4 == 3)
        elif kind == "single":
            scene = render_single((seed, SINGLE_STREAM, i), size, class_id=1 + i % N_OBJECT_CLASSES)
        else:
            scene = render_background((seed, BACKGROUND_STREAM, i), size)
        images.append(scene.image)
        classes.append(tuple(o.class_id for o in scene.objects))
    return np.stack(images), classes


def render_pool(kind: str, n: int, size: int, seed: int, workers: int, chunk: int = 500) -> Pool:
    """Images `0..n-1` of one kind ("scene", "single" or "background"), rendered by `workers` processes."""
    jobs = [(kind, seed, start, min(start + chunk, n), size) for start in range(0, n, chunk)]
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_render, jobs)
    else:
        parts = [_render(job) for job in jobs]
    return Pool(np.concatenate([p[0] for p in parts]), tuple(c for p in parts for c in p[1]))


class BatchSampler:
    """Draws the batch of step `step` from the pools; see the module docstring for its make-up."""

    def __init__(self, scenes: Pool, singles: Pool, backgrounds: Pool, batch_size: int, seed: int, group: int = 8):
        self.scenes, self.singles, self.backgrounds = scenes, singles, backgrounds
        self.batch_size, self.seed, self.group = batch_size, seed, group
        self.n_single = min(batch_size // 7, N_OBJECT_CLASSES)
        self.n_background = max(1, batch_size // 128)
        if batch_size - self.n_single - self.n_background < group:
            raise ValueError(f"batch size {batch_size} is too small for groups of {group}; use at least 32")
        self._single_index = _index_by(singles.classes, lambda classes: classes[0])
        self._by_colours = _index_by(scenes.classes, lambda classes: tuple(sorted(_colour(c) for c in classes)))

    def __call__(self, step: int) -> tuple[np.ndarray, list[str]]:
        """(B, S, S, 3) uint8 images and their B captions."""
        rng = np.random.default_rng([self.seed, BATCH_STREAM, step])
        single_classes = rng.choice(N_OBJECT_CLASSES, self.n_single, replace=False) + 1
        singles = [int(rng.choice(self._single_index[c])) for c in single_classes]
        backgrounds = rng.integers(0, len(self.backgrounds.images), self.n_background)
        scenes = self._scene_groups(rng, self.batch_size - self.n_single - self.n_background)
        images = np.concatenate(
            [self.scenes.images[scenes], self.singles.images[singles], self.backgrounds.images[backgrounds]]
        )
        captions = [self._caption(self.scenes.classes[i], rng) for i in scenes]
        captions += [self._caption(self.singles.classes[i], rng) for i in singles]
        captions += [TEMPLATE.format("background")] * self.n_background
        return _dihedral(images, rng.integers(0, 8, len(images))), captions

    def _scene_groups(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """`n` scene indices in groups of `group` scenes with the same colours (hard negatives: within a
        group only the shapes tell the captions apart); the remainder is drawn freely."""
        picks = []
        for _ in range(n // self.group):
            anchor = int(rng.integers(0, len(self.scenes.images)))
            same = self._by_colours[tuple(sorted(_colour(c) for c in self.scenes.classes[anchor]))]
            picks.append(rng.choice(same, self.group, replace=len(same) < self.group))
        picks.append(rng.integers(0, len(self.scenes.images), n % self.group))
        return np.concatenate(picks)

    @staticmethod
    def _caption(classes: tuple[int, ...], rng: np.random.Generator) -> str:
        order = rng.permutation(len(classes))
        return object_caption([CLASSES[classes[i]] for i in order])


def to_input(images: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, S, S, 3) uint8 RGB -> (B, 3, S, S) normalised with CLIP's mean and std."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return ((x - MEAN) / STD).to(dtype)


def _colour(class_id: int) -> int:
    return (class_id - 1) // len(SHAPES)


def _index_by(classes: tuple[tuple[int, ...], ...], key) -> dict:
    """Pool indices grouped by `key(classes of the image)`, as int arrays."""
    groups: dict = {}
    for i, c in enumerate(classes):
        groups.setdefault(key(c), []).append(i)
    return {k: np.asarray(v) for k, v in groups.items()}


def _dihedral(images: np.ndarray, transforms: np.ndarray) -> np.ndarray:
    """Apply transform t (bit 0: horizontal flip, bits 1-2: quarter turns) to each (S, S, 3) image."""
    out = images.copy()
    for t in range(1, 8):
        idx = np.nonzero(transforms == t)[0]
        if len(idx):
            part = images[idx][:, :, ::-1] if t & 1 else images[idx]
            out[idx] = np.rot90(part, k=t >> 1, axes=(1, 2))
    return out
