"""ShapeWorld-RS scenes: objects, their non-overlapping placement, backgrounds and rendering.

Every number here is fixed by `shared/spec/shapeworld.md` ("The scene"). Coordinates are
pixels, x to the right, y down, origin at the top-left pixel centre; a polygon is an (V, 2)
float array of (x, y) vertices rounded to 0.01 px, painted with
`skimage.draw.polygon(rows=y, cols=x)` so the recorded polygon and the pixels agree exactly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.ndimage
import skimage.data
import skimage.draw
import skimage.morphology
from PIL import Image

CANVAS = 256
JPEG_QUALITY = 95
SHAPES = ("circle", "triangle", "square", "diamond", "hexagon", "star")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
}
SIZES: dict[str, tuple[float, float]] = {"small": (10.0, 16.0), "medium": (20.0, 28.0), "large": (32.0, 42.0)}
COLOR_JITTER = 15  # each channel uniform in base ± 15
STAR_INNER_RATIO = 0.45  # the star's inner vertices sit at 0.45 R
MIN_OBJECTS, MAX_OBJECTS = 2, 6
GAP = 4  # px: centre margin from the canvas border, and the dilation radius between objects
MAX_REJECTIONS = 200  # per object; then the scene starts again
PLAIN_RANGE = (90, 170)  # plain background channel range, inclusive
PLAIN_NOISE_SIGMA = 6.0
TEXTURES = ("grass", "gravel", "brick", "moon", "camera", "coffee", "chelsea", "rocket", "astronaut")
TEXTURE_MIN_SIDE = 200
REGION_BORDERS = (CANVAS / 3, 2 * CANVAS / 3)
ROW_WORDS = ("top", "middle", "bottom")
COL_WORDS = ("left", "centre", "right")

_GAP_DISK = skimage.morphology.disk(GAP).astype(bool)  # Euclidean disk, radius 4


@dataclass(frozen=True)
class SceneObject:
    """One painted object. `points` is (V, 2) xy, rounded to 0.01; `area` is its mask's pixel count."""

    shape: str
    color: str
    size: str
    rgb: tuple[int, int, int]
    center: tuple[float, float]
    radius: float
    points: np.ndarray
    area: int

    @property
    def attributes(self) -> tuple[str, str, str]:
        """(size, color, shape): the words that name the object in full."""
        return (self.size, self.color, self.shape)

    @property
    def region(self) -> str:
        """The canvas third holding the centre, e.g. "top left" or "middle centre"."""
        return region_name(*self.center)


def region_name(x: float, y: float) -> str:
    """Region words of a point: `top/middle/bottom` by y, `left/centre/right` by x (thirds)."""
    row = ROW_WORDS[int(np.searchsorted(REGION_BORDERS, y, side="right"))]
    col = COL_WORDS[int(np.searchsorted(REGION_BORDERS, x, side="right"))]
    return f"{row} {col}"


def vertex_angles(shape: str) -> tuple[np.ndarray, np.ndarray]:
    """Vertex angles θ_k (radians from straight up, clockwise) and radius factors, both (V,)."""
    if shape == "circle":
        return 2 * np.pi * np.arange(64) / 64, np.ones(64)
    if shape == "triangle":
        return 2 * np.pi * np.arange(3) / 3, np.ones(3)
    if shape == "square":
        return np.pi / 4 + np.pi * np.arange(4) / 2, np.ones(4)
    if shape == "diamond":
        return np.pi * np.arange(4) / 2, np.ones(4)
    if shape == "hexagon":
        return np.pi * np.arange(6) / 3, np.ones(6)
    if shape == "star":
        return np.pi * np.arange(10) / 5, np.where(np.arange(10) % 2 == 0, 1.0, STAR_INNER_RATIO)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def polygon_points(shape: str, cx: float, cy: float, radius: float) -> np.ndarray:
    """The shape's vertices (V, 2) as (x, y) = (cx + r·sin θ, cy − r·cos θ), rounded to 0.01."""
    theta, factor = vertex_angles(shape)
    r = radius * factor
    return np.round(np.stack([cx + r * np.sin(theta), cy - r * np.cos(theta)], axis=1), 2)


def polygon_pixels(points: np.ndarray, height: int = CANVAS, width: int = CANVAS) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of the pixels a polygon (V, 2) xy covers: the painting rule."""
    return skimage.draw.polygon(points[:, 1], points[:, 0], shape=(height, width))


def _dilate_into(blocked: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
    """Mark the object's pixels dilated by the radius-4 disk in `blocked` (H, W), in place."""
    r0, r1 = max(rows.min() - GAP, 0), min(rows.max() + GAP + 1, CANVAS)
    c0, c1 = max(cols.min() - GAP, 0), min(cols.max() + GAP + 1, CANVAS)
    window = np.zeros((r1 - r0, c1 - c0), dtype=bool)
    window[rows - r0, cols - c0] = True
    blocked[r0:r1, c0:c1] |= scipy.ndimage.binary_dilation(window, structure=_GAP_DISK)


def _try_place(rng: np.random.Generator, blocked: np.ndarray) -> SceneObject | None:
    """Draw one object and place it; None after MAX_REJECTIONS rejected centres."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    size = list(SIZES)[rng.integers(len(SIZES))]
    jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3)
    rgb = tuple(int(v) for v in np.clip(np.array(COLORS[color]) + jitter, 0, 255))
    radius = round(float(rng.uniform(*SIZES[size])), 2)
    lo, hi = radius + GAP, CANVAS - 1 - radius - GAP
    for _ in range(MAX_REJECTIONS):
        cx, cy = (round(float(v), 2) for v in rng.uniform(lo, hi, size=2))
        points = polygon_points(shape, cx, cy, radius)
        rows, cols = polygon_pixels(points)
        # Dilating the new mask and testing against old masks equals testing the new mask
        # against the dilated old masks (the disk is symmetric), so keep only the latter.
        if not blocked[rows, cols].any():
            _dilate_into(blocked, rows, cols)
            return SceneObject(shape, color, size, rgb, (cx, cy), radius, points, len(rows))
    return None


def place_objects(rng: np.random.Generator) -> tuple[SceneObject, ...]:
    """2–6 objects with uniform shape, colour and size class, placed without touching."""
    while True:
        n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
        blocked = np.zeros((CANVAS, CANVAS), dtype=bool)
        objects = []
        for _ in range(n):
            obj = _try_place(rng, blocked)
            if obj is None:
                break  # 200 rejections for one object: start the scene again
            objects.append(obj)
        else:
            return tuple(objects)


@functools.lru_cache(maxsize=None)
def _texture_source(name: str) -> np.ndarray:
    """A bundled scikit-image picture as (h, w, 3) uint8 (grey pictures copied to 3 channels)."""
    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def draw_background(rng: np.random.Generator) -> np.ndarray:
    """A (CANVAS, CANVAS, 3) uint8 background: plain + noise or a blended texture crop, p = 1/2 each."""
    if rng.random() < 0.5:
        color = rng.integers(PLAIN_RANGE[0], PLAIN_RANGE[1] + 1, size=3)
        pixels = color + rng.normal(0.0, PLAIN_NOISE_SIGMA, size=(CANVAS, CANVAS, 3))
    else:
        source = _texture_source(TEXTURES[rng.integers(len(TEXTURES))])
        h, w = source.shape[:2]
        side = int(rng.integers(TEXTURE_MIN_SIDE, min(h, w) + 1))
        top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
        crop = Image.fromarray(source[top : top + side, left : left + side])
        resized = np.asarray(crop.resize((CANVAS, CANVAS), Image.Resampling.BILINEAR), dtype=np.float64)
        pixels = 0.5 * resized + 0.5 * 128.0
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def render(background: np.ndarray, objects: tuple[SceneObject, ...]) -> np.ndarray:
    """Paint each object's polygon in its flat colour over the background; (H, W, 3) uint8."""
    image = background.copy()
    for obj in objects:
        rows, cols = polygon_pixels(obj.points)
        image[rows, cols] = obj.rgb
    return image
