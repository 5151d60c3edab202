"""Two checkpoints' `bench.knowledge_unseen --rows` reports, paired: the unseen-fact gIoU of each, the colour /
shape each one's CoT recovers from a fact outside the table, and the paired gain of B over A with a 95 % bootstrap
interval (10,000 resamples of the examples, seed 0).

    python -m bench.knowledge_unseen --checkpoint assets/checkpoints/tiny --data data/sw30k --split test --rows > A.json
    python -m bench.knowledge_unseen --checkpoint assets/checkpoints/smol --data data/sw30k --split test --rows > B.json
    python -m bench.knowledge_compare A.json B.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from bench.knowledge_unseen import attributes, conclusion
from bench.paired import interval
from segcompass.verify import COLOURS


def recovered(rows: dict[str, dict], names: list[str]) -> tuple[float, float]:
    """Share of the reference's colours / shapes that the CoT's conclusion names, for the unseen phrasing."""
    colour, shape = [], []
    for n in names:
        got = attributes(conclusion(rows[n]["unseen"]["cot"]) or "")
        for a in attributes(rows[n]["reference"] or ""):
            (colour if a in COLOURS else shape).append(a in got)
    return float(np.mean(colour)) if colour else float("nan"), float(np.mean(shape)) if shape else float("nan")


def compare(a: dict, b: dict, resamples: int = 10000) -> dict:
    ra, rb = ({r["name"]: r for r in rep["rows"]} for rep in (a, b))
    names = sorted(ra)
    if sorted(rb) != names:
        raise ValueError("the two reports cover different examples")
    diff = np.array([rb[n]["unseen"]["iou"] - ra[n]["unseen"]["iou"] for n in names])
    out = {"count": len(names)}
    for tag, rows, rep in (("a", ra, a), ("b", rb, b)):
        c, s = recovered(rows, names)
        out[tag] = {"checkpoint": rep.get("checkpoint"), "gIoU_unseen": round(float(np.mean([rows[n]["unseen"]["iou"]
                    for n in names])), 3), "colour_recovered": round(c, 3), "shape_recovered": round(s, 3)}
    out["paired_gain_b_minus_a"] = round(float(diff.mean()), 3)
    out["ci95"] = interval(diff, resamples)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    args = p.parse_args(argv)
    with open(args.a) as fa, open(args.b) as fb:
        report = compare(json.load(fa), json.load(fb))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
