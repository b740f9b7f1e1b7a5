"""Pictures of label maps: class colours over the image, a legend, confidence as a colour map.

Everything drawn here scales with the picture: legend text, swatches and box outlines are sized
from the image's height, so a legend is as readable on a 2048-pixel photo as on a 96-pixel scene
(a fixed-size legend is a few pixels high on a large photo). `clipdense segment` and the review
report draw with the same functions.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Legend text is 1/LEGEND_LINES of the image height, never smaller than MIN_FONT_PX pixels.
LEGEND_LINES = 24
MIN_FONT_PX = 12


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, hues spread by the golden ratio so neighbouring ids differ clearly."""
    hsv = [((i * 0.618034) % 1.0, 0.65 if i % 2 else 0.9, 0.95) for i in range(n)]
    return (np.array([colorsys.hsv_to_rgb(*c) for c in hsv]).reshape(n, 3) * 255).astype(np.uint8)


def tint(image: np.ndarray, labels: np.ndarray, n_classes: int, ignore: int) -> np.ndarray:
    """The image tinted by class, ignored pixels dimmed.

    Args:
        image: (H, W, 3) uint8 RGB.
        labels: (H, W) int class ids in [0, n_classes), or `ignore`.
        n_classes: number of classes (sets the palette).
        ignore: the ignore value (255 or 65535).

    Returns:
        (H, W, 3) uint8 RGB, the same size as `image`.
    """
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    colours = palette(n_classes)
    known = labels != ignore
    colour = colours[np.where(known, labels, 0)].astype(np.float32)
    return np.where(known[..., None], 0.45 * image + 0.55 * colour, 0.4 * image).astype(np.uint8)


def class_shares(labels: np.ndarray, ignore: int) -> list[tuple[int, float]]:
    """(class id, fraction of all pixels) of the classes present in an (H, W) map, largest first."""
    ids, counts = np.unique(labels[labels != ignore], return_counts=True)
    order = sorted(zip(counts.tolist(), ids.tolist(), strict=True), reverse=True)
    return [(int(cls), count / labels.size) for count, cls in order]


@cache
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled scalable font at `size` pixels (no system font needed)."""
    return ImageFont.load_default(size=size)


def font_size(height: int) -> int:
    """Legend text height in pixels for a picture `height` pixels high."""
    return max(MIN_FONT_PX, round(height / LEGEND_LINES))


def with_legend(picture: np.ndarray, entries: Sequence[tuple[str, Sequence[int]]]) -> Image.Image:
    """`picture` (H, W, 3) uint8 with a legend panel on its right: one swatch and label per entry.

    Text is `font_size(H)` pixels high. The panel is as wide as the longest label needs; when the
    entries do not fit in H, the canvas grows downwards (white) rather than shrinking the text.
    """
    height, width = picture.shape[:2]
    size = font_size(height)
    face, pad = font(size), max(2, size // 3)
    line = size + pad
    text_width = max((face.getlength(text) for text, _ in entries), default=0)
    panel = int(pad * 3 + size + text_width)
    canvas = Image.new("RGB", (width + panel, max(height, pad + line * len(entries))), "white")
    canvas.paste(Image.fromarray(picture), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, (text, colour) in enumerate(entries):
        x, y = width + pad, pad + row * line
        draw.rectangle((x, y, x + size, y + size), fill=tuple(int(c) for c in colour), outline="black")
        draw.text((x + size + pad, y), text, fill="black", font=face)
    return canvas


def overlay(image: np.ndarray, labels: np.ndarray, names: Sequence[str], ignore: int) -> Image.Image:
    """The image tinted by class with a legend of the classes present and their share of the pixels.

    `image` (H, W, 3) uint8, `labels` (H, W) class ids into `names` (or `ignore`). Returns an RGB
    image H (or more, for a long legend) by W + the legend's width.
    """
    colours = palette(len(names))
    entries = [(f"{names[c]} {100 * share:.1f}%", colours[c]) for c, share in class_shares(labels, ignore)]
    return with_legend(tint(image, labels, len(names), ignore), entries)


def draw_boxes(picture: np.ndarray, boxes: Sequence[Sequence[int]]) -> np.ndarray:
    """A copy of `picture` (H, W, 3) uint8 with `boxes` ([x0, y0, x1, y1] pixels) outlined in white
    on black, the line width scaled with the picture (1/200 of its short side, at least 1 px)."""
    if not len(boxes):
        return picture
    canvas = Image.fromarray(picture)
    draw = ImageDraw.Draw(canvas)
    line = max(1, round(min(picture.shape[:2]) / 200))
    for x0, y0, x1, y1 in boxes:
        # Outlines grow inwards: a white line inside a black one shows on light and dark pixels alike.
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline="black", width=2 * line)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline="white", width=line)
    return np.asarray(canvas)


def confidence_picture(confidence: np.ndarray) -> np.ndarray:
    """(H, W) confidence in [0, 1] (float) or 0..255 (uint8, as in `conf.png`) as (H, W, 3) uint8
    RGB in matplotlib's perceptually uniform `viridis` map (dark blue = 0, yellow = 1)."""
    from matplotlib import colormaps

    values = confidence.astype(np.float32) / 255.0 if confidence.dtype == np.uint8 else confidence
    return (colormaps["viridis"](np.clip(values, 0.0, 1.0))[..., :3] * 255).astype(np.uint8)


def thumbnail(picture: np.ndarray, max_side: int) -> np.ndarray:
    """`picture` (H, W, 3) uint8 shrunk (Lanczos) so its longer side is at most `max_side` pixels."""
    height, width = picture.shape[:2]
    scale = max_side / max(height, width)
    if scale >= 1:
        return picture
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(picture).resize(size, Image.Resampling.LANCZOS))
