"""Bytes → arrays for the members of an input sample: the RGB image and the optional `seg.png` truth.

Every decoder checks the pixel count from the image header before any pixel is decoded, so a file
that claims 40000×40000 pixels is refused without allocating it. Pillow's own process-wide bomb
check (`Image.MAX_IMAGE_PIXELS`) is switched off on import of this module because its thresholds are
fixed per process and would refuse images our `max_pixels` allows (or warn below it); every decoder
here applies `max_pixels` instead. Failures raise `ValueError` with a reason readable by users.
"""

from __future__ import annotations

import functools
import io
import logging
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 100_000_000

Image.MAX_IMAGE_PIXELS = None  # replaced by the explicit max_pixels check in _open_checked

# Modes a class-id map may be stored in, and the dtype the ids come out as.
# Formats whose 16-bit grey files Pillow opens as mode I (values 0..65535) rather than I;16.
_SIXTEEN_BIT_AS_I = ("PNG", "PPM")

# The modes an ICC transform takes, for each mode an image may be in; others are not colour-managed.
_ICC_SOURCE_MODES = {
    "RGB": "RGB",
    "RGBA": "RGB",
    "RGBX": "RGB",
    "P": "RGB",
    "PA": "RGB",
    "L": "L",
    "LA": "L",
    "CMYK": "CMYK",
}
_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))

_LABEL_MODES = {"L": np.uint8, "P": np.uint8, "1": np.uint8, "I;16": np.uint16, "I;16B": np.uint16, "I": np.uint16}


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, where: str = "") -> np.ndarray:
    """Decode image bytes (any format Pillow opens) to an (H, W, 3) uint8 RGB array, values 0..255.

    Pixels come out as stored: EXIF orientation is not applied, so label maps computed from this
    array line up with the stored pixels, as Pillow, torchvision's `decode_image` and WebDataset
    return them by default (OpenCV's `imread` rotates; README, "Inputs as they come"). Every
    8-bit mode goes through Pillow's conversion: alpha is dropped (the stored colour is kept),
    palette, 1-bit and grey images are expanded to RGB, CMYK, YCbCr and CIELAB are converted,
    animated images give their first frame. An embedded ICC profile of another colour space than
    sRGB (Display P3 from phones, Adobe RGB, a CMYK press profile) is honoured: the pixels are
    converted to sRGB with LittleCMS (Pillow's `ImageCms`), as browsers show them and as CLIP's
    training images were seen. A profile that cannot be read leaves the pixels as stored, with one
    warning per profile that names `where` (the caller's words for the image, e.g. its sample and
    shard) of the first image that carried it. 16-bit grey (modes `I;16*`, and mode `I` as PNG and
    PGM decode 16-bit files) is scaled by 255/65535 with rounding, without its profile; Pillow's own
    conversion would clip every value above 255 to white. 32-bit integer (`I`, other formats) and
    float (`F`) pixels have no defined white level, so they are refused rather than guessed.

    Raises:
        ValueError: the bytes are not a readable image, have too many pixels, or the mode has no
            faithful 8-bit form; the reason names the format and the mode.
    """
    image = _open_checked(data, max_pixels)
    sixteen_bit = image.mode.startswith("I;16") or (image.mode == "I" and image.format in _SIXTEEN_BIT_AS_I)
    if image.mode in ("I", "F") and not sixteen_bit:
        kind = "32-bit integer" if image.mode == "I" else "32-bit float"
        raise ValueError(
            f"{image.format} image of mode {image.mode} ({kind} pixels) has no defined white level; "
            "store it as 8- or 16-bit"
        )
    try:
        return _grey16_to_rgb(image) if sixteen_bit else np.array(_as_srgb(image, where), dtype=np.uint8)
    except Exception as exc:  # Pillow raises OSError, ValueError, SyntaxError... for malformed data or modes
        raise ValueError(f"cannot decode {image.format} image (mode {image.mode}): {_describe(exc)}") from None


def _as_srgb(image: Image.Image, where: str) -> Image.Image:
    """The image in mode RGB, its pixels converted to sRGB when it embeds another colour space's profile."""
    icc, source = image.info.get("icc_profile"), _ICC_SOURCE_MODES.get(image.mode)
    transform = _srgb_transform(icc, source) if icc and source else None
    if isinstance(transform, _UnusableProfile):
        transform.warn_once(where)
    if not isinstance(transform, ImageCms.ImageCmsTransform):
        return image.convert("RGB")
    return ImageCms.applyTransform(image if image.mode == source else image.convert(source), transform)


@dataclass(eq=False)
class _UnusableProfile:
    """An embedded ICC profile that cannot be used (`problem` says why). Cached with the transforms, so
    its warning is logged once per profile, naming the first image that carried it."""

    size: int  # bytes
    problem: str
    warned: bool = False

    def warn_once(self, where: str) -> None:
        if self.warned:
            return
        self.warned = True
        first = f", first seen in {where}," if where else ""
        logger.warning(
            "an embedded ICC profile (%d bytes)%s cannot be used, pixels are read as sRGB: %s",
            self.size,
            first,
            self.problem,
        )


@functools.lru_cache(maxsize=32)
def _srgb_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | _UnusableProfile | None:
    """The transform from the profile `icc` (of images in `mode`) to sRGB RGB; `_UnusableProfile` for a
    profile that cannot be used; None for one that is sRGB already: its transform gives back every level
    of a probe (grey ramp and colour grid) within one, whatever the profile's version, white point or
    tables say."""
    try:
        transform = ImageCms.buildTransform(ImageCms.ImageCmsProfile(io.BytesIO(icc)), _SRGB, mode, "RGB")
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError) as exc:
        return _UnusableProfile(len(icc), str(exc))
    probe = _probe(mode)
    if probe is not None:
        back = np.asarray(ImageCms.applyTransform(probe, transform), dtype=np.int16)
        if np.abs(back - np.asarray(probe.convert("RGB"), dtype=np.int16)).max() <= 1:
            return None
    return transform


@functools.cache
def _probe(mode: str) -> Image.Image | None:
    """Pixels that tell a transform to sRGB from none: a grey ramp, and for RGB also a grid of 18 levels
    of each channel; None for modes no transform leaves as they are (CMYK)."""
    ramp = np.arange(256, dtype=np.uint8)
    if mode == "L":
        return Image.fromarray(ramp[None])
    if mode != "RGB":
        return None
    levels = np.arange(0, 256, 15, dtype=np.uint8)  # 0 and 255 included
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1).reshape(-1, 3)
    return Image.fromarray(np.concatenate([np.repeat(ramp, 3).reshape(256, 3), grid])[None])


def _grey16_to_rgb(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 of a 16-bit grey image, rounded to the nearest 8-bit level (np.array: writable)."""
    grey = np.array(image).astype(np.int64)
    if grey.size and (grey.min() < 0 or grey.max() > 65535):
        raise ValueError("values outside 0..65535")
    grey8 = ((grey * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
    return np.repeat(grey8[..., None], 3, axis=2)


def decode_label_png(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a single-channel PNG of class ids (e.g. `seg.png` ground truth) to an (H, W) array.

    8-bit grey, palette (the palette indices are the ids) and 1-bit PNGs give uint8; 16-bit grey
    gives uint16. Colour PNGs are refused: their pixels are not class ids.
    """
    image = _open_checked(data, max_pixels)
    if image.format != "PNG":
        raise ValueError(f"label map must be a PNG, got {image.format}")
    dtype = _LABEL_MODES.get(image.mode)
    if dtype is None:
        raise ValueError(f"label PNG must be single-channel (8/16-bit grey or palette), got mode {image.mode}")
    try:
        ids = np.array(image)
    except Exception as exc:  # see decode_image
        raise ValueError(f"cannot decode label PNG: {_describe(exc)}") from None
    if ids.dtype == np.bool_:
        return ids.astype(np.uint8)
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(dtype).max):
        raise ValueError(f"label PNG holds ids outside 0..{np.iinfo(dtype).max}")
    return ids.astype(dtype, copy=False)


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and refuse the image before decoding if it has too many pixels."""
    if not data:
        raise ValueError("empty member (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as exc:  # see decode_image
        raise ValueError(f"not a readable image ({_describe(exc)})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ValueError(
            f"image header claims {width}x{height} = {width * height} pixels, above max_pixels={max_pixels}; "
            "not decoded"
        )
    return image


# What a message carries of one file rather than of its fault: object reprs (`<_io.BytesIO object at
# 0x7f...>`), counts of bytes (Pillow: "image file is truncated (13 bytes not processed)", "Incomplete
# header: 58 bytes"), bytes read where a name was expected ("broken PNG file (chunk b'\x18*M=')", while a
# real chunk name such as b'IDAT' is kept) and the header text Python failed to parse as a number.
_PER_FILE = (
    (re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>"), "the image data"),
    (re.compile(r" \(\d+ bytes not processed\)"), ""),  # so it reads as Pillow's truncation message without a count
    (re.compile(r"\b\d+ bytes\b"), "N bytes"),
    (re.compile(r"""\bb('|")(?:\\.|(?!\1).)*\1"""), lambda m: m[0] if m[0][2:-1].isalpha() else "<corrupt bytes>"),
    (re.compile(r"^(invalid literal for \w+\(\) with base \d+|could not convert string to \w+): .*", re.S), r"\1"),
)


def _describe(exc: BaseException) -> str:
    # The same fault must read the same every time, so failure reasons can be grouped and counted.
    message = exc.args[0] if len(exc.args) == 1 else None
    # Pillow's PPM reader raises bytes messages that end in the file's own bytes after a colon
    # ("Token too long in file header: ...", "Invalid token for this mode: ...").
    text = message.split(b": ", 1)[0].decode("ascii", "backslashreplace") if isinstance(message, bytes) else str(exc)
    for pattern, replacement in _PER_FILE:
        text = pattern.sub(replacement, text)
    text = text.strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
