"""Evaluation exactly as a user runs the model: `encode` + `decode` per example, no ground truth
used to choose slots; scores per shared/spec/shapeworld.md (segcompass.metrics)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def resolve_split(data: str | Path, split: str | None) -> tuple[Path, str | None]:
    """DIR may be a split folder of pairs, or hold train/ val/ test/ (then `split`, default test)."""
    root = Path(data)
    if any(root.glob("*.json")):
        return root, None
    return root, split or "test"


def predictions(model, samples, batch_size: int = 16):
    """Yield (sample, Trace or None, Prediction or None) in order: encode in batches (`encode_batch`), decode each.
    A batch that fails is redone one example at a time, so one bad example fails alone (None)."""
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        try:
            traces = model.encode_batch([s.load_image() for s in chunk], [s.texts[0] for s in chunk])
            preds = [model.decode(t) for t in traces]
        except (ValueError, RuntimeError):
            traces, preds = [], []
            for sample in chunk:
                try:
                    traces.append(model.encode(sample.load_image(), sample.texts[0]))
                    preds.append(model.decode(traces[-1]))
                except (ValueError, RuntimeError) as err:  # a failed prediction scores as an empty mask
                    log.warning("%s: prediction failed: %s", sample.name, err)
                    traces += [None] * (len(preds) + 1 - len(traces))
                    preds.append(None)
        yield from zip(chunk, traces, preds)


def evaluate(checkpoint: str | Path, data: str | Path, split: str | None = None, limit: int | None = None,
             save_masks: str | Path | None = None, model=None, batch_size: int = 16, offset: int = 0,
             ground_regions: bool | None = None, repair: bool | None = None, rows: str | Path | None = None) -> dict:
    """Score a checkpoint on examples [offset, offset + limit) of a split. `ground_regions` / `repair` switch
    segcompass.grounding / segcompass.repair on or off in the model's in-memory config (None: as the checkpoint
    says; nothing is written to disk). `rows`: also write one JSON line per example (name, family, IoU, CoT, why
    it was repaired) there, for paired comparisons."""
    from PIL import Image
    from tqdm import tqdm

    from segcompass.metrics import Scoreboard
    from segcompass.model import SegCompass
    from training.common import default_device
    from training.data.loaders import load_reasonseg

    model = model if model is not None else SegCompass.from_pretrained(checkpoint, device=default_device())
    model.eval()
    model.config = model.config.inference(ground_regions, repair)
    folder, split = resolve_split(data, split)
    samples = load_reasonseg(folder, split)[offset:]
    if limit is not None:
        samples = samples[:limit]
    if save_masks:
        Path(save_masks).mkdir(parents=True, exist_ok=True)
    board = Scoreboard()
    failures = 0
    start = time.perf_counter()
    lines = None if rows is None else open_rows(rows)
    for sample, trace, prediction in tqdm(predictions(model, samples, batch_size), total=len(samples), desc="eval",
                                          unit="ex"):
        gt = sample.gt_mask()
        pred = None if prediction is None else prediction.mask
        failures += prediction is None
        score = board.add(pred, gt, sample.family)
        if lines is not None:
            lines.write(json.dumps({"name": sample.name, "family": sample.family, "iou": score,
                                    "cot": None if trace is None else trace.cot,
                                    "repair": None if trace is None else trace.repair}) + "\n")
        if save_masks:
            out = np.zeros(gt.shape, np.uint8) if pred is None else pred.astype(np.uint8) * 255
            Image.fromarray(out).save(Path(save_masks) / f"{sample.name}.png")
    if lines is not None:
        lines.close()
    s = board.result()
    return {
        "checkpoint": str(checkpoint), "data": str(folder), "split": split, "head": model.config.head,
        "offset": offset, "ground_regions": model.config.lm.ground_regions, "repair": model.config.lm.repair,
        "gIoU": s.giou, "cIoU": s.ciou, "N-acc": s.n_acc, "T-acc": s.t_acc, "count": s.count,
        "per_family_gIoU": s.per_family, "family_counts": s.family_counts, "failures": failures,
        "seconds": time.perf_counter() - start,
    }


def open_rows(path: str | Path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return open(path, "w")


def run_eval(args) -> int:
    result = evaluate(args.checkpoint, args.data, args.split, args.limit, args.save_masks,
                      batch_size=args.batch_size, offset=args.offset, ground_regions=args.ground_regions,
                      repair=args.repair, rows=args.rows)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


def calibrate(checkpoint: str | Path, data: str | Path, split: str = "val", limit: int | None = None,
              out_checkpoint: str | Path | None = None, thresholds=None, batch_size: int = 16, dtype=None,
              top_slot: bool = False) -> dict:
    """Pick the decode's one global decision rule on a held-out split: the slot confidence threshold
    and, with `top_slot`, also the top-slot threshold (`segcompass.slot_mapper.kept_slots`; else it is
    off). Encodes + decodes each example once, then scores the union of the kept slots under every
    candidate (pairs: top-slot threshold below the confidence threshold, or off). Writes the checkpoint
    with the best to out_checkpoint (weights cast to `dtype`, e.g. torch.float16 for a shipped
    checkpoint; None keeps them). `top_slot` is off by default: on smol run 6 the pair won 0.016 val
    gIoU over the threshold alone and lost 0.012 on test (docs/results.md, "smol, run 6")."""
    import dataclasses

    from tqdm import tqdm

    from segcompass.metrics import Scoreboard
    from segcompass.model import SegCompass
    from segcompass.slot_mapper import kept_slots
    from training.common import default_device
    from training.data.loaders import load_reasonseg

    model = SegCompass.from_pretrained(checkpoint, device=default_device()).eval()
    folder, split = resolve_split(data, split)
    samples = load_reasonseg(folder, split)[:limit]
    thresholds = thresholds if thresholds is not None else [round(t, 2) for t in np.arange(0.05, 0.96, 0.05)]
    rules = [(t, top) for t in thresholds for top in [1.0] + ([u for u in thresholds if u < t] if top_slot else [])]
    boards = {rule: Scoreboard() for rule in rules}
    for sample, _, pred in tqdm(predictions(model, samples, batch_size), total=len(samples),
                                desc=f"calibrate on {split}", unit="ex"):
        gt = sample.gt_mask()
        for rule in rules:
            mask = None if pred is None else pred.slot_masks[kept_slots(pred.confidences, *rule).numpy()].any(axis=0)
            boards[rule].add(mask, gt, sample.family)
    score = {rule: boards[rule].result().giou for rule in rules}
    # ties: the simpler rule (top-slot rule off), then the threshold nearest 0.5
    best_t, best_top = max(rules, key=lambda r: (score[r], r[1] == 1.0, -abs(r[0] - 0.5), r[1]))
    mask_cfg = model.config.mask
    result = {"split": split, "count": len(samples),
              "sweep_gIoU": {t: score[(t, 1.0)] for t in thresholds},  # confidence threshold alone
              "best_gIoU_by_top_slot_threshold": {top: max(score[r] for r in rules if r[1] == top)
                                                  for top in sorted({r[1] for r in rules})},
              "threshold": best_t, "top_slot_threshold": best_top, "gIoU": score[(best_t, best_top)],
              "previous_threshold": mask_cfg.confidence_threshold,
              "previous_top_slot_threshold": mask_cfg.top_slot_threshold}
    if out_checkpoint is not None:
        model.config = model.config.replace(mask=dataclasses.replace(
            mask_cfg, confidence_threshold=best_t, top_slot_threshold=best_top))
        model.save_pretrained(out_checkpoint, dtype=dtype)
        result["checkpoint"] = str(out_checkpoint)
    log.info("confidence threshold %.2f, top-slot threshold %.2f (val gIoU %.4f; threshold alone at best %.4f)",
             best_t, best_top, score[(best_t, best_top)], max(result["sweep_gIoU"].values()))
    return result


def run_calibrate(args) -> int:
    import torch

    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    result = calibrate(args.checkpoint, args.data, args.split, args.limit, args.out_checkpoint,
                       batch_size=args.batch_size, dtype=dtype, top_slot=args.top_slot)
    print(json.dumps(result, indent=2))
    return 0
