"""ShapeWorld: synthetic scenes with an exact class map, the project's own train and evaluation data.

A scene is a textured, noisy background with 1-3 objects, each one of 6 colours x 6 shapes (36 object
classes plus background = 37), at a random size, position and rotation; later objects occlude earlier
ones, but every object keeps at least half of its area visible. Class ids are
`1 + colour * 6 + shape`, 0 is background (`CLASSES` lists the names).

Every scene is a pure function of its seed tuple (the shards use `(seed, shard, index)`), so any
sample can be regenerated alone. The trainer and evaluator call `render_scene` / `render_single`
directly; `pipeline.data.shapeworld_shards` writes the same scenes as WebDataset shards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.data import _draw
from pipeline.data._draw import COLOURS, SHAPES

CLASSES: tuple[str, ...] = ("background", *(f"{c} {s}" for c in COLOURS for s in SHAPES))
BACKGROUND = 0
SMALL_AREA = 0.03  # "small" objects cover less than this fraction of the image

_LARGE_RADIUS = (0.10, 0.25)  # radius of the shape's enclosing circle, as a fraction of the image side
_SMALL_RADIUS = (0.045, 0.08)  # a circle of radius 0.08 covers 2% of the image; other shapes less
_MIN_RADIUS_PX = 2.0
_MIN_VISIBLE = 0.5  # each object keeps at least this fraction of its own area visible
_PLACE_TRIES = 30


def class_id(colour: str, shape: str) -> int:
    """Class id of e.g. ("red", "circle"); raises ValueError naming an unknown colour or shape."""
    if colour not in COLOURS or shape not in SHAPES:
        raise ValueError(f"unknown object {colour!r} {shape!r}; colours are {COLOURS}, shapes are {SHAPES}")
    return 1 + COLOURS.index(colour) * len(SHAPES) + SHAPES.index(shape)


def vocabulary_json() -> dict:
    """The `vocabulary.json` written beside ShapeWorld shards (pipeline.vocab reads it)."""
    return {"classes": list(CLASSES), "background": BACKGROUND}


def with_article(name: str) -> str:
    """The name with its article: "a red circle", "an orange star"."""
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def caption(names: Sequence[str]) -> str:
    """The scene caption, e.g. "a red circle, an orange star and a blue ring on a background"."""
    parts = [with_article(n) for n in names]
    listed = parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"
    return f"{listed} on a background"


@dataclass(frozen=True, slots=True)
class SceneObject:
    class_id: int  # 1..36
    name: str  # "red circle"
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the visible pixels, end-exclusive
    area: int  # visible pixels in the class map

    def to_json(self) -> dict:
        return {"class_id": self.class_id, "name": self.name, "box": list(self.box), "area": self.area}


@dataclass(frozen=True, slots=True)
class Scene:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    seg: np.ndarray  # (H, W) uint8 class ids, 0 = background; the top-most object wins each pixel
    objects: tuple[SceneObject, ...]  # bottom to top
    caption: str


def render_scene(seed: Sequence[int], size: int = 96, small_objects: bool = False, ss: int = 4) -> Scene:
    """A scene of 1-3 objects with distinct classes.

    Args:
        seed: seed tuple of `np.random.default_rng`, e.g. (seed, shard, index).
        size: image side in pixels.
        small_objects: at least one object (and each other one with probability 1/2) covers less
            than SMALL_AREA of the image; small objects are drawn on top of large ones.
        ss: sub-samples per pixel side for anti-aliasing and the majority-vote class map.
    """
    rng = np.random.default_rng(list(seed))
    n = int(rng.integers(1, 4))
    classes = rng.choice(len(CLASSES) - 1, size=n, replace=False) + 1
    small = [small_objects and (i == 0 or rng.uniform() < 0.5) for i in range(n)]
    order = sorted(range(n), key=lambda i: small[i])  # large first, then small on top
    return _compose(rng, size, [(int(classes[i]), small[i]) for i in order], ss)


def render_single(
    seed: Sequence[int], size: int = 96, class_id: int | None = None, small: bool = False, ss: int = 4
) -> Scene:
    """A scene with exactly one object (zero-shot classification): `class_id` or a random class."""
    rng = np.random.default_rng(list(seed))
    cls = int(rng.integers(1, len(CLASSES))) if class_id is None else class_id
    if not 1 <= cls < len(CLASSES):
        raise ValueError(f"class_id {cls} is not an object class (1..{len(CLASSES) - 1})")
    return _compose(rng, size, [(cls, small)], ss)


def render_background(seed: Sequence[int], size: int = 96, ss: int = 4) -> Scene:
    """A scene with no object (caption "a background"): what the background class looks like alone."""
    return _compose(np.random.default_rng(list(seed)), size, [], ss)


def _compose(rng: np.random.Generator, size: int, specs: list[tuple[int, bool]], ss: int) -> Scene:
    if size < 16:
        raise ValueError(f"ShapeWorld image size must be at least 16 pixels, got {size}")
    labels = np.zeros((size * ss, size * ss), dtype=np.uint8)  # per sub-sample: 0 = background, j = object j
    placed: list[int] = []
    own_area: list[int] = []
    for cls, small in specs:
        found = _place(rng, labels, own_area, cls, small, size, ss)
        if found is not None:
            labels, area = found
            placed.append(cls)
            own_area.append(area)
    counts = np.stack([(labels == j).reshape(size, ss, size, ss).sum(axis=(1, 3)) for j in range(len(placed) + 1)])
    frac = counts.astype(np.float32) / (ss * ss)  # (1 + n, H, W) share of each owner in every pixel
    img = _draw.background(size, rng) * frac[0][..., None]
    for j, cls in enumerate(placed, start=1):
        colour = _draw.object_colour((cls - 1) // len(SHAPES), rng)
        img += colour * _draw.shading(size, rng) * frac[j][..., None]
    img += rng.normal(0.0, rng.uniform(0.01, 0.035), img.shape).astype(np.float32)
    image = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    owner = counts.argmax(axis=0)  # majority of sub-samples; ties go to the lower layer
    seg = np.asarray([BACKGROUND, *placed], dtype=np.uint8)[owner]
    objects = []
    for j, cls in enumerate(placed, start=1):
        ys, xs = np.nonzero(owner == j)
        if len(xs):
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            objects.append(SceneObject(cls, CLASSES[cls], box, len(xs)))
    return Scene(image, seg, tuple(objects), caption([o.name for o in objects]) if objects else "a background")


def _place(
    rng: np.random.Generator, labels: np.ndarray, own_area: list[int], cls: int, small: bool, size: int, ss: int
) -> tuple[np.ndarray, int] | None:
    """Try random poses until the new object leaves every object at least _MIN_VISIBLE visible.

    Returns the updated sub-sample label map and the object's own area (sub-samples), or None.
    """
    index = len(own_area) + 1
    lo, hi = _SMALL_RADIUS if small else _LARGE_RADIUS
    for _ in range(_PLACE_TRIES):
        radius = max(rng.uniform(lo, hi) * size, _MIN_RADIUS_PX)
        cx, cy = rng.uniform(radius, size - radius, 2)
        angle = rng.uniform(0, 2 * math.pi)
        y0, x0, mask = _draw.rasterise((cls - 1) % len(SHAPES), cx, cy, radius, angle, size, ss)
        area = int(mask.sum())
        if area < 2 * ss * ss:
            continue
        trial = labels.copy()
        trial[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]][mask] = index
        visible = np.bincount(trial.ravel(), minlength=index + 1)[1:]
        if all(visible[j] >= _MIN_VISIBLE * a for j, a in enumerate([*own_area, area])):
            return trial, area
    return None
