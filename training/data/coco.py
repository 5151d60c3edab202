"""COCO-side file reading shared by the RefCOCO and gRefCOCO loaders.

`instances.json` is COCO's format: `images` ({id, file_name, height, width}) and `annotations`
({id, image_id, segmentation}); a segmentation is a list of polygons [x1, y1, x2, y2, …], an
uncompressed RLE {"counts": [runs], "size": [H, W]}, or a compressed one (counts a string).
REFER's `refs(*.p)` files are pickles; `load_plain_pickle` reads them without ever importing
or calling anything, so a crafted file cannot run code.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from training.data.sample import DatasetFormatError, Region, Rle, fail, load_json, polygon_array


class _PlainUnpickler(pickle.Unpickler):
    """Builds only what pickle opcodes build by themselves: dict, list, tuple, set, str, bytes,
    numbers, bool, None. Any class or function reference (how a pickle runs code) is refused."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="utf-8")
        self._path = path

    def find_class(self, module: str, name: str) -> NoReturn:
        raise DatasetFormatError(
            f"{self._path}: refusing to unpickle {module}.{name}; only plain containers, strings and numbers are allowed"
        )

    def persistent_load(self, pid: Any) -> NoReturn:
        raise DatasetFormatError(f"{self._path}: refusing a persistent id in the pickle")


def load_plain_pickle(path: Path) -> Any:
    """Unpickle a file that must hold only plain data; raises DatasetFormatError otherwise."""
    try:
        with open(path, "rb") as f:
            return _PlainUnpickler(f, path).load()
    except DatasetFormatError:
        raise
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError, TypeError, IndexError) as err:
        raise DatasetFormatError(f"{path}: not a readable pickle ({err})") from err


@dataclass(frozen=True)
class CocoImage:
    """One `images` entry: file name relative to the image folder, and (H, W)."""

    file_name: str
    size: tuple[int, int]


@dataclass(frozen=True, eq=False)
class CocoInstances:
    """An instances.json: images and annotations (raw dicts) by id."""

    path: Path
    images: dict[int, CocoImage]
    annotations: dict[int, dict[str, Any]]

    def region(self, ann_id: int, label: str = "target") -> Region:
        """The annotation's instance as a Region; raises DatasetFormatError if absent or malformed."""
        ann = self.annotations.get(ann_id)
        if ann is None:
            fail(self.path, f"no annotation with id {ann_id}")
        image = self.images.get(ann.get("image_id"))
        if image is None:
            fail(self.path, f"annotation {ann_id} refers to unknown image {ann.get('image_id')}")
        try:
            return _segmentation_region(ann["segmentation"], image.size, label)
        except (KeyError, TypeError, ValueError) as err:
            fail(self.path, f"annotation {ann_id} has a malformed segmentation ({err!r})")


def _segmentation_region(seg: Any, size: tuple[int, int], label: str) -> Region:
    if isinstance(seg, list):  # polygons, each [x1, y1, x2, y2, ...]
        return Region(label, polygons=tuple(polygon_array(list(zip(p[::2], p[1::2]))) for p in seg))
    counts, rle_size = seg["counts"], tuple(int(v) for v in seg["size"])
    if rle_size != size:
        raise ValueError(f"RLE size {rle_size} differs from the image size {size}")
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    rle = Rle(counts if isinstance(counts, str) else tuple(int(c) for c in counts), rle_size)  # type: ignore[arg-type]
    return Region(label, rle=rle)


def load_instances(path: Path) -> CocoInstances:
    """Read a COCO instances.json; raises DatasetFormatError naming it if malformed."""
    data = load_json(path)
    try:
        images = {
            int(im["id"]): CocoImage(str(im["file_name"]), (int(im["height"]), int(im["width"])))
            for im in data["images"]
        }
        annotations = {int(ann["id"]): ann for ann in data["annotations"]}
    except (KeyError, TypeError, ValueError) as err:
        fail(path, f"not a COCO instances file ({err!r})")
    return CocoInstances(path, images, annotations)
