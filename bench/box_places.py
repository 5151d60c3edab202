"""Where the box_text baseline's boxes are, against the targets: reads a `training eval --rows` file of a box_text
checkpoint and the split's ShapeWorld JSON files (square images, so a cell is width / GRID pixels).

    python -m training eval --checkpoint runs/bt/model --data data/sw30k --split test --rows runs/T_bt.jsonl
    python -m bench.box_places runs/T_bt.jsonl data/sw30k/test

Prints how many CoTs hold a box, the boxes' centre and size (cells), and, for each example with a box and a target,
the distance from the first box's centre to the first target's and the correlation of their x.
"""

from __future__ import annotations

import argparse
import json
import statistics as st
from pathlib import Path

from PIL import Image

from segcompass.baselines import GRID, parse_boxes

from .paired import read_rows


def first_target_centre(meta: dict, width: int) -> tuple[float, float] | None:
    targets = [s for s in meta["shapes"] if s["label"] == "target"]
    if not targets:
        return None
    xs, ys = zip(*targets[0]["points"])
    cell = width / GRID
    return (min(xs) + max(xs)) / 2 / cell, (min(ys) + max(ys)) / 2 / cell


def box_places(rows: dict[str, dict], split_dir: Path) -> dict:
    boxes = {name: parse_boxes(r["cot"].split(), GRID) for name, r in rows.items()}
    every = [b for bs in boxes.values() for b in bs]
    if not every:
        raise ValueError("no CoT in these rows writes a box: is it a box_text checkpoint's eval?")
    centre = lambda b: ((b[0] + b[2] + 1) / 2, (b[1] + b[3] + 1) / 2)  # noqa: E731
    miss, box_x, target_x = [], [], []
    for name, bs in boxes.items():
        meta = json.loads((split_dir / f"{name}.json").read_text())
        target = first_target_centre(meta, Image.open(split_dir / f"{name}.jpg").size[0])
        if bs and target:
            (bx, by), (tx, ty) = centre(bs[0]), target
            miss.append(((bx - tx) ** 2 + (by - ty) ** 2) ** 0.5)
            box_x.append(bx)
            target_x.append(tx)
    cx, cy = zip(*(centre(b) for b in every))
    r2 = lambda v: round(v, 2)  # noqa: E731
    return {
        "examples": len(rows), "with_a_box": sum(1 for bs in boxes.values() if bs), "boxes": len(every),
        "centre_x_mean_sd": [r2(st.mean(cx)), r2(st.pstdev(cx))], "centre_y_mean_sd": [r2(st.mean(cy)), r2(st.pstdev(cy))],
        "size_mean": [r2(st.mean(b[2] - b[0] + 1 for b in every)), r2(st.mean(b[3] - b[1] + 1 for b in every))],
        "first_box_to_first_target_median_cells": r2(st.median(miss)) if miss else None,
        "x_correlation": r2(st.correlation(box_x, target_x)) if len(miss) > 2 else None, "paired": len(miss),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.box_places", description=__doc__.split("\n\n")[0])
    p.add_argument("rows", help="a `training eval --rows` file of a box_text checkpoint")
    p.add_argument("split_dir", help="the split's folder of NAME.json + NAME.jpg")
    args = p.parse_args(argv)
    out = box_places(read_rows(args.rows), Path(args.split_dir))
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
