"""Command line: segment one image.

    python -m segcompass.predict --checkpoint DIR --image IMG --instruction TEXT --out mask.png [--json out.json]
        [--verify N]   # sample N more chains of thought, keep the one the image supports best
        [--no-repair] [--no-ground-regions]   # the language model's own greedy CoT, as it wrote it
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from .defaults import resolve_checkpoint

log = logging.getLogger("segcompass.predict")


def add_inference_switches(parser: argparse.ArgumentParser) -> None:
    """--ground-regions / --repair (and their --no- forms); unset, each is as the checkpoint's config says."""
    parser.add_argument("--ground-regions", action=argparse.BooleanOptionalAction, default=None,
                        help="write the CoT's places where the visual tokens see the objects (segcompass.grounding; "
                             "default: as the checkpoint's config says)")
    parser.add_argument("--repair", action=argparse.BooleanOptionalAction, default=None,
                        help="rewrite a CoT whose decision the visual tokens contradict (segcompass.repair; "
                             "default: as the checkpoint's config says)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the best shipped one)")
    parser.add_argument("--image", required=True)
    parser.add_argument("--instruction", required=True)
    parser.add_argument("--out", required=True, help="where to write the binary mask PNG (0/255)")
    parser.add_argument("--json", default=None, help="also write the CoT, slots and concepts as JSON")
    parser.add_argument("--stream", action="store_true", help="print the CoT token by token to stderr")
    parser.add_argument("--verify", type=int, default=0, metavar="N",
                        help="also sample N chains of thought and keep the one whose claims the image supports best "
                             "(segcompass.verify; about N + 1 times the generation time)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of --verify")
    add_inference_switches(parser)
    args = parser.parse_args(argv)
    if args.verify < 0:
        parser.error("--verify must be >= 0")
    if args.verify and args.stream:
        parser.error("--stream shows one greedy CoT; it cannot be combined with --verify")
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from PIL import Image

    from .checkpoint import CheckpointError
    from .model import SegCompass
    from .repair import REWRITE_MARK
    from .vision import to_rgb_array

    try:
        model = SegCompass.from_pretrained(resolve_checkpoint(args.checkpoint))
        model.config = model.config.inference(args.ground_regions, args.repair)
        image = to_rgb_array(args.image)
        candidates = None
        if args.verify:
            import torch

            from .verify import best_of

            trace, candidates = best_of(model, image, args.instruction, args.verify,
                                        generator=torch.Generator().manual_seed(args.seed))
        else:
            on_token = (lambda s: print("\n[rewritten]" if s == REWRITE_MARK else s, end=" ", file=sys.stderr,
                                        flush=True)) if args.stream else None
            trace = model.encode(image, args.instruction, on_token=on_token)
        pred = model.decode(trace)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        log.error("error: %s", err)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pred.mask.astype(np.uint8) * 255).save(args.out)
    if candidates:
        for c in candidates:
            log.info("candidate (%s): %s", "unscored" if c["score"] is None else f"{c['score']:.2f}", c["cot"])
    log.info("cot: %s", trace.cot)
    if trace.repair:
        log.info("rewritten where the visual tokens contradicted the language model: %s", trace.repair)
    log.info("mask: %d pixels -> %s", int(pred.mask.sum()), args.out)
    if args.json:
        from .concepts import top_concepts

        record = {
            "instruction": trace.instruction, "cot": trace.cot, "completion": trace.completion, "repair": trace.repair,
            "reference_token_found": trace.ref_found,
            "slot_confidences": [round(float(c), 4) for c in pred.confidences],
            "kept_slots": pred.kept_slots, "mask_pixels": int(pred.mask.sum()),
            "image_size": list(trace.original_size),
            "concepts": [c.to_dict() for c in top_concepts(model, trace, limit=20)],
        }
        if candidates:
            record["verified_candidates"] = candidates
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
