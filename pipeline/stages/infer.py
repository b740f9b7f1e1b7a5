"""Dense inference: images in, per-pixel class scores and labels out.

`DenseLabeler` is built once per process from the run config: it loads the backbone, builds the
text classifier of the vocabulary (cached) and the head. For a batch of images it:

1. resizes each image so its short side is `infer.short_side` (0 = the model's input size), but
   never to more than `MAX_ASPECT` x short_side² pixels: a 1920x8 panorama strip would otherwise
   become 64x15360 working pixels for a 64 px model, one whole-image window of 15360 tokens whose
   attention alone needs several GB. Past that aspect ratio the image is scaled to the budget (its
   short side ends up below short_side), so work and memory per image are bounded by the budget
   whatever its shape;
2. cuts sliding windows (`infer.crop`/`infer.stride`; crop 0 = whole image), each with its sub-patch
   shifted copies (`infer.shifts`, see `pipeline.stages.windows`), and runs the windows of
   ALL images of the batch through the head together (images of a whole-image batch are grouped by
   size): on a GPU this fills the device where one window cannot; on a CPU one window already keeps
   the cores busy and batching gains little (`bench/heads_speed.py`);
3. upsamples and averages window scores into a (K, h, w) map per image at the working resolution,
   adds the background offset, and optionally refines the batch's maps with PAMR (`infer.pamr_steps`;
   its dilations are half a patch and one patch, the model's feature stride in working pixels: PAMR mends edges
   that the patch grid blurred, and fixed pixel dilations would reach across whole objects of a
   small-patch model or stop short on a coarse one);
4. `finalize` upsamples a map to the original image size in horizontal stripes, so a 2048x1536
   image with 150 classes never holds a full-size float32 K x H x W tensor, and turns it into labels
   and confidences (softmax at `infer.logit_scale`), with background and ignore thresholds.

A model's `meta.json` may name a `head` of its own (a DenseCLIP student exported by the fine-tuning
job): it labels when `head.name` is left unset (null), and a config that names another head is
refused, since no other head can label with that model.

Model calibration: a model's `meta.json` may carry `background_offset` (added to
`vocab.background_offset`), `logit_scale` and `templates` (used while the config keeps the
defaults of `infer.logit_scale` and `prompts.templates`), and `infer`: its recommended
`shifts` and `pamr_steps`, used where the config leaves them unset (null). The background offset is
calibrated under those settings, so they travel together.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import schema
from pipeline.config import InferCfg, PromptCfg, RunCfg
from pipeline.models.backbone import Backbone, load_backbone
from pipeline.models.heads import create_head, labelling_head_name
from pipeline.models.pamr import pamr
from pipeline.models.prompts import build_text_classifier, load_templates
from pipeline.stages import windows as win
from pipeline.vocab import Vocabulary

logger = logging.getLogger(__name__)

_STRIPE_BYTES = 64 << 20  # working memory of one finalize stripe
_PAMR_BATCH_BYTES = 256 << 20  # score maps refined together by PAMR
# Working pixels of an image are at most MAX_ASPECT x short_side²: images up to 4:1 keep their short
# side at short_side (ordinary photos are 4:3 to 16:9, panoramas about 3:1); longer strips shrink.
MAX_ASPECT = 4


@dataclass(frozen=True)
class DenseResult:
    labels: np.ndarray  # (H, W) uint8 (< 255 classes) or uint16; schema.ignore_value(K) = ignore
    confidence: np.ndarray  # (H, W) float32 in [0, 1]: max class probability


def check_head(cfg: RunCfg, meta: dict[str, Any]) -> None:
    """Raise ValueError when `cfg.head` cannot label with the model: an unknown head or head option, or
    another head than the model's own (a fine-tuned student's, `labelling_head_name`). `meta`: the
    model's meta.json (`model_meta`), so that the check runs before the model loads."""
    create_head(labelling_head_name(cfg.head, meta, cfg.model.name), **cfg.head.options)


class DenseLabeler:
    """Labels images with a dense head; see the module docstring for the steps.

    `backbone` may be passed to share one loaded model between labelers; it must match `cfg.model`.
    """

    def __init__(
        self, cfg: RunCfg, vocab: Vocabulary, storage_options: dict | None = None, backbone: Backbone | None = None
    ) -> None:
        self.cfg, self.vocab = cfg, vocab
        if (cfg.vocab.background_threshold > 0 or cfg.vocab.background_offset) and vocab.background is None:
            raise ValueError(
                "vocab.background_threshold and vocab.background_offset need a background class: "
                "set vocab.background words or use a vocabulary with a 'background' id"
            )
        # A named head is built before the model, so that a bad name or option fails fast.
        named = create_head(cfg.head.name, **cfg.head.options) if cfg.head.name else None
        self.backbone = backbone or load_backbone(cfg.model, storage_options)
        meta = self.backbone.meta
        self.head_name = labelling_head_name(cfg.head, meta, cfg.model.name)  # the named one, if allowed
        self.head = named if named is not None else create_head(self.head_name, **cfg.head.options)
        self.infer: InferCfg = resolve_infer(cfg.infer, meta.get("infer") or {}, self.backbone.name)
        spec = cfg.prompts.templates
        if spec == PromptCfg().templates and meta.get("templates"):
            spec = meta["templates"]
        self.templates = tuple(spec) if isinstance(spec, list) else load_templates(spec, storage_options)
        self.text = build_text_classifier(self.backbone, vocab, self.templates)
        self.logit_scale = cfg.infer.logit_scale
        if self.logit_scale == InferCfg().logit_scale and meta.get("logit_scale"):
            self.logit_scale = float(meta["logit_scale"])
        self.background_offset = cfg.vocab.background_offset
        if vocab.background is not None:
            self.background_offset += float(meta.get("background_offset", 0.0))
        self.ignore = schema.ignore_value(len(vocab))
        self.label_dtype = np.uint8 if self.ignore == schema.IGNORE_U8 else np.uint16
        device = self.backbone.device
        self._mean = torch.tensor(self.backbone.mean, device=device).view(3, 1, 1)
        self._std = torch.tensor(self.backbone.std, device=device).view(3, 1, 1)

    @property
    def n_classes(self) -> int:
        return len(self.vocab)

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def text_embeddings(self) -> torch.Tensor:
        """(N, E) float32 normalised text embeddings, one row per class name (synonyms are rows)."""
        return self.text.weights

    def __call__(self, images: list[np.ndarray]) -> list[DenseResult]:
        out = []
        for start in range(0, len(images), self.infer.batch_size):
            chunk = images[start : start + self.infer.batch_size]
            out += [self.finalize(s, img.shape[:2]) for s, img in zip(self.score_maps(chunk), chunk, strict=True)]
        return out

    def score_maps(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        """Class scores (K, h, w) float32 per image at the working resolution (short side resized), before
        softmax, on the model's device. `images` are (H, W, 3) uint8 RGB."""
        out = []
        for start in range(0, len(images), self.infer.batch_size):
            tensors = [self._to_tensor(img) for img in images[start : start + self.infer.batch_size]]
            out += self._score([self._resize(t, self._working_size(*t.shape[1:])) for t in tensors], self.infer.crop)
        return out

    def score_crops(self, crops: list[np.ndarray], sizes: list[tuple[int, int]] | None = None) -> list[torch.Tensor]:
        """Scores of arbitrary image crops (H, W, 3) uint8, all resized to the model's input size (S x S) and
        run as one batch (for re-inferring zoomed regions). Each map is (K, S, S), or `sizes[i]` if given."""
        square = self.backbone.image_size
        tensors = [self._resize(self._to_tensor(crop), square) for crop in crops]
        maps = []
        for start in range(0, len(tensors), self.infer.batch_size):
            maps += self._score(tensors[start : start + self.infer.batch_size], crop=0)
        if sizes is None:
            return maps
        return [
            F.interpolate(m[None], size=tuple(s), mode="bilinear", align_corners=False)[0]
            for m, s in zip(maps, sizes, strict=True)
        ]

    @torch.inference_mode()
    def finalize(self, score_map: torch.Tensor, size: tuple[int, int]) -> DenseResult:
        """Labels and confidences at `size` (H, W) from a (K, h, w) score map (bilinear upsampling, in stripes).

        It runs once per image on the model's thread, so it is written for speed: rows are blended
        at the map's width and only then widened (one vectorised `linear` pass, skipped when the widths
        match), and the confidence is `1 / sum(exp(s * (x - max)))`, the softmax's maximum without
        materialising the softmax (labels are the argmax of the scores, the same as of the softmax),
        and the argmax is read from `amax` (`first_argmax`).
        """
        k, h, w = score_map.shape
        height, width = int(size[0]), int(size[1])
        rows_y = _lerp_index(h, height, score_map.device)
        labels = np.empty((height, width), self.label_dtype)
        confidence = np.empty((height, width), np.float32)
        step = max(1, _STRIPE_BYTES // (4 * 3 * k * width))
        bg, bg_thresh = self.vocab.background, self.cfg.vocab.background_threshold
        for r0 in range(0, height, step):
            if h == height:
                stripe = score_map[:, r0 : r0 + step].float()
            else:
                i0, i1, fy = (t[r0 : r0 + step] for t in rows_y)
                stripe = torch.lerp(score_map[:, i0].float(), score_map[:, i1].float(), fy[:, None])  # (K, r, w)
            if w != width:
                rows = stripe.shape[1]
                stripe = F.interpolate(stripe.reshape(1, k * rows, w), size=width, mode="linear", align_corners=False)
                stripe = stripe.view(k, rows, width)
            top = stripe.amax(dim=0)
            lab = first_argmax(stripe, top)
            conf = torch.exp(self.logit_scale * (stripe - top)).sum(dim=0).reciprocal()
            keep = conf >= self.infer.conf_threshold
            if bg is not None and bg_thresh > 0:
                as_background = conf < bg_thresh
                lab = torch.where(as_background, bg, lab)
                keep = keep | as_background  # a thresholded pixel is background, not unknown
            lab = torch.where(keep, lab, self.ignore)
            labels[r0 : r0 + step] = lab.cpu().numpy()
            confidence[r0 : r0 + step] = conf.cpu().numpy()
        return DenseResult(labels, confidence)

    def _to_tensor(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB to (3, H, W) float32 in [0, 1] on the device."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"an image must be (H, W, 3) uint8 RGB, got {image.shape} {image.dtype}")
        # torch.tensor copies: the array may be read-only (decoded from bytes).
        return torch.tensor(image, device=self.backbone.device).permute(2, 0, 1).float() / 255

    def _working_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) the image is resized to: short side at short_side, pixels at most MAX_ASPECT x short_side²,
        counted as the model sees them, padded to whole patches."""
        short = self.infer.short_side or min(self.backbone.image_size)
        budget = MAX_ASPECT * short * short
        scale = min(short / min(height, width), math.sqrt(budget / (height * width)))
        h, w = max(1, round(height * scale)), max(1, round(width * scale))
        patch = self.backbone.stride
        if win.ceil_to(h, patch) * win.ceil_to(w, patch) > budget:
            # Thinner than a patch (a 1920x1 strip): the padding would spend the budget, so the long
            # side is cut to what one row of patches may hold (the aspect ratio gives way here).
            if h <= w:
                w = max(1, budget // win.ceil_to(h, patch))
            else:
                h = max(1, budget // win.ceil_to(w, patch))
        return h, w

    @staticmethod
    def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(image.shape[1:]) == tuple(size):
            return image
        return F.interpolate(image[None], size=tuple(size), mode="bilinear", align_corners=False, antialias=True)[0]

    @torch.inference_mode()
    def _score(self, images: list[torch.Tensor], crop: int) -> list[torch.Tensor]:
        """Score maps (K, h, w) of [0, 1] images (3, h, w): all windows of all images in one head call
        per window size (one call when `crop` > 0)."""
        plans = [
            win.plan(*img.shape[1:], crop, self.infer.stride, self.backbone.stride, self.infer.shifts) for img in images
        ]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (size, _) in enumerate(plans):
            groups.setdefault(size, []).append(i)
        maps: list[torch.Tensor | None] = [None] * len(images)
        for size, members in groups.items():
            batch = torch.cat([win.cut((images[i] - self._mean) / self._std, plans[i][1], size) for i in members])
            scores = self.head(self.backbone, self.text, batch)  # (n_windows, K, h, w)
            logger.debug("head %s: %d windows of %s from %d images", self.head_name, len(batch), size, len(members))
            counts = [len(plans[i][1]) for i in members]
            products = win.uses_products(tuple(scores.shape[2:]), size)
            finite = win.finite_by_image(scores, counts) if products else [None] * len(members)
            for i, part, ok in zip(members, scores.split(counts), finite, strict=True):
                maps[i] = win.stitch(part, plans[i][1], size, tuple(images[i].shape[1:]), finite=ok)
                if self.vocab.background is not None and self.background_offset:
                    maps[i][self.vocab.background] += self.background_offset
        if self.infer.pamr_steps > 0:
            self._pamr(maps, images)
        return maps

    def _pamr(self, maps: list[torch.Tensor], images: list[torch.Tensor]) -> None:
        """PAMR in place, the maps of one size together (one batch of at most `_PAMR_BATCH_BYTES` of scores)."""
        stride = self.backbone.stride
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, m in enumerate(maps):
            by_size.setdefault(tuple(m.shape), []).append(i)
        for shape, members in by_size.items():
            step = max(1, _PAMR_BATCH_BYTES // (4 * math.prod(shape)))
            for start in range(0, len(members), step):
                chunk = members[start : start + step]
                refined = pamr(
                    torch.stack([maps[i] for i in chunk]),
                    torch.stack([images[i] for i in chunk]),
                    self.infer.pamr_steps,
                    (max(1, stride // 2), stride),
                )
                for i, m in zip(chunk, refined, strict=True):
                    maps[i] = m


def first_argmax(scores: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """Index (H, W) int64 of the first class whose score (K, H, W) equals `top` (its `amax` over classes),
    as `scores.max(dim=0)` gives it; several times faster on CPUs, whose `max` with indices over a
    leading dimension is slow (the ranks are int16, the type these CPUs reduce fastest). A pixel
    without one (a NaN score) gets K."""
    k = scores.shape[0]
    if k >= 2**15:
        return scores.max(dim=0).indices
    rank = torch.arange(k, 0, -1, dtype=torch.int16, device=scores.device).view(k, 1, 1)
    return k - ((scores == top) * rank).amax(dim=0).long()


_UNSET_DEFAULTS = {"shifts": 1, "pamr_steps": 0}  # what an unset (null) key means, and its smallest value


def resolve_infer(infer: InferCfg, recommended: dict[str, Any], model: str) -> InferCfg:
    """`infer` with its unset keys taken from the model's recommendation (meta.json `infer`), else the
    defaults; every value is checked here, so a bad one stops the run before any image is read."""
    unknown = sorted(set(recommended) - _UNSET_DEFAULTS.keys())
    if unknown:
        raise ValueError(
            f"model {model!r}: meta.json recommends infer keys {unknown} that a model may not set; "
            f"it may set {sorted(_UNSET_DEFAULTS)}"
        )
    values = {}
    for key, smallest in _UNSET_DEFAULTS.items():
        value, source = getattr(infer, key), f"infer.{key}"
        if value is None:
            value, source = recommended.get(key, smallest), f"model {model!r}: meta.json infer.{key}"
        if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
            raise ValueError(f"{source} must be a whole number >= {smallest}, got {value!r}")
        values[key] = value
    return dataclasses.replace(infer, **values)


def _lerp_index(src: int, dst: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear source indices and weights along one axis, as `F.interpolate(align_corners=False)` uses them."""
    pos = ((torch.arange(dst, device=device, dtype=torch.float64) + 0.5) * (src / dst) - 0.5).clamp_min(0)
    i0 = pos.floor().long().clamp_max(src - 1)
    i1 = (i0 + 1).clamp_max(src - 1)
    return i0, i1, (pos - i0).float()
