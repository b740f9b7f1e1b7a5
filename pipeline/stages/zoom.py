"""Zoom-in (ClsCLIP+-style): re-infer proposed regions at the model's full input size and merge them back.

CLIP's patch grid is coarse, so an object a few patches wide is lost or smeared in the first pass.
Between the dense pass and the writer, `ZoomLabeler` takes the first-pass score maps of a batch,
proposes regions per image (`pipeline.stages.proposals`), crops them from the ORIGINAL images, runs
the crops of the whole batch through the same head together (`DenseLabeler.score_crops`), and merges
the crop scores back into each image's scores before the label map is taken:

- `zoom.blend = "confidence"`: inside a region each source (first pass and every crop covering the
  pixel) is weighted by its own confidence, the max softmax probability at the labeler's logit scale;
- `zoom.blend = "replace"`: inside a region the crop scores replace the first pass (crops overlapping
  one another are averaged).

With `zoom.protect` (the default) neither mode touches the pixels of the first pass's large,
confident objects (`proposals.protected`): crops are for small and unsure things.

Merging happens on a canvas at the working resolution, enlarged towards the original size when the
image is larger than that (so a crop's extra detail survives), within `CANVAS_BYTES` of scores.
With `zoom.enabled = false` it passes the labeler's results through untouched.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import ZoomCfg
from pipeline.obs import CappedCounter
from pipeline.stages.infer import DenseLabeler, DenseResult
from pipeline.stages.proposals import Box, first_pass, propose, protected

logger = logging.getLogger(__name__)

CANVAS_BYTES = 128 << 20  # most float32 score bytes (K x h x w) one merge canvas may hold


@dataclass(frozen=True)
class ZoomResult:
    labels: np.ndarray  # (H, W) uint8 or uint16 class ids; schema.ignore_value(K) = ignore
    confidence: np.ndarray  # (H, W) float32 in [0, 1]: max class probability
    zoom_regions: list[list[int]]  # regions re-inferred, [x0, y0, x1, y1] end-exclusive in image pixels


class ZoomLabeler:
    """A `DenseLabeler` with zoom-in: the one object `segment`, `label` and `eval` call.

    `boxes` arguments are per image the raw `json["boxes"]` of its sample (or None). `skipped` counts
    the proposals dropped and the boxes skipped, by reason, until `take_skipped` hands them out.
    """

    def __init__(self, labeler: DenseLabeler, cfg: ZoomCfg) -> None:
        if cfg.max_regions < 0 or cfg.grid < 0 or cfg.min_area < 0 or cfg.margin < 0:
            raise ValueError(f"zoom.max_regions, zoom.grid, zoom.min_area and zoom.margin must be >= 0, got {cfg}")
        self.labeler = labeler
        self.cfg = cfg
        self.skipped = CappedCounter()

    def take_skipped(self) -> dict[str, int]:
        """The proposals dropped and boxes skipped since the last call, by reason; counting starts afresh."""
        skipped, self.skipped = self.skipped, CappedCounter()
        return skipped.to_dict()

    @property
    def ignore(self) -> int:
        return self.labeler.ignore

    def __call__(self, images: list[np.ndarray], boxes: list[Any] | None = None) -> list[ZoomResult | DenseResult]:
        """Labels of (H, W, 3) uint8 RGB images: `ZoomResult`s, or the labeler's own results when zoom is off."""
        if not self.cfg.enabled:
            return self.labeler(images)
        boxes = _per_image(boxes, len(images))
        out: list[ZoomResult | DenseResult] = []
        step = self.labeler.infer.batch_size
        for start in range(0, len(images), step):
            chunk = images[start : start + step]
            maps, regions = self.apply(chunk, self.labeler.score_maps(chunk), boxes[start : start + step])
            for image, score_map, boxes_applied in zip(chunk, maps, regions, strict=True):
                result = self.labeler.finalize(score_map, image.shape[:2])
                out.append(ZoomResult(result.labels, result.confidence, [list(b) for b in boxes_applied]))
        return out

    def score_maps(self, images: list[np.ndarray], boxes: list[Any] | None = None) -> list[torch.Tensor]:
        """Class scores (K, h, w) float32 per image, zoomed regions merged in (see `DenseLabeler.score_maps`)."""
        maps = self.labeler.score_maps(images)
        return self.apply(images, maps, boxes)[0] if self.cfg.enabled else maps

    def finalize(self, score_map: torch.Tensor, size: tuple[int, int]) -> DenseResult:
        return self.labeler.finalize(score_map, size)

    def apply(
        self, images: list[np.ndarray], score_maps: list[torch.Tensor], boxes: list[Any] | None = None
    ) -> tuple[list[torch.Tensor], list[list[Box]]]:
        """Zoom into first-pass `score_maps` (K, h, w) of `images` (H, W, 3) uint8; returns the merged maps and
        the regions applied per image. All crops of the call go to the model together."""
        if len(score_maps) != len(images):
            raise ValueError(f"zoom: {len(images)} images but {len(score_maps)} score maps")
        boxes = _per_image(boxes, len(images))
        proposed = [self._propose(img, m, b) for img, m, b in zip(images, score_maps, boxes, strict=True)]
        regions = [r for r, _ in proposed]
        canvases = [
            _canvas_size(m.shape, img.shape[:2]) if r else tuple(m.shape[1:])
            for img, m, r in zip(images, score_maps, regions, strict=True)
        ]
        crops, sizes = [], []
        for image, canvas, boxes_i in zip(images, canvases, regions, strict=True):
            for box in boxes_i:
                x0, y0, x1, y1 = box
                crops.append(image[y0:y1, x0:x1])
                sizes.append(_region_slice(box, image.shape[:2], canvas)[2])
        crop_maps = iter(self.labeler.score_crops(crops, sizes) if crops else [])
        out = []
        for image, score_map, canvas, (boxes_i, keep) in zip(images, score_maps, canvases, proposed, strict=True):
            if not boxes_i:
                out.append(score_map)
                continue
            slices = [_region_slice(box, image.shape[:2], canvas)[:2] for box in boxes_i]
            patches = [next(crop_maps) for _ in boxes_i]
            full = _resize(score_map, canvas)
            keep_t = F.interpolate(torch.from_numpy(keep)[None, None].float(), size=canvas, mode="nearest")[0, 0]
            out.append(
                blend(full, slices, patches, self.cfg.blend, self.labeler.logit_scale, keep_t.to(full.device) > 0)
            )
        return out, regions

    def _propose(self, image: np.ndarray, score_map: torch.Tensor, raw_boxes: Any) -> tuple[list[Box], np.ndarray]:
        """Regions to re-infer, and the (h, w) bool map of first-pass pixels the crops must not change."""
        if self.cfg.max_regions == 0:
            return [], np.zeros(score_map.shape[1:], bool)
        first = self.labeler.finalize(score_map, tuple(score_map.shape[1:]))  # labels at the working resolution
        parts = first_pass(first.labels, first.confidence, self.cfg, self.labeler.vocab.background)
        return propose(parts, image.shape[:2], raw_boxes, self.cfg, self.skipped), protected(parts, self.cfg)


@torch.inference_mode()
def blend(
    full: torch.Tensor,
    regions: list[tuple[slice, slice]],
    crops: list[torch.Tensor],
    mode: str,
    logit_scale: float,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Merge crop scores into full-image scores. `full` (K, h, w); `regions[i]` (rows, cols) slices of it;
    `crops[i]` (K, rows, cols) scores of region i; pixels where `keep` (h, w) bool is set keep `full`.
    Returns (K, h, w) float32 (see the module docstring)."""
    full = full.float()
    free = torch.ones(full.shape[1:], device=full.device) if keep is None else (~keep).float()
    if mode == "replace":
        num, den = full.clone(), torch.ones(full.shape[1:], device=full.device)
        for rows, cols in regions:
            num[:, rows, cols] *= 1 - free[rows, cols]
            den[rows, cols] = 1 - free[rows, cols]
        weights = [free[rows, cols].clone() for rows, cols in regions]
    elif mode == "confidence":
        den = _confidence(full, logit_scale)
        num = full * den
        weights = [
            _confidence(c.float(), logit_scale) * free[rows, cols]
            for (rows, cols), c in zip(regions, crops, strict=True)
        ]
    else:
        raise ValueError(f"zoom.blend {mode!r} is not one of confidence, replace")
    for (rows, cols), crop, weight in zip(regions, crops, weights, strict=True):
        num[:, rows, cols] += crop.float() * weight
        den[rows, cols] += weight
    return num / den


def _confidence(scores: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """(h, w) max class probability of (K, h, w) scores: always >= 1/K, so a safe blending weight."""
    return F.softmax(logit_scale * scores, dim=0).amax(dim=0)


def _canvas_size(shape: tuple[int, ...], size: tuple[int, int]) -> tuple[int, int]:
    """Merge resolution: the working (h, w) of a (K, h, w) map, scaled towards the image `size` (H, W) while
    K x h x w float32 fits in CANVAS_BYTES; never below the working resolution."""
    k, h, w = shape
    scale = min(size[0] / h, size[1] / w, math.sqrt(CANVAS_BYTES / (4 * k * h * w)))
    return (h, w) if scale <= 1 else (round(h * scale), round(w * scale))


def _region_slice(box: Box, size: tuple[int, int], canvas: tuple[int, int]) -> tuple[slice, slice, tuple[int, int]]:
    """Canvas rows and columns of an image-pixel box, and their (rows, cols) count (at least 1 each)."""
    x0, y0, x1, y1 = box
    sy, sx = canvas[0] / size[0], canvas[1] / size[1]
    r0, c0 = min(round(y0 * sy), canvas[0] - 1), min(round(x0 * sx), canvas[1] - 1)
    r1, c1 = max(round(y1 * sy), r0 + 1), max(round(x1 * sx), c0 + 1)
    return slice(r0, r1), slice(c0, c1), (r1 - r0, c1 - c0)


def _resize(score_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(score_map.shape[1:]) == tuple(size):
        return score_map
    return F.interpolate(score_map[None].float(), size=size, mode="bilinear", align_corners=False)[0]


def _per_image(boxes: list[Any] | None, n: int) -> list[Any]:
    if boxes is None:
        return [None] * n
    if len(boxes) != n:
        raise ValueError(f"zoom: boxes are given for {len(boxes)} images but the batch has {n}")
    return list(boxes)
