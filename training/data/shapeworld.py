"""ShapeWorld-RS v1 generator: scenes + queries written as ReasonSeg pairs (shared/spec/shapeworld.md).

    python -m training.data.shapeworld --out data/shapeworld --split train --n 6000 --seed 0

writes `data/shapeworld/train/train_000000.jpg` + `.json`, … Determinism: the split's seed
comes from (seed, split) through a SeedSequence, so equal `--seed`s of different splits give
different scenes, and example i draws from its own child stream, so it is the same whatever
`--n` is. Same arguments give byte-identical JSON and JPEG files.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from training.data.shapeworld_facts import KNOWLEDGE_FACTS, Fact
from training.data.shapeworld_queries import FAMILIES, Query, make_query
from training.data.shapeworld_scene import (
    CANVAS, COLORS, JPEG_QUALITY, SHAPES, SIZES, SceneObject, draw_background, place_objects, render,
)

__all__ = [
    "CANVAS", "COLORS", "FAMILIES", "KNOWLEDGE_FACTS", "SHAPES", "SIZES", "SPLITS", "Fact",
    "encode_jpeg", "generate_example", "generate_split", "main", "split_seed",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_FAMILY_NAMES = list(FAMILIES)
_FAMILY_PROBS = np.array(list(FAMILIES.values()))


def split_seed(seed: int, split: str) -> int:
    """The seed of a split's example streams, derived from (seed, split) so splits never share scenes."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return int(np.random.SeedSequence([seed, SPLITS.index(split)]).generate_state(1, np.uint64)[0])


def _record(query: Query, objects: tuple[SceneObject, ...]) -> dict[str, Any]:
    """The JSON record of one example (ReasonSeg keys first, then ShapeWorld's extra keys)."""
    return {
        "text": [query.text],
        "is_sentence": query.is_sentence,
        "shapes": [
            {"label": "target", "points": objects[i].points.tolist(), "shape_type": "polygon"} for i in query.targets
        ],
        "family": query.family,
        "objects": [
            {"shape": o.shape, "color": o.color, "size": o.size, "center": list(o.center),
             "radius": o.radius, "points": o.points.tolist()}
            for o in objects
        ],
        "cot": query.cot,
    }


def generate_example(rng_or_seed: np.random.Generator | int, index: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """One example: the image (CANVAS, CANVAS, 3) uint8 and its JSON record.

    An int is a stream seed (see `split_seed`): example `index` draws from its own child stream
    `SeedSequence(seed, spawn_key=(index,))`. A Generator is drawn from directly and `index`
    is not used. The family is drawn first; scenes are redrawn until one admits a query of it.
    """
    if isinstance(rng_or_seed, np.random.Generator):
        rng = rng_or_seed
    else:
        rng = np.random.default_rng(np.random.SeedSequence(rng_or_seed, spawn_key=(index,)))
    family = _FAMILY_NAMES[int(rng.choice(len(_FAMILY_NAMES), p=_FAMILY_PROBS))]
    while True:
        objects = place_objects(rng)
        query = make_query(family, rng, objects)
        if query is not None:
            break
    image = render(draw_background(rng), objects)
    return image, _record(query, objects)


def encode_jpeg(image: np.ndarray) -> bytes:
    """JPEG bytes of an (H, W, 3) uint8 image at quality 95 (Pillow's default 4:2:0 subsampling)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def generate_split(out_dir: str | Path, split: str, n: int, seed: int, first: int = 0) -> Path:
    """Write examples first..n-1 of `split` as `out_dir/split/{split}_{i:06d}.jpg|.json`; returns the folder.
    Example i depends only on (seed, split, i), so ranges written by parallel processes make one split."""
    folder = Path(out_dir) / split
    folder.mkdir(parents=True, exist_ok=True)
    stream = split_seed(seed, split)
    families: collections.Counter[str] = collections.Counter()
    start = time.perf_counter()
    for i in tqdm(range(first, n), desc=f"shapeworld {split}", unit="ex"):
        image, record = generate_example(stream, i)
        name = f"{split}_{i:06d}"
        (folder / f"{name}.jpg").write_bytes(encode_jpeg(image))
        (folder / f"{name}.json").write_text(json.dumps(record))
        families[record["family"]] += 1
    elapsed = time.perf_counter() - start
    log.info("wrote %d %s examples to %s in %.1f s (%.1f ex/s); families: %s",
             n - first, split, folder, elapsed, (n - first) / max(elapsed, 1e-9), dict(sorted(families.items())))
    return folder


def main(argv: list[str] | None = None) -> None:
    """Command line: generate one split into OUT/SPLIT/."""
    parser = argparse.ArgumentParser(description="Generate a ShapeWorld-RS split (ReasonSeg layout).")
    parser.add_argument("--out", required=True, type=Path, help="data set folder; the split goes to OUT/SPLIT/")
    parser.add_argument("--split", required=True, choices=SPLITS)
    parser.add_argument("--n", required=True, type=int, help="number of examples")
    parser.add_argument("--seed", default=0, type=int)
    parser.add_argument("--start", default=0, type=int, help="first example index (split a long run into ranges)")
    parser.add_argument("--jobs", default=1, type=int, help="processes, each writing one range (same files)")
    args = parser.parse_args(argv)
    if args.n < 0 or not 0 <= args.start <= args.n:
        parser.error("need 0 <= --start <= --n")
    if args.jobs < 1:
        parser.error("need --jobs >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.jobs == 1:
        generate_split(args.out, args.split, args.n, args.seed, first=args.start)
        return
    import multiprocessing as mp

    cuts = np.linspace(args.start, args.n, args.jobs + 1).round().astype(int).tolist()
    ranges = [(args.out, args.split, int(b), args.seed, int(a)) for a, b in zip(cuts, cuts[1:]) if b > a]
    with mp.get_context("fork").Pool(len(ranges)) as pool:
        pool.starmap(generate_split, ranges)


if __name__ == "__main__":
    main()
