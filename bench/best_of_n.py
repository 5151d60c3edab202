"""Best-of-N reasoning: does sampling several chains of thought and keeping the best one by some rule help?

For each example: the greedy CoT (what `encode` gives) and `--n` CoTs sampled at `--temperature`, each
decoded into a mask. Reports the gIoU of
- `greedy`: the greedy CoT (the shipped behaviour);
- `oracle`: the best of the n + 1 candidates by true IoU (an upper bound no selector reaches);
- `max_conf`: the candidate whose most confident slot is most confident (no ground truth used);
- `mean_conf`: the candidate with the highest mean slot confidence;
- `vote`: the answer ("answer : ...") named most often, ties to the greedy CoT, then to the earlier sample;
- `verified`: the candidate whose claims the model's own visual tokens support best (`segcompass.verify`,
  what `segcompass.predict --verify N` and the explorer's "Check the reasoning" keep);
for every n' <= n (the first n' samples), with a 95 % bootstrap interval of `verified - greedy`, and the
gIoU per family of greedy / max_conf / verified / oracle at n. Costs about n + 1 generations per example
(one image at a time, the samples batched): ~20-25 s per example for smol at n = 6 on 2 CPU cores.
`--out` keeps every candidate and the visual tokens' percept; `--from` re-scores such a file with the
current verifier in seconds (no model).

    python -m bench.best_of_n --checkpoint assets/checkpoints/smol --data data/sw30k --split val --limit 60 --n 6
    python -m bench.best_of_n --split test --offset 120 --limit 120 --n 6 --out runs/bon.json
    python -m bench.best_of_n --from runs/bon.json
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter, defaultdict

import numpy as np

from bench.diagnose_cot import answer_phrase
from bench.paired import interval
from segcompass.verify import Percept, choose, perceive, sample_traces, verify


def select(cands: list[dict], rule: str) -> dict:
    """The candidate a rule keeps; `cands[0]` is the greedy one. Each candidate: iou, conf (per slot), answer."""
    if rule == "greedy":
        return cands[0]
    if rule == "oracle":
        return max(cands, key=lambda c: c["iou"])
    if rule == "max_conf":
        return max(cands, key=lambda c: max(c["conf"]))
    if rule == "mean_conf":
        return max(cands, key=lambda c: float(np.mean(c["conf"])))
    if rule == "verified":  # the best-supported claims (segcompass.verify); naming no object counts as greedy
        return cands[choose([c.get("verify") for c in cands])]
    if rule == "vote":
        votes = Counter(c["answer"] for c in cands)
        return max(cands, key=lambda c: votes[c["answer"]])  # max keeps the first of equals: greedy, then order
    raise ValueError(f"unknown rule {rule!r}")


RULES = ("greedy", "oracle", "max_conf", "mean_conf", "vote", "verified")


def summarise(rows: list[dict], n: int, seed: int = 0) -> dict:
    out = {}
    for k in range(1, n + 1):
        scores = {rule: np.array([select(r["cands"][:k + 1], rule)["iou"] for r in rows]) for rule in RULES}
        out[f"n={k}"] = {**{rule: round(float(v.mean()), 3) for rule, v in scores.items()},
                         "verified_minus_greedy_95ci": interval(scores["verified"] - scores["greedy"], 2000, seed)}
    families = defaultdict(list)
    for r in rows:
        families[r["family"] or "?"].append([select(r["cands"], rule)["iou"]
                                             for rule in ("greedy", "max_conf", "verified", "oracle")])
    out["families_greedy_maxconf_verified_oracle"] = {f: [len(v)] + [round(float(x), 3) for x in np.mean(v, 0)]
                                             for f, v in sorted(families.items())}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="assets/checkpoints/smol")
    p.add_argument("--data", default="data/sw30k")
    p.add_argument("--split", default="val")
    p.add_argument("--offset", type=int, default=0, help="skip this many examples of the split first")
    p.add_argument("--limit", type=int, default=60)
    p.add_argument("--n", type=int, default=6, help="sampled CoTs per example (besides the greedy one)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="also write every candidate (CoT, IoU, confidences) as JSON here")
    p.add_argument("--ground-regions", action="store_true",
                   help="generate every candidate with grounded regions (segcompass.grounding)")
    p.add_argument("--from", dest="load", default=None, help="re-summarise the rows an earlier --out wrote (no model)")
    args = p.parse_args(argv)
    if args.load:
        with open(args.load) as f:
            saved = json.load(f)
        rows = saved["rows"]
        for r in rows:  # re-score with the current verifier
            percept = Percept.from_dict(r["percept"])
            for c in r["cands"]:
                c["verify"] = verify(percept, c["cot"])
        report = {**{k: saved["report"][k] for k in ("checkpoint", "split", "temperature")}, "count": len(rows),
                  **summarise(rows, len(rows[0]["cands"]) - 1, args.seed)}
        print(json.dumps(report, indent=2))
        return report
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from tqdm import tqdm

    from segcompass.metrics import iou
    from segcompass.model import SegCompass
    from training.data.loaders import load_reasonseg

    torch.set_num_threads(args.threads)
    model = SegCompass.from_pretrained(args.checkpoint)
    samples = load_reasonseg(args.data, split=args.split)[args.offset:args.offset + args.limit]
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for s in tqdm(samples, desc="best-of-n", unit="ex"):
        gt = s.gt_mask()
        traces = sample_traces(model, s.load_image(), s.texts[0], args.n, args.temperature, generator,
                               ground_regions=args.ground_regions)
        percept = perceive(model, traces[0])
        cands = []
        for trace in traces:
            pred = model.decode(trace)
            cands.append({"cot": trace.cot, "answer": answer_phrase(trace.cot), "iou": float(iou(pred.mask, gt)),
                          "conf": [round(float(c), 4) for c in pred.confidences], "verify": verify(percept, trace.cot)})
        rows.append({"name": s.name, "family": s.family, "cands": cands, "percept": percept.to_dict()})
    report = {"checkpoint": args.checkpoint, "split": args.split, "offset": args.offset, "count": len(rows),
              "temperature": args.temperature, "ground_regions": args.ground_regions,
              **summarise(rows, args.n, args.seed)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"report": report, "rows": rows}, f)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
