"""Command line: segment one image.

    python -m segcompass.predict --checkpoint DIR --image IMG --instruction TEXT --out mask.png [--json out.json]
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the best shipped one)")
    parser.add_argument("--image", required=True)
    parser.add_argument("--instruction", required=True)
    parser.add_argument("--out", required=True, help="where to write the binary mask PNG (0/255)")
    parser.add_argument("--json", default=None, help="also write the CoT, slots and concepts as JSON")
    parser.add_argument("--stream", action="store_true", help="print the CoT token by token to stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from PIL import Image

    from .checkpoint import CheckpointError
    from .model import SegCompass
    from .vision import to_rgb_array

    try:
        model = SegCompass.from_pretrained(resolve_checkpoint(args.checkpoint))
        image = to_rgb_array(args.image)
        on_token = (lambda s: print(s, end=" ", file=sys.stderr, flush=True)) if args.stream else None
        trace = model.encode(image, args.instruction, on_token=on_token)
        pred = model.decode(trace)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        log.error("error: %s", err)
        return 2
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pred.mask.astype(np.uint8) * 255).save(args.out)
    log.info("cot: %s", trace.cot)
    log.info("mask: %d pixels -> %s", int(pred.mask.sum()), args.out)
    if args.json:
        from .concepts import top_concepts

        record = {
            "instruction": trace.instruction, "cot": trace.cot, "completion": trace.completion,
            "reference_token_found": trace.ref_found,
            "slot_confidences": [round(float(c), 4) for c in pred.confidences],
            "kept_slots": pred.kept_slots, "mask_pixels": int(pred.mask.sum()),
            "image_size": list(trace.original_size),
            "concepts": [c.to_dict() for c in top_concepts(model, trace, limit=20)],
        }
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
