"""Paired comparison of two evaluations of the same examples: `python -m training eval … --rows FILE` writes one
JSON line per example (name, family, IoU, CoT, why it was repaired); this matches two such files by example name
and prints each one's gIoU, the mean difference B - A with a 95 % bootstrap interval (10,000 resamples of the
examples, seed 0), the same per family, and how many CoTs differ or were repaired.

    python -m training eval --checkpoint assets/checkpoints/smol --data data/sw30k --split test --no-repair \\
        --no-ground-regions --rows runs/greedy.jsonl
    python -m training eval --checkpoint assets/checkpoints/smol --data data/sw30k --split test --rows runs/repair.jsonl
    python -m bench.paired runs/greedy.jsonl runs/repair.jsonl
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import numpy as np


def read_rows(path: str) -> dict[str, dict]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["name"]: r for r in rows}


def interval(diff: np.ndarray, resamples: int = 10_000, seed: int = 0) -> list[float]:
    """95 % bootstrap interval of the mean of `diff` (resampling the examples)."""
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(1)
    return [round(float(x), 3) for x in np.percentile(means, [2.5, 97.5])]


def compare(a: dict[str, dict], b: dict[str, dict]) -> dict:
    names = [n for n in a if n in b]
    if not names:
        raise ValueError("the two files share no example")
    ia, ib = (np.array([rows[n]["iou"] for n in names]) for rows in (a, b))
    out = {"examples": len(names), "A": round(float(ia.mean()), 3), "B": round(float(ib.mean()), 3),
           "B_minus_A": round(float((ib - ia).mean()), 3), "B_minus_A_95ci": interval(ib - ia),
           "cot_changed": sum(a[n].get("cot") != b[n].get("cot") for n in names),
           "repaired_in_B": sum(bool(b[n].get("repair")) for n in names)}
    families = defaultdict(list)
    for n, x, y in zip(names, ia, ib):
        families[a[n]["family"] or "?"].append((x, y))
    out["families"] = {f: {"n": len(v), "A": round(float(np.mean([x for x, _ in v])), 3),
                           "B": round(float(np.mean([y for _, y in v])), 3),
                           "B_minus_A_95ci": interval(np.array([y - x for x, y in v]))}
                       for f, v in sorted(families.items())}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="rows of the baseline (A)")
    p.add_argument("b", help="rows of the method (B)")
    args = p.parse_args(argv)
    out = compare(read_rows(args.a), read_rows(args.b))
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
