"""Rasterising ShapeWorld: shape inside-tests, jittered colours and textured backgrounds, in numpy.

Shapes are tested at sub-pixel sample points (`ss` x `ss` per pixel) so that anti-aliased edges and
the exact class map come from the same samples: a pixel's colour is the mix of its samples, its class
is their majority. Every function takes its randomness from a caller's `np.random.Generator`, so a
scene is a pure function of its seed.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple")

# Hue in degrees of each colour; neighbours are 25-95 degrees apart, jittered by up to HUE_JITTER.
_HUES = {"red": 0.0, "orange": 28.0, "yellow": 55.0, "green": 125.0, "blue": 220.0, "purple": 285.0}
HUE_JITTER = 7.0

_STAR_INNER = 0.45  # inner radius of the 5-pointed star, relative to the outer one
_RING_INNER = 0.55
_CROSS_HALF_WIDTH = 0.3
_SQUARE_HALF = 0.75


def shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of shape `shape` (index into SHAPES) at points (u, v) in the shape's own frame.

    The frame is centred on the shape and scaled so that every shape fits the unit circle.
    """
    name = SHAPES[shape]
    if name == "circle":
        return u * u + v * v <= 1.0
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= _SQUARE_HALF
    if name == "triangle":
        # Equilateral, vertices on the unit circle: the three edges lie at distance 1/2 from the centre.
        inside = np.ones(u.shape, dtype=bool)
        for angle in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6):
            inside &= u * math.cos(angle) + v * math.sin(angle) <= 0.5
        return inside
    if name == "star":
        return _star(u, v)
    if name == "ring":
        r2 = u * u + v * v
        return (r2 <= 1.0) & (r2 >= _RING_INNER**2)
    if name == "cross":
        au, av = np.abs(u), np.abs(v)
        half = 0.9
        return ((au <= _CROSS_HALF_WIDTH) & (av <= half)) | ((av <= _CROSS_HALF_WIDTH) & (au <= half))
    raise ValueError(f"unknown shape index {shape}; shapes are {SHAPES}")


def _star(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Five-pointed star: fold the angle into one half-spike, then test against its outer edge."""
    sector = 2 * math.pi / 5
    rho = np.hypot(u, v)
    phi = np.mod(np.arctan2(v, u) - math.pi / 2, sector)  # a spike points up (+v)
    phi = np.where(phi > sector / 2, sector - phi, phi)
    x, y = rho * np.cos(phi), rho * np.sin(phi)
    # Edge from the spike tip A = (1, 0) to the inner vertex B = r_in (cos 36deg, sin 36deg).
    bx, by = _STAR_INNER * math.cos(sector / 2), _STAR_INNER * math.sin(sector / 2)
    return (bx - 1.0) * y - by * (x - 1.0) >= 0.0


def object_colour(colour: int, rng: np.random.Generator) -> np.ndarray:
    """RGB in [0, 1], shape (3,), float32: the named hue jittered in hue, saturation and value."""
    hue = (_HUES[COLOURS[colour]] + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 360.0
    sat = rng.uniform(0.6, 0.95)
    val = rng.uniform(0.65, 0.95)
    return np.array(colorsys.hsv_to_rgb(hue / 360.0, sat, val), dtype=np.float32)


def _upsample_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) float32 bilinear interpolation weights (pixel centres aligned)."""
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    w = (pos - lo).astype(np.float32)
    m = np.zeros((n_out, n_in), dtype=np.float32)
    np.add.at(m, (np.arange(n_out), lo), 1.0 - w)
    np.add.at(m, (np.arange(n_out), hi), w)
    return m


def background(size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float32 RGB in about [0, 1]: a low-saturation base colour with smooth
    colour noise, a brightness gradient and, half of the time, faint stripes.

    Saturation stays below the objects' range so that "background" is learnable, while the texture
    keeps a flat-colour shortcut from existing.
    """
    base = np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.0, 0.25), rng.uniform(0.3, 0.85)))
    img = np.broadcast_to(base.astype(np.float32), (size, size, 3)).copy()
    grid = int(rng.integers(3, 9))
    noise = rng.normal(0.0, rng.uniform(0.03, 0.1), (grid, grid, 3)).astype(np.float32)
    up = _upsample_matrix(size, grid)
    img += np.stack([up @ noise[:, :, c] @ up.T for c in range(3)], axis=-1)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    angle = rng.uniform(0, 2 * math.pi)
    ramp = coords[None, :] * math.cos(angle) + coords[:, None] * math.sin(angle)  # (y, x)
    img += (rng.uniform(-0.3, 0.3) * ramp)[..., None]
    if rng.uniform() < 0.5:
        angle = rng.uniform(0, math.pi)
        freq = rng.uniform(3.0, 12.0)
        phase = rng.uniform(0, 2 * math.pi)
        proj = coords[None, :] * math.cos(angle) + coords[:, None] * math.sin(angle)
        img += (rng.uniform(0.02, 0.08) * np.sin(2 * math.pi * freq * proj + phase))[..., None]
    return img


def shading(size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 1) float32 multiplicative light field around 1 (+-15% across the image), so an
    object is not one flat colour."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    a, b = rng.uniform(-0.3, 0.3, 2)
    return (1.0 + a * coords[None, :] + b * coords[:, None])[..., None]


def sample_grid(size: int, ss: int) -> np.ndarray:
    """(size * ss,) float32 sub-pixel sample coordinates in pixel units (pixel i spans [i, i + 1))."""
    return ((np.arange(size * ss, dtype=np.float32) + 0.5) / ss).astype(np.float32)


def rasterise(shape: int, cx: float, cy: float, radius: float, angle: float, size: int, ss: int):
    """Sub-sample mask of one shape, cropped to its bounding box.

    Returns (y0, x0, mask): `mask` is bool (h, w) over the sub-sample grid of a size x size image,
    whose top-left sub-sample index is (y0, x0).
    """
    grid = sample_grid(size, ss)
    n = size * ss
    x0 = max(int(math.floor((cx - radius) * ss)), 0)
    x1 = min(int(math.ceil((cx + radius) * ss)) + 1, n)
    y0 = max(int(math.floor((cy - radius) * ss)), 0)
    y1 = min(int(math.ceil((cy + radius) * ss)) + 1, n)
    dx = (grid[x0:x1] - cx)[None, :] / radius
    dy = (grid[y0:y1] - cy)[:, None] / radius
    c, s = math.cos(angle), math.sin(angle)
    u = c * dx + s * dy
    v = -s * dx + c * dy
    return y0, x0, shape_mask(shape, u, v)
