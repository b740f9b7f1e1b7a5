"""Region proposals for zoom-in: which parts of an image deserve a second, closer look.

Three sources, in order of priority when the per-image budget (`zoom.max_regions`) is short:
1. boxes supplied with the sample (`json["boxes"]`, [x0, y0, x1, y1] in pixels), clipped to the image;
   malformed, empty or outside boxes are skipped and counted by reason, never fatal;
2. connected components of the first-pass label map that are small (< `zoom.min_area` of the image)
   or uncertain (mean confidence < `zoom.min_confidence`); confident background is never proposed,
   but background pixels below `zoom.min_confidence` form components of their own (where a missed
   small object hides), and the least confident components come first;
3. optionally a fixed grid of `zoom.grid` x `zoom.grid` tiles.
Boxes and components grow by `zoom.margin` of their size on every side (CLIP needs context) and are
made square (crops are resized to the model's square input) with a side of at least 1/`MAX_ZOOM` of
the image's short side. Proposals overlapping more than `zoom.merge_iou` are merged into their union.
All boxes are (x0, y0, x1, y1) ints, end-exclusive, in original image pixels.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import ZoomCfg
from pipeline.obs import CappedCounter

logger = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, end-exclusive

MAX_ZOOM = 4.0  # a crop's side is at least the short side / this: more zoom upsamples pixels that are not there
MIN_ZOOM = 1.5  # components whose crop would be zoomed less than this are not worth a second pass
_UNCERTAIN = -1  # label given to background pixels below zoom.min_confidence before finding components
_CANDIDATES_PER_REGION = 8  # ranked candidates kept per budgeted region before merging


@dataclass(frozen=True)
class Component:
    label: int  # the class id shared by its pixels (or the marker of uncertain background)
    box: Box  # bounding box in label-map pixels, end-exclusive
    area: int  # pixels
    mean_confidence: float


@dataclass(frozen=True)
class FirstPass:
    """The first pass's label map cut into components, read by both `propose` and `protected` (worked out
    once per image). Unsure background pixels (below `zoom.min_confidence`) form components of their own."""

    components: list[Component]
    pixel_component: np.ndarray  # (h, w) int64 index into `components` of every pixel
    background: int | None

    @property
    def shape(self) -> tuple[int, int]:
        return self.pixel_component.shape

    def is_weak(self, comp: Component, cfg: ZoomCfg) -> bool:
        """Small or unsure, and not confident background: worth a crop, and never protected."""
        small = comp.area < cfg.min_area * self.pixel_component.size
        return comp.label != self.background and (small or comp.mean_confidence < cfg.min_confidence)


def first_pass(labels: np.ndarray, confidence: np.ndarray, cfg: ZoomCfg, background: int | None) -> FirstPass:
    """`labels` (h, w) int class ids and `confidence` (h, w) float in [0, 1] of the first pass, as components."""
    marked = labels.astype(np.int64)
    if background is not None:
        marked[(marked == background) & (confidence < cfg.min_confidence)] = _UNCERTAIN
    return FirstPass(*label_components(marked, confidence), background)


def connected_components(labels: np.ndarray, confidence: np.ndarray | None = None) -> list[Component]:
    """4-connected components of equal labels in an (h, w) integer map; `confidence` (h, w) float in [0, 1]."""
    return label_components(labels, confidence)[0]


def label_components(labels: np.ndarray, confidence: np.ndarray | None = None) -> tuple[list[Component], np.ndarray]:
    """The components of `connected_components` and an (h, w) int64 map of each pixel's component index.

    Works on horizontal runs: runs of equal value touching in consecutive rows are joined with a
    union-find, so the Python loop is over runs, not pixels.
    """
    if labels.ndim != 2:
        raise ValueError(f"a label map must be (h, w), got shape {labels.shape}")
    h, w = labels.shape
    if labels.size == 0:
        return [], np.zeros(labels.shape, np.int64)
    starts_mask = np.ones((h, w), dtype=bool)
    starts_mask[:, 1:] = labels[:, 1:] != labels[:, :-1]
    run_id = np.cumsum(starts_mask.ravel()).reshape(h, w) - 1  # (h, w) run index of every pixel
    rows, starts = np.nonzero(starts_mask)
    last_in_row = np.append(rows[1:] != rows[:-1], True)
    ends = np.where(last_in_row, w, np.append(starts[1:], 0))
    same = labels[1:] == labels[:-1]  # vertical neighbours with equal labels join their runs
    pairs = np.unique(np.stack([run_id[1:][same], run_id[:-1][same]], axis=1), axis=0)
    root = _union(len(rows), pairs)
    ids, comp = np.unique(root, return_inverse=True)
    lengths = ends - starts
    area = np.bincount(comp, weights=lengths).astype(np.int64)
    if confidence is None:
        conf_sum = np.zeros(len(ids))
    else:
        cum = np.concatenate([np.zeros((h, 1)), np.cumsum(confidence, axis=1, dtype=np.float64)], axis=1)
        conf_sum = np.bincount(comp, weights=cum[rows, ends] - cum[rows, starts], minlength=len(ids))
    box = np.stack([np.full(len(ids), w), np.full(len(ids), h), np.zeros(len(ids), int), np.zeros(len(ids), int)])
    np.minimum.at(box[0], comp, starts)
    np.minimum.at(box[1], comp, rows)
    np.maximum.at(box[2], comp, ends)
    np.maximum.at(box[3], comp, rows + 1)
    values = labels[rows[ids], starts[ids]]
    components = [
        Component(int(values[i]), tuple(int(v) for v in box[:, i]), int(area[i]), float(conf_sum[i] / area[i]))
        for i in range(len(ids))
    ]
    return components, comp[run_id]


def _union(n: int, pairs: np.ndarray) -> np.ndarray:
    """Root of each of n items after joining `pairs` (m, 2): the smallest index of its set."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs.tolist():
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) for i in range(n)], dtype=np.int64)


def sample_boxes(raw: Any, size: tuple[int, int], skipped: CappedCounter) -> list[tuple[float, float, float, float]]:
    """The usable boxes of a sample's `json["boxes"]` in an image of `size` (H, W), clipped to it.

    Anything unusable is skipped and counted in `skipped` under its reason."""
    if raw is None:
        return []
    if not isinstance(raw, (list, tuple)):
        _skip(skipped, "boxes is not a list of [x0, y0, x1, y1]")
        return []
    height, width = size
    out = []
    for item in raw:
        if (
            not isinstance(item, (list, tuple))
            or len(item) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in item)
        ):
            _skip(skipped, "box is not 4 finite numbers [x0, y0, x1, y1]")
            continue
        x0, y0, x1, y1 = (float(v) for v in item)
        if x1 <= x0 or y1 <= y0:
            _skip(skipped, "box of zero size")
            continue
        clipped = (max(0.0, x0), max(0.0, y0), min(float(width), x1), min(float(height), y1))
        if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
            _skip(skipped, "box outside the image")
            continue
        if clipped != (x0, y0, x1, y1):
            skipped.add("box clipped to the image (kept)")
        out.append(clipped)
    return out


def _skip(skipped: CappedCounter, reason: str) -> None:
    if reason not in skipped.counts:
        logger.warning("zoom: %s (counted, further ones are not logged)", reason)
    skipped.add(reason)


def propose(first: FirstPass, size: tuple[int, int], raw_boxes: Any, cfg: ZoomCfg, skipped: CappedCounter) -> list[Box]:
    """Regions to re-infer for one image, best first, at most `cfg.max_regions` (see the module docstring).

    `first` is the first pass at any resolution (h, w); `size` is the original image's (H, W); the
    result is in its pixels."""
    height, width = size
    short = min(height, width)
    ranked: list[tuple[float, Box]] = []  # (priority, box); higher priority is kept first
    for box in sample_boxes(raw_boxes, size, skipped) if cfg.use_boxes else []:
        ranked.append((3.0, _fit(_grow(box, cfg.margin), size)))
    candidates = []
    sy, sx = height / first.shape[0], width / first.shape[1]  # label-map pixels to image pixels
    for comp in (c for c in first.components if first.is_weak(c, cfg)):
        x0, y0, x1, y1 = comp.box
        box = _fit(_grow((x0 * sx, y0 * sy, x1 * sx, y1 * sy), cfg.margin), size)
        if max(box[2] - box[0], box[3] - box[1]) * MIN_ZOOM > short:
            skipped.add("component too large to zoom")
            continue
        candidates.append((2.0 - comp.mean_confidence, box))
    candidates.sort(key=lambda c: -c[0])
    ranked += candidates[: _CANDIDATES_PER_REGION * cfg.max_regions]
    ranked += [(0.0, tile) for tile in _tiles(size, cfg.grid)]
    merged = merge_regions(ranked, cfg.merge_iou, size)
    merged.sort(key=lambda c: -c[0])
    if len(merged) > cfg.max_regions:
        skipped.add("over the zoom.max_regions budget", len(merged) - cfg.max_regions)
    return [box for _, box in merged[: cfg.max_regions]]


def protected(first: FirstPass, cfg: ZoomCfg) -> np.ndarray:
    """(h, w) bool: pixels of the first pass's strong objects (components of a class other than background,
    at least `zoom.min_area` of the image and `zoom.min_confidence` sure). With `zoom.protect` crops
    leave them alone: the first pass sees such an object whole, while a crop cuts through it and,
    seeing a fragment, names it worse (measured on ShapeWorld, `bench/zoom_quality.py`)."""
    if not cfg.protect or not first.components:
        return np.zeros(first.shape, bool)
    strong = np.array(
        [c.label not in (first.background, _UNCERTAIN) and not first.is_weak(c, cfg) for c in first.components]
    )
    return strong[first.pixel_component]


def _grow(box: tuple[float, float, float, float], margin: float) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = box
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    return x0 - dx, y0 - dy, x1 + dx, y1 + dy


def _fit(box: tuple[float, float, float, float], size: tuple[int, int]) -> Box:
    """The box made square around its centre, at least short side / MAX_ZOOM wide and at most the short side
    (a crop is resized to a square, so a wider one would be squashed), shifted inside the image."""
    height, width = size
    side = min(max(box[2] - box[0], box[3] - box[1], min(height, width) / MAX_ZOOM), min(height, width))
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    (x0, x1), (y0, y1) = _span(cx, side, width), _span(cy, side, height)
    return x0, y0, x1, y1


def _span(centre: float, side: float, limit: int) -> tuple[int, int]:
    """An integer interval of length round(side) (at most `limit`, at least 1) centred on `centre`, within [0, limit]."""
    length = min(limit, max(1, round(side)))
    start = min(max(0, round(centre - length / 2)), limit - length)
    return start, start + length


def _tiles(size: tuple[int, int], grid: int) -> list[Box]:
    height, width = size
    edges_y = [round(height * i / grid) for i in range(grid + 1)] if grid > 0 else []
    edges_x = [round(width * i / grid) for i in range(grid + 1)] if grid > 0 else []
    return [
        (edges_x[j], edges_y[i], edges_x[j + 1], edges_y[i + 1])
        for i in range(grid)
        for j in range(grid)
        if edges_x[j + 1] > edges_x[j] and edges_y[i + 1] > edges_y[i]
    ]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (n, m) of boxes a (n, 4) and b (m, 4), [x0, y0, x1, y1] end-exclusive."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    ix = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = ix * iy
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def merge_regions(ranked: list[tuple[float, Box]], merge_iou: float, size: tuple[int, int]) -> list[tuple[float, Box]]:
    """Repeatedly merge the most overlapping pair (IoU > `merge_iou`) into their union, made square again;
    the merged region keeps the higher priority."""
    items = list(ranked)
    while len(items) > 1:
        boxes = np.array([box for _, box in items])
        iou = box_iou(boxes, boxes)
        np.fill_diagonal(iou, -1.0)
        i, j = np.unravel_index(int(np.argmax(iou)), iou.shape)
        if iou[i, j] <= merge_iou:
            break
        (pa, a), (pb, b) = items[i], items[j]
        union = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
        items = [item for k, item in enumerate(items) if k not in (i, j)] + [(max(pa, pb), _fit(union, size))]
    return items
