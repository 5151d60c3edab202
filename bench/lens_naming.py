"""How well the visual tokens name their objects through the logit lens (what `segcompass.verify` reads).

For each example: one forward of the prompt (`encode` with a 1-token budget), then `segcompass.verify.perceive`;
reports, over tokens under an object (ShapeWorld `objects`, the naming loss's labels), the share whose most likely
colour / shape / size word is right, and over the other (background) tokens the median probability of their most
likely colour x shape pair (the loss never trained them, so a high value means background can seem to show an object),
and how well `segcompass.verify.seen_objects` (what the verifier compares an answer against) finds the scene's
objects: found (same colour, shape and size, centre within SAME_OBJECT px), extra, and the found ones' centre error.

    python -m bench.lens_naming --checkpoint assets/checkpoints/smol --data data/sw30k --split val --limit 60
"""

from __future__ import annotations

import argparse
import json
import math
import os


def match_seen(seen, objects, radius: float) -> tuple[int, int, list[float]]:
    """(found, extra, centre errors in px): each ShapeWorld object matched to at most one seen object with its
    colour, shape and size whose centre is within `radius`, nearest first."""
    free = list(seen)
    found, errors = 0, []
    for obj in objects:
        same = [o for o in free if (o.colour, o.shape, o.size) == (obj["color"], obj["shape"], obj["size"])]
        near = min(same, key=lambda o: math.dist(o.xy, obj["center"]), default=None)
        if near is not None and math.dist(near.xy, obj["center"]) <= radius:
            free.remove(near)
            found += 1
            errors.append(math.dist(near.xy, obj["center"]))
    return found, len(free), errors


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="assets/checkpoints/smol")
    p.add_argument("--data", default="data/sw30k")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from segcompass.model import SegCompass
    from segcompass.verify import SAME_OBJECT, SINGLE_PROB, perceive, seen_objects
    from training.data.loaders import load_reasonseg
    from training.examples import token_labels

    torch.set_num_threads(args.threads)
    model = SegCompass.from_pretrained(args.checkpoint)
    grid, size = model.config.vision.token_grid, model.config.vision.image_size
    right, labelled, background = torch.zeros(3), 0, []
    objects, found, extra, errors = 0, 0, 0, []
    strict = [0, 0]  # found, extra with a lone token needing SINGLE_PROB (what segcompass.repair reads)
    for s in load_reasonseg(args.data, split=args.split)[: args.limit]:
        trace = model.encode(s.load_image(), s.texts[0], max_new_tokens=1)
        labels = token_labels(s, trace.valid_hw, size, grid)
        if labels is None:
            continue
        percept = perceive(model, trace)
        on = labels[:, 0] >= 0
        labelled += int(on.sum())
        for i, logp in enumerate((percept.colour, percept.shape, percept.size)):
            right[i] += (logp.argmax(1)[on] == labels[on, i]).sum()
        background.append((percept.colour.max(1).values + percept.shape.max(1).values)[~on].exp())
        f, x, e = match_seen(seen_objects(percept), s.objects or (), SAME_OBJECT)
        objects, found, extra, errors = objects + len(s.objects or ()), found + f, extra + x, errors + e
        f, x, _ = match_seen(seen_objects(percept, single_prob=SINGLE_PROB), s.objects or (), SAME_OBJECT)
        strict = [strict[0] + f, strict[1] + x]
    bg = torch.cat(background) if background else torch.zeros(0)
    report = {"checkpoint": args.checkpoint, "split": args.split, "labelled_tokens": labelled,
              "accuracy_colour_shape_size": [round(float(r) / max(1, labelled), 3) for r in right],
              "background_tokens": len(bg),
              "background_median_top_pair_probability": round(float(bg.median()), 3) if len(bg) else None,
              "objects": objects, "seen_found": found, "seen_extra": extra,
              "seen_median_centre_error_px": round(float(torch.tensor(errors).median()), 1) if errors else None,
              f"seen_found_extra_lone_token_at_{SINGLE_PROB}": strict}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
