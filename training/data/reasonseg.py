"""Reader for the ReasonSeg layout: a folder of NAME.jpg + NAME.json pairs (ShapeWorld writes it too).

Required JSON keys: `text` (list of phrasings, or one string), `is_sentence` (bool), `shapes`
(list of {"label", "points": [[x, y], ...]}; `shape_type` is not used: every shape is filled
as a polygon, as the public loader does). Optional ShapeWorld keys: `family`, `cot`, `objects`.
A data set folder may instead hold split sub-folders (`train/`, `val/`, `test/`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from training.data.sample import Region, Sample, fail, load_json, polygon_array

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _parse_record(path: Path, data: Any) -> dict[str, Any]:
    """The Sample fields stored in one ReasonSeg JSON; raises DatasetFormatError naming the file."""
    if not isinstance(data, dict):
        fail(path, "expected a JSON object")
    for key in ("text", "is_sentence", "shapes"):
        if key not in data:
            fail(path, f"missing required key {key!r}")
    texts = [data["text"]] if isinstance(data["text"], str) else data["text"]
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        fail(path, "'text' must be a non-empty list of strings")
    if not isinstance(data["is_sentence"], bool):
        fail(path, "'is_sentence' must be true or false")
    if not isinstance(data["shapes"], list):
        fail(path, "'shapes' must be a list")
    regions = []
    for k, shape in enumerate(data["shapes"]):
        try:
            regions.append(Region(str(shape["label"]), polygons=(polygon_array(shape["points"]),)))
        except (KeyError, TypeError, ValueError) as err:
            fail(path, f"shape {k} is malformed ({err!r}); expected {{'label': str, 'points': [[x, y], ...]}}")
    objects = data.get("objects")
    if objects is not None and not (isinstance(objects, list) and all(isinstance(o, dict) for o in objects)):
        fail(path, "'objects' must be a list of objects")
    for key in ("family", "cot"):
        if data.get(key) is not None and not isinstance(data[key], str):
            fail(path, f"{key!r} must be a string")
    return {
        "texts": tuple(texts),
        "is_sentence": data["is_sentence"],
        "regions": tuple(regions),
        "family": data.get("family"),
        "cot": data.get("cot"),
        "objects": tuple(objects) if objects is not None else None,
    }


def _image_for(json_path: Path) -> Path:
    for suffix in IMAGE_SUFFIXES:
        candidate = json_path.with_suffix(suffix)
        if candidate.exists():
            return candidate
    fail(json_path, f"no image next to it (looked for {', '.join(json_path.stem + s for s in IMAGE_SUFFIXES)})")


def load_reasonseg(folder: str | Path, split: str | None = None) -> list[Sample]:
    """All pairs of a ReasonSeg split folder, sorted by name.

    `folder` is a split folder of pairs, or (with `split`) a data set folder holding `split/`.
    Raises ValueError if `folder` holds split sub-folders and no `split` is given.
    """
    root = Path(folder) / split if split is not None else Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"ReasonSeg folder not found: {root}")
    json_paths = sorted(root.glob("*.json"))
    if not json_paths:
        splits = sorted(d.name for d in root.iterdir() if d.is_dir() and any(d.glob("*.json")))
        if splits:
            raise ValueError(f"{root} holds the splits {splits}; pass split= one of them")
        fail(root, "no ReasonSeg pairs (NAME.jpg + NAME.json) in this folder")
    samples = [
        Sample(name=p.stem, image_path=str(_image_for(p)), **_parse_record(p, load_json(p))) for p in json_paths
    ]
    log.info("loaded %d ReasonSeg samples from %s", len(samples), root)
    return samples
