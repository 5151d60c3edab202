"""Knowledge the training data never stated: does a pretrained language model carry everyday facts over?

ShapeWorld-RS's `knowledge` family draws its facts from one fixed table (shared/spec/shapeworld.md) in every
split, so a model trained from scratch can memorise all of it (the shipped tiny states the reference's facts
and conclusion on 100 % of val's knowledge queries: `python -m bench.diagnose_cot --family knowledge`), and
the family cannot show what a pretrained LM adds. The spec also expects "reasonable paraphrases of every
family". So this probe keeps each knowledge example of a split (image, target, reference) and asks for the
same object again with facts that are **not** in the table ("the colour of a strawberry", "shaped like a
coin"), then scores both phrasings with `encode` + `decode` as a user runs them:

- `gIoU_table` / `gIoU_unseen`: the mask, with the table's phrasing (the data set's query) and the unseen one;
- `conclusion_right_*`: the generated CoT's "so the <colour> <shape>" names the reference's attributes
  (the knowledge step, before any perception).

The unseen phrasing is drawn deterministically (`--seed`) from `UNSEEN_FACTS` and the data set's own query
templates; an attribute the example does not use is not mentioned.

    python -m bench.knowledge_unseen --checkpoint assets/checkpoints/smol --data data/sw30k --split test
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from bench.diagnose_cot import knowledge_split

# Everyday facts outside ShapeWorld's table (training.data.shapeworld_facts), one attribute each, each a clause
# completing "Which shape …?". Kept unambiguous among ShapeWorld's six shapes and seven colours.
UNSEEN_FACTS: dict[str, tuple[str, ...]] = {
    "circle": ("is shaped like a coin", "has the shape of a dinner plate", "is shaped like a clock face"),
    "triangle": ("has three sides", "is shaped like a yield sign"),
    "square": ("has the shape of a face of a dice", "is shaped like a floor tile"),
    "diamond": ("is shaped like a kite", "has the shape of a rhombus"),
    "hexagon": ("has six sides", "is shaped like a bolt's nut"),
    "star": ("has five points", "is shaped like a starfish"),
    "red": ("is the colour of a strawberry", "is the colour of blood", "is the colour of a cherry"),
    "green": ("is the colour of a cucumber", "is the colour of broccoli", "is the colour of a frog"),
    "blue": ("is the colour of a blueberry", "is the colour of a sapphire"),
    "yellow": ("is the colour of a sunflower", "is the colour of butter", "is the colour of a school bus"),
    "purple": ("is the colour of an eggplant", "is the colour of a plum", "is the colour of an amethyst"),
    "orange": ("is the colour of a tangerine", "is the colour of a goldfish", "is the colour of a basketball"),
    "white": ("is the colour of a cloud", "is the colour of a polar bear", "is the colour of a swan"),
}


def conclusion(cot: str) -> str | None:
    """The attributes a knowledge CoT concludes ("so the orange diamond ." -> "orange diamond")."""
    return knowledge_split(cot)[1]


def attributes(words: str) -> list[str]:
    """The table attributes of a conclusion ("orange diamond" -> ["orange", "diamond"]; "white shape" -> ["white"])."""
    return [w for w in words.split() if w in UNSEEN_FACTS]


def unseen_query(attrs: list[str], rng: np.random.Generator, templates: tuple[str, ...]) -> str:
    """A query naming `attrs` through facts outside the training table, in the data set's own templates."""
    if not attrs:
        raise ValueError("no attribute to ask for")
    clauses = [UNSEEN_FACTS[a][int(rng.integers(len(UNSEEN_FACTS[a])))] for a in attrs]
    if len(clauses) == 2 and rng.random() < 0.5:
        clauses.reverse()
    return templates[int(rng.integers(len(templates)))].format(" and ".join(clauses))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="assets/checkpoints/tiny")
    parser.add_argument("--data", default="data/shapeworld")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", action="store_true", help="also print every example's queries, CoTs and IoUs")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)

    from segcompass.metrics import iou
    from segcompass.model import SegCompass
    from training.data.loaders import load_reasonseg
    from training.data.shapeworld_queries import KNOWLEDGE_TEMPLATES

    samples = [s for s in load_reasonseg(args.data, split=args.split)
               if s.family == "knowledge" and s.cot and conclusion(s.cot)][: args.limit]
    if not samples:
        raise SystemExit(f"no knowledge examples with a reference CoT in {args.data}/{args.split}")
    rng = np.random.default_rng(args.seed)
    queries = [unseen_query(attributes(conclusion(s.cot)), rng, KNOWLEDGE_TEMPLATES) for s in samples]
    model = SegCompass.from_pretrained(args.checkpoint)
    rows = []
    for start in range(0, len(samples), args.batch_size):
        chunk = samples[start:start + args.batch_size]
        images = [s.load_image() for s in chunk]
        for phrasing, texts in (("table", [s.texts[0] for s in chunk]), ("unseen", queries[start:start + len(chunk)])):
            traces = model.encode_batch(images, texts)
            for i, (s, text, trace) in enumerate(zip(chunk, texts, traces)):
                if phrasing == "table":
                    rows.append({"name": s.name, "reference": conclusion(s.cot)})
                row = rows[start + i]
                row[phrasing] = {"query": text, "cot": trace.cot, "iou": round(iou(model.decode(trace).mask, s.gt_mask()), 4),
                                 "conclusion_right": conclusion(trace.cot) == row["reference"]}
    report = {"checkpoint": args.checkpoint, "split": args.split, "count": len(rows)}
    for phrasing in ("table", "unseen"):
        report[f"gIoU_{phrasing}"] = round(float(np.mean([r[phrasing]["iou"] for r in rows])), 3)
        report[f"conclusion_right_{phrasing}"] = round(float(np.mean([r[phrasing]["conclusion_right"] for r in rows])), 3)
    if args.rows:
        report["rows"] = rows
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
