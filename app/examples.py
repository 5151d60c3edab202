"""The explorer's bundled examples: a few ShapeWorld scenes and natural photos (assets/examples/).

    python -m app.examples        # regenerate assets/examples/ (ShapeWorld generator + skimage photos)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
INDEX = "examples.json"

# scikit-image's bundled photos (public domain / CC0), with an instruction each.
PHOTOS = {
    "chelsea": "the cat's face",
    "coffee": "the cup of coffee",
    "astronaut": "the person in the space suit",
    "rocket": "the rocket on the launch pad",
}
SHAPEWORLD_SEED, SHAPEWORLD_COUNT = 2026, 6


def load_examples(folder: str | Path = EXAMPLES_DIR) -> list[dict]:
    """[{"image": absolute path, "instruction": str, "source": str}] from examples.json; [] if absent."""
    folder = Path(folder)
    index = folder / INDEX
    if not index.is_file():
        return []
    items = json.loads(index.read_text())
    return [{**e, "image": str(folder / e["image"])} for e in items if (folder / e["image"]).is_file()]


def build_examples(folder: str | Path = EXAMPLES_DIR) -> list[dict]:
    """Write ShapeWorld scenes (test-split-like, own seed) and skimage photos as small JPEGs."""
    import numpy as np
    import skimage.data
    from PIL import Image

    from training.data.shapeworld import generate_example

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    seed = int(np.random.SeedSequence([SHAPEWORLD_SEED, 99]).generate_state(1, np.uint64)[0])
    families: set[str] = set()
    i = 0
    while len(items) < SHAPEWORLD_COUNT and i < 200:
        image, record = generate_example(seed, i)
        i += 1
        if record["family"] in families:  # one scene per query family: a varied set
            continue
        families.add(record["family"])
        name = f"shapeworld_{len(items):02d}.jpg"
        Image.fromarray(image).save(folder / name, quality=90)
        items.append({"image": name, "instruction": record["text"][0], "source": f"shapeworld/{record['family']}"})
    for name, instruction in PHOTOS.items():
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        photo.thumbnail((384, 384))
        photo.save(folder / f"{name}.jpg", quality=85)
        items.append({"image": f"{name}.jpg", "instruction": instruction, "source": f"skimage.data.{name}"})
    (folder / INDEX).write_text(json.dumps(items, indent=2) + "\n")
    return items


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for item in build_examples():
        logging.info("%s: %s", item["image"], item["instruction"])
