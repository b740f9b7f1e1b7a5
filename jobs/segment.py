"""`clipdense segment IMG... --classes "cat, dog, grass"`: label single images, write PNGs to look at.

For each image NAME.ext it writes `OUT/NAME.seg.png` (class ids at the original size, 8-bit below
255 classes, else 16-bit; 255/65535 = ignore) and `OUT/NAME.overlay.png` (the image tinted by class,
with a legend of the classes present). Any `k=v` argument is a config override
(`head.options.ks_thresh=1.0`, `infer.crop=224`, ...); `--config FILE` starts from a YAML config.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import re
import sys
from pathlib import PurePosixPath

import numpy as np
from PIL import Image

from jobs.label import with_head_option
from pipeline.config import load_config
from pipeline.io import fs
from pipeline.io.decode import decode_image

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "segment",
        help="label single images with dense CLIP (label PNG + colour overlay)",
        description="Label every pixel of the given images with the dense engine and write NAME.seg.png and "
        "NAME.overlay.png. Arguments of the form key=value are config overrides.",
    )
    parser.add_argument("items", nargs="+", metavar="IMG|k=v", help="image paths or URLs, and config overrides")
    parser.add_argument(
        "--classes",
        default=None,
        help='comma-separated class names, e.g. "cat, dog, grass" (default for a fine-tuned student: its classes)',
    )
    parser.add_argument("--model", default=None, help="model name, model-config JSON or folder (model.name)")
    parser.add_argument("--pretrained", default=None, help="weights: open_clip tag, path or URL (model.pretrained)")
    parser.add_argument("--head", default=None, help="dense head (head.name), e.g. maskclip, sclip, naclip")
    parser.add_argument("--out", default=".", help="output folder or URL (default: the current folder)")
    parser.add_argument("--config", default=None, help="YAML config file to start from")
    parser.set_defaults(func=run)
    parser.__class__ = IntermixedParser


class IntermixedParser(argparse.ArgumentParser):
    """Lets images and k=v overrides come before, between and after the options (argparse alone stops
    collecting positionals at the first option)."""

    _inner = False

    def parse_known_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 (argparse signature)
        if self._inner:
            return super().parse_known_args(args, namespace)
        self._inner = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._inner = False


def run(args: argparse.Namespace) -> int:
    from pipeline.models.backbone import model_meta
    from pipeline.review.overlay import overlay
    from pipeline.stages.infer import DenseLabeler, check_head
    from pipeline.stages.zoom import ZoomLabeler
    from pipeline.vocab import resolve_vocabulary

    overrides = [item for item in args.items if _OVERRIDE.match(item)]
    paths = [item for item in args.items if not _OVERRIDE.match(item)]
    if not paths:
        raise ValueError("no image given")
    cfg = load_config(args.config, with_head_option(args.head, overrides))
    model = {k: v for k, v in (("name", args.model), ("pretrained", args.pretrained)) if v is not None}
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))
    if args.classes is not None:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        if not classes:
            raise ValueError('--classes is empty: give comma-separated class names, e.g. --classes "cat, dog"')
        cfg = dataclasses.replace(cfg, vocab=dataclasses.replace(cfg.vocab, classes=classes))
    meta = model_meta(cfg.model.name, cfg.storage_options)
    check_head(cfg, meta)  # before any image is read or the model loads
    trained = meta.get("vocabulary")  # a student's own classes
    if not (trained or cfg.vocab.classes or cfg.vocab.file):
        raise ValueError(
            f'model {cfg.model.name!r} knows no classes of its own: name them, e.g. --classes "cat, dog" '
            "(or vocab.classes, vocab.file)"
        )
    vocab = resolve_vocabulary(cfg.vocab, storage_options=cfg.storage_options, trained=trained)
    paths = list(dict.fromkeys(paths))  # an image named twice is labelled once
    stems = dict(zip(paths, output_stems(paths), strict=True))
    images: dict[str, np.ndarray] = {}
    for path in paths:  # a bad image is one line on stderr; the others are still labelled
        try:
            images[path] = _read_image(path, cfg.storage_options, cfg.distribute.max_pixels)
        except ValueError as exc:
            print(f"clipdense segment: error: {exc}", file=sys.stderr)
    if not images:
        return 2
    dense = DenseLabeler(cfg, vocab, cfg.storage_options)
    labeler = ZoomLabeler(dense, cfg.zoom)  # zoom.enabled=true to zoom in
    for (path, image), result in zip(images.items(), labeler(list(images.values())), strict=True):
        stem = stems[path]
        seg_url, overlay_url = fs.join(args.out, f"{stem}.seg.png"), fs.join(args.out, f"{stem}.overlay.png")
        fs.put_atomic(seg_url, _png(Image.fromarray(result.labels)), cfg.storage_options)
        picture = overlay(image, result.labels, vocab.display_names, labeler.ignore)
        fs.put_atomic(overlay_url, _png(picture), cfg.storage_options)
        present = [vocab.display_names[i] for i in np.unique(result.labels) if i != labeler.ignore]
        print(f"{path}: {seg_url} {overlay_url} ({', '.join(present) or 'all ignored'})")
    return 0 if len(images) == len(paths) else 2


def _read_image(url: str, storage_options: dict, max_pixels: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB of the image at `url`, decoded as the labeling job decodes shard images.

    Raises:
        ValueError: the file is missing, unreadable or not a decodable image; the message names `url`.
    """
    try:
        return decode_image(fs.read_bytes(url, storage_options), max_pixels)
    except FileNotFoundError:
        raise ValueError(f"{url}: no such file") from None
    except ValueError as exc:
        raise ValueError(f"{url}: {exc}") from None
    except OSError as exc:  # a folder, no permission, a store error
        raise ValueError(f"{url}: cannot read: {type(exc).__name__}: {exc}") from None


def output_stems(paths: list[str]) -> list[str]:
    """Output name stems (`STEM.seg.png`), one per input path, never two alike.

    An image's stem is its basename without the extension (`street` for `a/street.jpg`). Inputs
    whose stems clash take their extension too (`street_jpg`, `street_png`), then their parent
    folders (`a_street_jpg`, `b_street_jpg`) until they differ, so no output overwrites another's.
    """
    parts = [PurePosixPath(p.split("://", 1)[-1].rstrip("/")).parts or ("image",) for p in paths]
    levels = [0] * len(paths)

    def name(i: int) -> str:
        if levels[i] == 0:
            return parts[i][-1].rsplit(".", 1)[0]
        return "_".join(parts[i][-levels[i] :]).replace(".", "_")

    while True:
        names = [name(i) for i in range(len(paths))]
        clashing = [i for i, n in enumerate(names) if names.count(n) > 1]
        deeper = [i for i in clashing if levels[i] < len(parts[i])]
        if not deeper:
            break
        for i in deeper:
            levels[i] += 1
    seen: dict[str, int] = {}
    for i, n in enumerate(names):  # only equal paths spelled differently get here (a/x.jpg, a//x.jpg)
        seen[n] = seen.get(n, 0) + 1
        names[i] = n if seen[n] == 1 else f"{n}-{seen[n]}"
    return names


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
