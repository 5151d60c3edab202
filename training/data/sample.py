"""The one record every data set loads into: `Sample`, its annotated `Region`s, and their masks.

Ground-truth masks follow the public ReasonSeg loader (shared/spec/shapeworld.md): regions
labelled `flag` are skipped; the rest are painted larger areas first, a label containing
`ignore` as 255 (not scored), any other label (`target`) as 1. Polygons are filled with
`skimage.draw.polygon(rows=y, cols=x)`, the renderer's own rule, with no outline.
Label tests are case-insensitive, as in the public loader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import skimage.draw
from PIL import Image, ImageOps

_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_EXIF_ORIENTATION = 0x0112


class DatasetFormatError(ValueError):
    """A data set file is missing something or malformed; the message names the file."""


def load_json(path: Path) -> Any:
    """Parse a JSON file; a missing file raises FileNotFoundError, bad JSON DatasetFormatError."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"annotation file not found: {path}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetFormatError(f"{path}: not valid JSON ({err})") from err


def fail(path: Path, message: str) -> NoReturn:
    """Raise DatasetFormatError naming the file."""
    raise DatasetFormatError(f"{path}: {message}")


@dataclass(frozen=True)
class Rle:
    """COCO run-length encoding of an (H, W) mask, column-major runs starting with zeros.

    `counts` is either the runs (uncompressed) or COCO's compressed string; `size` is (H, W).
    """

    counts: str | tuple[int, ...]
    size: tuple[int, int]

    def decode(self) -> np.ndarray:
        """The mask, (H, W) bool. Raises ValueError if the runs do not cover H·W pixels."""
        runs = np.asarray(_string_to_runs(self.counts) if isinstance(self.counts, str) else self.counts, dtype=np.int64)
        height, width = self.size
        if (runs < 0).any() or runs.sum() != height * width:
            raise ValueError(f"RLE runs cover {runs.sum()} pixels, expected {height}x{width}")
        flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
        return flat.reshape(width, height).T


def _string_to_runs(counts: str) -> list[int]:
    """Decode COCO's compressed RLE string (pycocotools' rleFrString): 5-bit groups, delta-coded."""
    runs: list[int] = []
    pos = 0
    while pos < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(counts):
                raise ValueError("truncated compressed RLE string")
            chunk = ord(counts[pos]) - 48
            value |= (chunk & 0x1F) << shift
            more = bool(chunk & 0x20)
            pos += 1
            shift += 5
            if not more and chunk & 0x10:
                value |= -1 << shift  # sign-extend
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


@dataclass(frozen=True, eq=False)
class Region:
    """One annotated instance: a label and its geometry, either polygons or an RLE.

    `polygons` holds one (P, 2) float array of (x, y) vertices per part (read-only).
    """

    label: str
    polygons: tuple[np.ndarray, ...] = ()
    rle: Rle | None = None

    @property
    def is_flag(self) -> bool:
        return self.label.lower() == "flag"

    @property
    def is_ignore(self) -> bool:
        return "ignore" in self.label.lower()

    @property
    def is_target(self) -> bool:
        return not self.is_flag and not self.is_ignore

    def mask(self, height: int, width: int) -> np.ndarray:
        """The region's pixels, (height, width) bool."""
        if self.rle is not None:
            decoded = self.rle.decode()
            if decoded.shape != (height, width):
                raise ValueError(f"RLE of size {decoded.shape} does not match the image size {(height, width)}")
            return decoded
        out = np.zeros((height, width), dtype=bool)
        for points in self.polygons:
            rows, cols = skimage.draw.polygon(points[:, 1], points[:, 0], shape=(height, width))
            out[rows, cols] = True
        return out


def polygon_array(points: Any) -> np.ndarray:
    """A read-only (P, 2) float64 array from [[x, y], ...]; raises ValueError if not that shape."""
    array = np.array(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 2 or not np.isfinite(array).all():
        raise ValueError(f"expected a list of [x, y] points, got an array of shape {array.shape}")
    array.setflags(write=False)
    return array


def read_image(path: str | Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, EXIF orientation applied (as annotation tools show it)."""
    try:
        with Image.open(path) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.uint8)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image file not found: {path}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise DatasetFormatError(f"{path}: unreadable image ({err})") from err


def read_image_size(path: str | Path) -> tuple[int, int]:
    """(H, W) of an image file after EXIF orientation, from its header only."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(_EXIF_ORIENTATION) in _TRANSPOSING_ORIENTATIONS:
                width, height = height, width
            return height, width
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image file not found: {path}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise DatasetFormatError(f"{path}: unreadable image ({err})") from err


@dataclass(frozen=True, eq=False)
class Sample:
    """One image + query with its annotated regions, from any data set.

    `texts` holds every phrasing of the same query (ShapeWorld: one; ReasonSeg and RefCOCO:
    often several). `regions` are all annotated instances, targets and ignore/flag ones;
    none means the query has no target. `image_size` is (H, W) when the annotations state
    it (COCO), else it is read from the image header. `family`, `cot` and `objects` are
    ShapeWorld extras, None elsewhere.
    """

    name: str
    image_path: str
    texts: tuple[str, ...]
    is_sentence: bool
    regions: tuple[Region, ...]
    image_size: tuple[int, int] | None = None
    family: str | None = None
    cot: str | None = None
    objects: tuple[dict[str, Any], ...] | None = None

    @property
    def targets(self) -> tuple[Region, ...]:
        """The target regions (not flag, not ignore), one per instance."""
        return tuple(r for r in self.regions if r.is_target)

    def load_image(self) -> np.ndarray:
        """The image, (H, W, 3) uint8 RGB. Raises FileNotFoundError / DatasetFormatError naming the file."""
        return read_image(self.image_path)

    def size(self) -> tuple[int, int]:
        """(H, W) of the image."""
        return self.image_size if self.image_size is not None else read_image_size(self.image_path)

    def gt_mask(self) -> np.ndarray:
        """The scoring mask, (H, W) uint8: 0 background, 1 target, 255 ignored."""
        height, width = self.size()
        painted = [(r, r.mask(height, width)) for r in self.regions if not r.is_flag]
        painted.sort(key=lambda item: -int(item[1].sum()))  # larger areas first; stable for ties
        out = np.zeros((height, width), dtype=np.uint8)
        for region, mask in painted:
            out[mask] = 255 if region.is_ignore else 1
        return out

    def instance_masks(self) -> list[np.ndarray]:
        """One (H, W) bool mask per target region, in annotation order (for Hungarian matching)."""
        height, width = self.size()
        return [r.mask(height, width) for r in self.targets]
