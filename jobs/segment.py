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
from pathlib import PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.config import load_config
from pipeline.io import fs

_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "segment",
        help="label single images with dense CLIP (label PNG + colour overlay)",
        description="Label every pixel of the given images with the dense engine and write NAME.seg.png and "
        "NAME.overlay.png. Arguments of the form key=value are config overrides.",
    )
    parser.add_argument("items", nargs="+", metavar="IMG|k=v", help="image paths or URLs, and config overrides")
    parser.add_argument("--classes", default=None, help='comma-separated class names, e.g. "cat, dog, grass"')
    parser.add_argument("--model", default=None, help="model name, model-config JSON or folder (model.name)")
    parser.add_argument("--pretrained", default=None, help="weights: open_clip tag, path or URL (model.pretrained)")
    parser.add_argument("--head", default=None, help="dense head (head.name), e.g. maskclip, sclip, naclip")
    parser.add_argument("--out", default=".", help="output folder or URL (default: the current folder)")
    parser.add_argument("--config", default=None, help="YAML config file to start from")
    parser.set_defaults(func=run)
    parser.__class__ = _IntermixedParser


class _IntermixedParser(argparse.ArgumentParser):
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
    from pipeline.review.overlay import overlay
    from pipeline.stages.infer import DenseLabeler
    from pipeline.stages.zoom import ZoomLabeler
    from pipeline.vocab import resolve_vocabulary

    overrides = [item for item in args.items if _OVERRIDE.match(item)]
    paths = [item for item in args.items if not _OVERRIDE.match(item)]
    if not paths:
        raise ValueError("no image given")
    cfg = load_config(args.config, overrides)
    model = {k: v for k, v in (("name", args.model), ("pretrained", args.pretrained)) if v is not None}
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))
    if args.head is not None:
        cfg = dataclasses.replace(cfg, head=dataclasses.replace(cfg.head, name=args.head))
    if args.classes is not None:
        classes = [c.strip() for c in args.classes.split(",") if c.strip()]
        if not classes:
            raise ValueError('--classes is empty: give comma-separated class names, e.g. --classes "cat, dog"')
        cfg = dataclasses.replace(cfg, vocab=dataclasses.replace(cfg.vocab, classes=classes))
    vocab = resolve_vocabulary(cfg.vocab, storage_options=cfg.storage_options)
    images = [_read_image(path, cfg.storage_options) for path in paths]
    labeler = ZoomLabeler(DenseLabeler(cfg, vocab, cfg.storage_options), cfg.zoom)  # zoom.enabled=true to zoom in
    for path, image, result in zip(paths, images, labeler(images), strict=True):
        stem = PurePosixPath(path.rstrip("/")).name.rsplit(".", 1)[0]
        seg_url, overlay_url = fs.join(args.out, f"{stem}.seg.png"), fs.join(args.out, f"{stem}.overlay.png")
        fs.put_atomic(seg_url, _png(Image.fromarray(result.labels)), cfg.storage_options)
        picture = overlay(image, result.labels, vocab.display_names, labeler.ignore)
        fs.put_atomic(overlay_url, _png(picture), cfg.storage_options)
        present = [vocab.display_names[i] for i in np.unique(result.labels) if i != labeler.ignore]
        print(f"{path}: {seg_url} {overlay_url} ({', '.join(present) or 'all ignored'})")
    return 0


def _read_image(url: str, storage_options: dict) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(fs.read_bytes(url, storage_options))) as img:
            return np.asarray(img.convert("RGB"))
    except UnidentifiedImageError:
        raise ValueError(f"{url}: not an image PIL can read") from None


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
