"""Which frozen EfficientNet-Lite0 maps know colour, shape and size? A linear probe per set of trunk
maps, each pooled to the smol token grid (the evidence behind the `multiscale` visual tokens;
bench.probe_tokens probes a trained checkpoint's tokens the same way).

    python -m bench.probe_trunk --data data/sw30k --train 2000

Prints JSON: per tap set, train and held-out accuracy per attribute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from bench.probe_tokens import fit_probe, labelled_examples
from training.examples import stack_pixels

DEFAULT_SETS = ("head", "stride32", "stride16.avg", "stride16.max", "stride8.max", "pixels",
                "head+stride32+stride16.avg+stride8.avg+stride8.max",
                "head+stride32+stride16.avg+stride8.avg+stride8.max+pixels")


def _taps(backbone, pixels: torch.Tensor, grid: int) -> dict[str, torch.Tensor]:
    """Every probed map pooled to grid x grid, as [B * grid², C]."""
    from segcompass.backbones.efficientnet_lite import PIXEL_MEAN, PIXEL_STD
    from segcompass.vision_efficientnet import pixel_stats, pool_to_grid

    feats = backbone.features((pixels * 255.0 - PIXEL_MEAN) / PIXEL_STD)
    out = {"head": pool_to_grid(feats["head"], grid, "avg"), "stride32": pool_to_grid(feats["stride32"], grid, "avg"),
           "pixels": pixel_stats(pixels, grid)}
    for name in ("stride16", "stride8"):
        for how in ("avg", "max"):
            out[f"{name}.{how}"] = pool_to_grid(feats[name], grid, how)
    return {k: v.flatten(2).transpose(1, 2).reshape(-1, v.shape[1]) for k, v in out.items()}


def _collect(backbone, examples, grid: int, batch_size: int = 32):
    feats: dict[str, list[torch.Tensor]] = {}
    labels = []
    with torch.inference_mode():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            labs = torch.stack([e.token_labels[:, :3] for e in chunk]).reshape(-1, 3)
            keep = labs[:, 0] >= 0  # only tokens over an object: the maps of all tokens would not fit
            for k, v in _taps(backbone, stack_pixels(chunk), grid).items():
                feats.setdefault(k, []).append(v[keep].clone())
            labels.append(labs[keep])
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/shapeworld")
    parser.add_argument("--train", type=int, default=2000, help="train examples for the probe")
    parser.add_argument("--split", default="val")
    parser.add_argument("--sets", default=";".join(DEFAULT_SETS), help="';'-separated sets of '+'-joined taps")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from segcompass.backbones.efficientnet_lite import load_efficientnet_lite0
    from segcompass.presets import get_preset

    config = get_preset("smol")
    train, held = labelled_examples(args.data, args.split, config, args.train)
    backbone = load_efficientnet_lite0(pretrained=True).eval()
    x_train, y_train = _collect(backbone, train, config.vision.token_grid)
    x_held, y_held = _collect(backbone, held, config.vision.token_grid)
    report = {"train_examples": len(train), "held_out": f"{args.split} ({len(held)})",
              "labelled_tokens": [len(y_train), len(y_held)], "sets": {}}
    for tap_set in args.sets.split(";"):
        names = tap_set.split("+")
        unknown = set(names) - set(x_train)
        if unknown:
            raise SystemExit(f"unknown taps {sorted(unknown)}; known: {sorted(x_train)}")
        train_acc, held_acc = fit_probe(torch.cat([x_train[n] for n in names], 1), y_train,
                                        torch.cat([x_held[n] for n in names], 1), y_held, args.steps)
        report["sets"][tap_set] = {"dims": sum(x_train[n].shape[1] for n in names), "train": train_acc,
                                   "held_out": held_acc}
        print(tap_set, report["sets"][tap_set], file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
