"""decode_image on every image mode Pillow opens: each gives the right 8-bit RGB, or a reason naming the mode."""

from __future__ import annotations

import io
import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms

from pipeline.io.decode import _srgb_transform, decode_image
from pipeline.io.read import iter_samples
from pipeline.io.tarwrite import TarShardWriter

RAMP = np.arange(256, dtype=np.uint8).reshape(16, 16)  # every 8-bit value once


def _encode(image: Image.Image, fmt: str, **save: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **save)
    return out.getvalue()


def _grey(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=2)


def _png16(array: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG written byte by byte (colour type 0 grey, 2 RGB, 4 grey+alpha), big-endian samples."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    height, width = array.shape[:2]
    rows = array.astype(">u2").reshape(height, -1).tobytes()
    stride = len(rows) // height
    raw = b"".join(b"\x00" + rows[i * stride : (i + 1) * stride] for i in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


SIXTEEN = RAMP.astype(np.uint16) * 257  # the same picture at full 16-bit range
ODD16 = np.linspace(0, 65535, 256).round().astype(np.uint16).reshape(16, 16)  # values between the x257 steps


def _cases() -> dict[str, tuple[bytes, np.ndarray]]:
    rgb = np.dstack([RAMP, RAMP[::-1], np.full_like(RAMP, 77)])
    palette_img = Image.fromarray(RAMP % 16).convert("P")
    palette_img.putpalette([v for i in range(16) for v in (i * 16, 255 - i * 16, i)])
    palette_rgb = np.stack([(RAMP % 16) * 16, 255 - (RAMP % 16) * 16, RAMP % 16], -1)
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 255, 0], [0, 0, 0, 255]]], np.uint8)
    cmyk_rgb = np.array([[[255, 255, 255], [0, 255, 255], [255, 0, 255], [255, 255, 0], [0, 0, 0]]], np.uint8)
    big_endian = Image.frombytes("I;16B", (16, 16), SIXTEEN.astype(">u2").tobytes())
    return {
        "L png": (_encode(Image.fromarray(RAMP), "PNG"), _grey(RAMP)),
        "1 png": (_encode(Image.fromarray(RAMP > 127), "PNG"), _grey(np.where(RAMP > 127, 255, 0).astype(np.uint8))),
        "P png (4-bit palette)": (_encode(palette_img, "PNG", bits=4), palette_rgb),
        "P gif": (_encode(palette_img, "GIF"), palette_rgb),
        "RGB png": (_encode(Image.fromarray(rgb), "PNG"), rgb),
        "RGB bmp": (_encode(Image.fromarray(rgb), "BMP"), rgb),
        "RGB tiff": (_encode(Image.fromarray(rgb), "TIFF"), rgb),
        "RGB webp lossless": (_encode(Image.fromarray(rgb), "WEBP", lossless=True), rgb),
        "RGBA png (alpha dropped)": (_encode(Image.fromarray(np.dstack([rgb, RAMP])), "PNG"), rgb),
        "LA png (alpha dropped)": (_encode(Image.fromarray(np.dstack([RAMP, RAMP[::-1]])), "PNG"), _grey(RAMP)),
        "P png with transparency": (_encode(palette_img, "PNG", transparency=0), palette_rgb),
        "CMYK tiff": (_encode(Image.fromarray(cmyk, "CMYK"), "TIFF"), cmyk_rgb),
        "I;16 png": (_encode(Image.fromarray(SIXTEEN), "PNG"), _grey(RAMP)),
        "I;16 png, between steps": (
            _encode(Image.fromarray(ODD16), "PNG"),
            _grey(np.round(ODD16 / 257).astype(np.uint8)),
        ),
        "I;16 tiff": (_encode(Image.fromarray(SIXTEEN), "TIFF"), _grey(RAMP)),
        "I;16B tiff": (_encode(big_endian, "TIFF"), _grey(RAMP)),
        "I pgm (16-bit)": (_encode(Image.fromarray(SIXTEEN), "PPM"), _grey(RAMP)),
        "16-bit grey png by hand": (_png16(SIXTEEN, 0), _grey(RAMP)),
        "16-bit RGB png": (
            _png16(np.dstack([SIXTEEN, SIXTEEN[::-1], SIXTEEN]), 2),
            np.dstack([RAMP, RAMP[::-1], RAMP]),
        ),
        "16-bit grey+alpha png": (_png16(np.dstack([SIXTEEN, SIXTEEN]), 4), _grey(RAMP)),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_mode_decodes_to_its_reference_rgb(case):
    data, expected = _cases()[case]
    out = decode_image(data)
    assert out.dtype == np.uint8 and out.shape == expected.shape
    np.testing.assert_array_equal(out, expected)


def test_cmyk_jpeg_decodes_to_its_colours():
    solid = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan ink
    out = decode_image(_encode(solid, "JPEG", quality=95))
    assert np.abs(out.astype(int) - [0, 255, 255]).max() <= 3


@pytest.mark.parametrize(
    ("image", "mode"),
    [
        (Image.fromarray(RAMP.astype(np.int32) * 100_000), "I"),  # 32-bit integer TIFF
        (Image.fromarray(RAMP.astype(np.float32) / 255), "F"),  # float TIFF
    ],
)
def test_modes_without_a_white_level_are_refused_by_name(image, mode):
    with pytest.raises(ValueError, match=rf"TIFF image of mode {mode} \(32-bit (integer|float) pixels\)"):
        decode_image(_encode(image, "TIFF"))


@pytest.mark.parametrize(
    ("mode", "stored", "rgb"),
    [
        ("LAB", (round(50 * 2.55), 128, 128), (119, 119, 119)),  # L* 50 grey is sRGB 119
        ("LAB", (round(53.24 * 2.55), 128 + 80, 128 + 67), (255, 0, 0)),  # sRGB red in CIELAB
        ("YCbCr", (76, 85, 255), (255, 0, 0)),  # BT.601 red
    ],
)
def test_colour_spaces_of_tiff_files_convert_to_their_rgb(mode, stored, rgb):
    out = decode_image(_encode(Image.new(mode, (4, 4), stored), "TIFF"))
    assert np.abs(out.astype(int) - rgb).max() <= 12, out[0, 0]


def _srgb_profile() -> tuple[bytearray, dict[bytes, int]]:
    """LittleCMS's sRGB profile, and where each tag's table entry (its offset and size) is."""
    data = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = struct.unpack(">I", data[128:132])[0]
    return data, {bytes(data[132 + 12 * i : 136 + 12 * i]): 136 + 12 * i for i in range(count)}


def _profile_with_red_and_blue_swapped() -> bytes:
    """sRGB's own ICC profile with its red and blue primaries exchanged (their tag table entries): a
    valid RGB profile of another colour space, in which stored red is sRGB's blue and back."""
    data, entries = _srgb_profile()
    red, blue = entries[b"rXYZ"], entries[b"bXYZ"]
    data[red : red + 8], data[blue : blue + 8] = data[blue : blue + 8], data[red : red + 8]
    return bytes(data)


def _srgb_profile_with_d65_white() -> bytes:
    """sRGB as the common v2 "sRGB IEC61966-2.1" profile writes it: its media white point is D65
    (0.9505, 1, 1.0891), not the D50 that LittleCMS's own profile records."""
    data, entries = _srgb_profile()
    offset = struct.unpack(">I", data[entries[b"wtpt"] : entries[b"wtpt"] + 4])[0]
    data[offset + 8 : offset + 20] = struct.pack(">3i", *(round(v * 65536) for v in (0.9505, 1.0, 1.0891)))
    return bytes(data)


def _png_with_profile(pixels: np.ndarray, icc: bytes, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(pixels)
    (image if mode == "RGB" else image.convert(mode)).save(buf, format="PNG", icc_profile=icc)
    return buf.getvalue()


COLOURS = np.array([[[200, 30, 10], [0, 128, 255], [255, 255, 255], [90, 90, 90]]], dtype=np.uint8)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P"])
def test_an_embedded_profile_of_another_colour_space_is_converted_to_srgb(mode):
    decoded = decode_image(_png_with_profile(COLOURS, _profile_with_red_and_blue_swapped(), mode))
    stored = np.array(Image.fromarray(COLOURS).convert(mode).convert("RGB"))  # a palette rounds the colours
    expected = stored[..., ::-1].astype(int)  # red and blue exchanged; green, white and grey stay
    assert np.abs(decoded.astype(int) - expected).max() <= 2


def test_an_srgb_profile_or_one_that_cannot_be_read_leaves_the_pixels_as_stored(caplog):
    _srgb_transform.cache_clear()  # the warning is logged once per profile and process
    for srgb in (bytes(_srgb_profile()[0]), _srgb_profile_with_d65_white()):
        assert _srgb_transform(srgb, "RGB") is None  # no conversion to pay for
        assert np.array_equal(decode_image(_png_with_profile(COLOURS, srgb)), COLOURS)
    assert _srgb_transform(_profile_with_red_and_blue_swapped(), "RGB") is not None
    with caplog.at_level(logging.WARNING, logger="pipeline.io.decode"):
        assert np.array_equal(decode_image(_png_with_profile(COLOURS, b"not an ICC profile" * 20)), COLOURS)
    assert "cannot be used, pixels are read as sRGB" in caplog.text


def test_an_unusable_profile_is_reported_once_naming_the_first_sample_and_shard_that_carried_it(tmp_path, caplog):
    _srgb_transform.cache_clear()  # the warning is logged once per profile and process
    broken = _png_with_profile(COLOURS, b"a profile no one can read" * 3)
    url = str(tmp_path / "shard-000000.tar")
    with TarShardWriter(url) as writer:
        for key in ("first", "second"):
            writer.write(key, {"png": broken})
    with caplog.at_level(logging.WARNING, logger="pipeline.io.decode"):
        samples = list(iter_samples(url))
    assert [np.array_equal(s.image, COLOURS) for s in samples] == [True, True]  # read as stored
    (warning,) = [r.getMessage() for r in caplog.records if "ICC" in r.getMessage()]
    assert f"an embedded ICC profile (75 bytes), first seen in sample 'first' of shard {url}, cannot be used" in warning
    assert "second" not in warning


def _noise(seed: int, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _reasons(files: list[bytes]) -> set[str]:
    reasons = set()
    for data in files:
        with pytest.raises(ValueError) as failed:
            decode_image(data)
        reasons.add(str(failed.value))
    return reasons


@pytest.mark.parametrize("fmt", ["JPEG", "GIF", "BMP", "PPM", "TIFF"])
def test_truncated_files_of_a_format_all_give_one_reason(fmt):
    """Pillow counts the bytes left over in its message; cut at different places, files of different
    sizes leave different counts, yet the run summary must count them as one fault."""
    files = [
        data[: int(len(data) * cut)]
        for seed, size in enumerate([(37, 29), (64, 48), (120, 90)])
        for data in [_encode(_noise(seed, size), fmt)]
        for cut in (0.5, 0.7, 0.9)
    ]
    assert _reasons(files) == {
        f"cannot decode {fmt} image (mode {'P' if fmt == 'GIF' else 'RGB'}): OSError: image file is truncated"
    }


def _png_with_a_broken_second_chunk(seed: int) -> bytes:
    """A PNG whose image data is split in two IDAT chunks, the second one's type overwritten by 4
    bytes of noise (as a file spliced or overwritten in place has)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    stream = zlib.compress(b"".join(b"\x00" + row.tobytes() for row in pixels))
    half = len(stream) // 2
    noise = bytes([0x80]) + rng.integers(0, 256, 3, dtype=np.uint8).tobytes()  # never a chunk name
    ihdr = struct.pack(">IIBBBBB", 50, 40, 8, 2, 0, 0, 0)
    second = chunk(b"IDAT", stream[half:])
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", stream[:half])
        + second[:4]
        + noise
        + second[8:]
        + chunk(b"IEND", b"")
    )


def test_a_broken_png_chunk_reads_the_same_whatever_bytes_it_holds():
    """Pillow quotes the noise it read where a chunk name belongs; the reason names the fault instead."""
    assert _reasons([_png_with_a_broken_second_chunk(seed) for seed in range(4)]) == {
        "cannot decode PNG image (mode RGB): SyntaxError: broken PNG file (chunk <corrupt bytes>)"
    }


@pytest.mark.parametrize(
    ("junk", "reason"),
    [
        ((b"4x", b"9Q", b"x5"), "ValueError: invalid literal for int() with base 10"),
        ((b"12345678901x", b"99999999999999", b"AAAAAAAAAAAA"), "ValueError: Token too long in file header"),
    ],
)
def test_a_header_that_does_not_parse_reads_the_same_whatever_text_it_holds(junk, reason):
    """A PPM whose width is overwritten: Python's int() and Pillow's tokenizer quote the text, which
    differs per file (Pillow's as a bytes message)."""
    files = [b"P6\n" + text + b" 4\n255\n" + bytes(48) for text in junk]
    assert _reasons(files) == {f"not a readable image ({reason})"}
