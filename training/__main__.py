"""python -m training {sft,sae,joint,eval} ...  (thin: heavy imports happen inside each stage)

    python -m training sft   --run runs/tiny/sft   [--head segcompass|latent_query|box_text] [--set key=value ...]
                             [--init CHECKPOINT]   (train a checkpoint further instead of a fresh model)
                             [--model smol | qwen2.5-vl-7b --lm-path VLM_DIR --sam-path SAM_DIR | config.json]
    python -m training sae   --init runs/tiny/sft/model   --run runs/tiny/sae   [--set kind=relu ...]
    python -m training joint --init runs/tiny/sae/model   --run runs/tiny/joint [--set group_size=8 ...]
    python -m training refit --init runs/tiny/joint/model --run runs/tiny/refit [--set minutes=20 ...]
    python -m training calibrate --checkpoint runs/tiny/joint/model --data DIR --out-checkpoint runs/tiny/final [--dtype fp16]
    python -m training eval  --checkpoint DIR --data DIR [--split val] [--limit N] [--out FILE] [--save-masks DIR]

Every training stage resumes from RUN/trainer_state.pt + RUN/model/ when they exist (--fresh to restart).
"""

from __future__ import annotations

import argparse
import os
import sys

from segcompass.predict import add_inference_switches


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="stage", required=True)
    for stage in ("sft", "sae", "joint", "refit"):
        s = sub.add_parser(stage, help=f"the {stage} stage")
        s.add_argument("--run", required=True, help="run folder (model/, trainer_state.pt, logs)")
        s.add_argument("--preset", default="tiny", help="stage preset (tiny | smoke)")
        s.add_argument("--data", default=None, help="ReasonSeg-layout data set folder (default data/shapeworld)")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
        s.add_argument("--fresh", action="store_true", help="ignore an existing trainer state")
        s.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
        if stage == "sft":
            s.add_argument("--head", default=None, choices=["segcompass", "latent_query", "box_text"])
            s.add_argument("--model", default=None,
                           help="model preset (tiny | smol | qwen2.5-vl-7b | llava-1.5-7b | llava-1.5-13b) or config.json")
            s.add_argument("--lm-path", default=None, help="full scale: local Hugging Face VLM folder")
            s.add_argument("--sam-path", default=None, help="full scale: local SAM folder (SamModel format)")
            s.add_argument("--init", default=None,
                           help="start from this checkpoint's weights (e.g. assets/checkpoints/smol) instead of a "
                                "fresh model; its preset, head and tokenizer are kept")
        else:
            s.add_argument("--init", required=True, help="checkpoint folder the stage starts from")
    e = sub.add_parser("eval", help="evaluate a checkpoint with encode + decode")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data", required=True, help="a split folder of pairs, or a folder holding train/ val/ test/")
    e.add_argument("--split", default=None, help="split sub-folder (default test when DIR holds splits)")
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--offset", type=int, default=0, help="skip this many examples of the split first")
    add_inference_switches(e)
    e.add_argument("--rows", default=None, help="also write one JSON line per example (name, family, IoU, CoT) here")
    e.add_argument("--out", default=None, help="also write the JSON here")
    e.add_argument("--save-masks", default=None, help="write each predicted mask as NAME.png here")
    e.add_argument("--threads", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=16, help="examples generated together (greedy, batched)")
    c = sub.add_parser("calibrate", help="pick the slot confidence threshold on a held-out split")
    c.add_argument("--checkpoint", required=True)
    c.add_argument("--data", required=True)
    c.add_argument("--split", default="val")
    c.add_argument("--limit", type=int, default=None)
    c.add_argument("--out-checkpoint", required=True, help="where the calibrated checkpoint is written")
    c.add_argument("--threads", type=int, default=0)
    c.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="weights of the written checkpoint (the shipped smol one is fp16)")
    c.add_argument("--batch-size", type=int, default=16, help="examples generated together (greedy, batched)")
    c.add_argument("--top-slot", action="store_true",
                   help="also pick a top-slot threshold (kept_slots); off: on smol run 6 it won 0.016 on val, lost 0.012 on test")
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = _parser().parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stage == "eval":
        from .evaluate import run_eval

        return run_eval(args)
    if args.stage == "calibrate":
        from .evaluate import run_calibrate

        return run_calibrate(args)
    from .configs import parse_override, stage_config

    overrides = dict(parse_override(kv) for kv in args.set)
    if args.data:
        overrides["data"] = args.data
    if args.stage == "sft":
        if args.head:
            overrides["head"] = args.head
            if args.init:  # an explicit head for a checkpoint: swap it in if the checkpoint has another
                overrides["swap_head"] = True
        for key, value in (("preset", args.model), ("lm_path", args.lm_path), ("sam_path", args.sam_path)):
            if value:
                overrides[key] = value
        from .sft import run_sft

        run_sft(stage_config("sft", args.preset, overrides), args.run, resume=not args.fresh, init=args.init)
    elif args.stage == "sae":
        from .sae_stage import run_sae

        run_sae(stage_config("sae", args.preset, overrides), args.init, args.run, resume=not args.fresh)
    elif args.stage == "refit":
        from .refit import run_refit

        run_refit(stage_config("refit", args.preset, overrides), args.init, args.run, resume=not args.fresh)
    else:
        from .joint import run_joint

        run_joint(stage_config("joint", args.preset, overrides), args.init, args.run, resume=not args.fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
