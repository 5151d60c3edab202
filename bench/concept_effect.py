"""How causal are the explorer's concept toggles? For each example, switch off each of the top listed
concepts one at a time (the explorer's fast path: `decode` with a ConceptEdit) and count the mask
pixels that change.

    python -m bench.concept_effect --checkpoint assets/checkpoints/tiny --data data/shapeworld --split val --limit 40

Prints JSON: per example the largest change over the top `--rows` concepts; their mean / median, the
share of examples where some toggle moves >= 50 pixels, and the mean change over all toggles.
Also: how much the mask leans on the reference token's state (gIoU and pixels changed when decode
sees that state as zeros, as `ref_dropout` trains it to). `--reason` adds the same for the slow
path ("Re-reason with these edits": the CoT regenerated with the edit spliced into layer L, then
decoded), and how many of the toggles change the CoT.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import numpy as np
import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="assets/checkpoints/tiny")
    parser.add_argument("--data", default="data/shapeworld")
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--rows", type=int, default=8, help="top listed concepts tried per example")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reason", action="store_true", help="also measure the re-reason slow path")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from segcompass.concepts import reason_effects, toggle_effects, top_concepts
    from segcompass.metrics import iou
    from segcompass.model import SegCompass
    from training.data.loaders import load_reasonseg

    model = SegCompass.from_pretrained(args.checkpoint).eval()
    samples = load_reasonseg(args.data, split=args.split)[: args.limit]
    best, every, slow_best, cot_changed, scores, zero_scores, zero_changes = [], [], [], [], [], [], []
    for s in samples:
        image = s.load_image()
        trace = model.encode(image, s.texts[0])
        gt, mask = s.gt_mask(), model.decode(trace).mask
        no_ref = model.decode(dataclasses.replace(trace, ref_state=torch.zeros_like(trace.ref_state))).mask
        scores.append(iou(mask, gt))
        zero_scores.append(iou(no_ref, gt))
        zero_changes.append(int(np.logical_xor(mask, no_ref).sum()))
        concepts = [c.concept for c in top_concepts(model, trace, limit=args.rows)]
        changes = toggle_effects(model, trace, concepts)
        best.append(max(changes, default=0))
        every.extend(changes)
        if args.reason:
            slow = reason_effects(model, image, trace, concepts)
            slow_best.append(max((px for px, _ in slow), default=0))
            cot_changed.extend(changed for _, changed in slow)
    slow_report = {} if not args.reason else {
        "reason_max_change_px_mean": float(np.mean(slow_best)),
        "reason_max_change_px_median": float(np.median(slow_best)),
        "reason_share_with_a_toggle_moving_50px": float(np.mean([b >= 50 for b in slow_best])),
        "reason_share_of_toggles_changing_the_cot": float(np.mean(cot_changed)) if cot_changed else 0.0,
    }
    print(json.dumps({
        "checkpoint": args.checkpoint, "examples": len(samples), "rows": args.rows,
        "max_change_px_mean": float(np.mean(best)), "max_change_px_median": float(np.median(best)),
        "share_with_a_toggle_moving_50px": float(np.mean([b >= 50 for b in best])),
        "change_px_mean_all_toggles": float(np.mean(every)) if every else 0.0,
        "gIoU": float(np.mean(scores)), "gIoU_reference_state_zeroed": float(np.mean(zero_scores)),
        "reference_state_zeroed_change_px_mean": float(np.mean(zero_changes)),
        **slow_report,
    }, indent=2))


if __name__ == "__main__":
    main()
