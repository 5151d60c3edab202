"""Print the markdown results table from runs/tiny-HEAD/{eval_test.json,stages.txt}.

    python scripts/results_table.py runs/tiny-segcompass runs/tiny-latent_query runs/tiny-box_text
"""

import json
import sys
from datetime import datetime
from pathlib import Path

FAMILIES = ["attribute", "position", "relation", "comparison", "negation", "knowledge", "multi", "none"]


def wall(stages: Path) -> str:
    lines = [ln.split(" ", 1) for ln in stages.read_text().splitlines() if ln.strip()]
    times = {what: datetime.fromisoformat(t.replace("Z", "+00:00")) for t, what in lines}
    start = next(v for k, v in times.items() if k.startswith("start"))
    end = times.get("joint done")
    if end is None:
        return "?"
    parts, prev = [], start
    for key in ("sft done", "sae done", "joint done"):
        if key in times:
            parts.append(f"{key.split()[0]} {(times[key] - prev).total_seconds() / 60:.1f}")
            prev = times[key]
    return f"{(end - start).total_seconds() / 60:.1f} min ({', '.join(parts)})"


def fmt(x):
    return "–" if x is None else f"{x:.3f}"


def main(runs):
    head = "| method | gIoU | cIoU | N-acc | T-acc | " + " | ".join(FAMILIES) + " | training wall time |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for run in map(Path, runs):
        r = json.loads((run / "eval_test.json").read_text())
        fam = " | ".join(fmt(r["per_family_gIoU"].get(f)) for f in FAMILIES)
        print(f"| {r['head']} | {fmt(r['gIoU'])} | {fmt(r['cIoU'])} | {fmt(r['N-acc'])} | {fmt(r['T-acc'])} | {fam} | "
              f"{wall(run / 'stages.txt')} |")


if __name__ == "__main__":
    main(sys.argv[1:])
