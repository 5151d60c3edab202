"""Time of one SFT training step (forward, backward, optimizer) for a model preset, with and
without the training speed-ups, on real prepared examples.

    python -m bench.train_step --preset smol --data data/sw30k --batch 16 --steps 5
    python -m bench.train_step --preset smol --batch 16 --all-logits --fp32-weights --flash   # before them

The speed-ups (all on by default): LM logits only from the last prompt position on (`--all-logits`
computes them everywhere), the LM's frozen package weights kept in bf16 under bf16 autocast
(`--fp32-weights` leaves them fp32, so autocast re-casts them every call) and math attention on CPU
(`--flash` uses the CPU flash kernel). Prints JSON: median seconds per step and per example over
the steps after the first (warm-up), the stage preset's settings used and, for a frozen vision
trunk, its forward time per step and share of the step (the most a feature cache could save) and
the size of one example's trunk maps in fp16 (what such a cache would hold per scene).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smol", help="stage preset (training/configs.py): tiny | smol | smol-gpu")
    p.add_argument("--data", default="data/sw30k")
    p.add_argument("--split", default="val")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed steps (plus one warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mixed-precision", default=None, help="override the preset's (no | bf16)")
    p.add_argument("--all-logits", action="store_true")
    p.add_argument("--fp32-weights", action="store_true")
    p.add_argument("--flash", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from accelerate import Accelerator

    from segcompass.build import build_model
    from segcompass.tokenizer import build_word_tokenizer
    from training.configs import model_config, stage_config
    from training.examples import collate, corpus, load_examples
    from training.parts import attention_kernel, set_trainable, with_runnable_precision
    from training.sft import sft_loss, sft_setup

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    overrides = {"batch_size": args.batch}
    if args.mixed_precision:
        overrides["mixed_precision"] = args.mixed_precision
    cfg = stage_config("sft", args.preset, overrides)
    requested = cfg.mixed_precision
    if not args.mixed_precision:  # the preset's, resolved as the stages do (bf16 -> no on a CPU without fast bf16)
        cfg = with_runnable_precision(cfg, torch.device("cpu"))
    mc = model_config(cfg)
    n = args.batch * (args.steps + 1)
    examples = load_examples(args.data, args.split, mc, n)
    if len(examples) < n:
        raise SystemExit(f"{args.data}/{args.split} has {len(examples)} examples; {n} needed")
    model = build_model(mc, tokenizer=build_word_tokenizer(corpus(examples))).train()
    set_trainable(model, "sft")
    cpu = torch.device("cpu")
    logits = "all" if args.all_logits else "completion"
    batches = [collate(examples[i * args.batch:(i + 1) * args.batch]) for i in range(args.steps + 1)]
    optimizer, aux_head, vocab = sft_setup(model, cfg, batches[0], cpu, cast_weights=not args.fp32_weights)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    model, optimizer = accelerator.prepare(model, optimizer)
    kernel = (lambda: contextlib.nullcontext()) if args.flash else (lambda: attention_kernel(cpu))
    times = []
    for batch in batches:
        t = time.perf_counter()
        with accelerator.autocast(), kernel():
            loss, _ = sft_loss(model, batch, cfg, cpu, aux_head, vocab, logits=logits)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        times.append(time.perf_counter() - t)
    step = statistics.median(times[1:])
    # The frozen vision trunk's share of a step: what caching its features could save at most.
    trunk_times, trunk_bytes = [], 0
    vision = accelerator.unwrap_model(model).vision
    if hasattr(vision, "trunk"):
        for batch in batches:
            t = time.perf_counter()
            with torch.no_grad(), accelerator.autocast():
                maps = vision.trunk(batch.pixels)
            trunk_times.append(time.perf_counter() - t)
        trunk_bytes = sum(m[0].numel() for m in maps.values()) * 2  # one example's maps in fp16
    result = {"preset": args.preset, "batch": args.batch, "threads": args.threads,
              "mixed_precision": cfg.mixed_precision, "mixed_precision_requested": requested, "logits": logits,
              "frozen_weights": "fp32" if args.fp32_weights or cfg.mixed_precision != "bf16" else "bf16",
              "attention": "flash" if args.flash else "math", "steps_timed": args.steps,
              "s_per_step": round(step, 3), "s_per_example": round(step / args.batch, 4),
              "loss_last": round(float(loss.detach()), 4)}
    if trunk_times:
        trunk = statistics.median(trunk_times[1:])
        result.update(trunk_s_per_step=round(trunk, 3), trunk_share=round(trunk / step, 3),
                      trunk_cache_mb_per_example_fp16=round(trunk_bytes / 2**20, 2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
