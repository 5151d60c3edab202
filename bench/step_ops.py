"""What one SFT step dispatches: ATen op calls (each one or more GPU kernel launches) and
device-to-host syncs, per part of the model, plus the host-only work of the step (collate,
tokenizing and packing the prompts), on CPU.

An accelerator runs a small model like smol launch-bound: with ~5-20 us of host overhead per
op, the op count times that is a floor on the step time that a faster GPU does not lower, and
every sync (`.item()`, `float(t)`, `bool(t)`, `.cpu()`) stalls the host until the GPU queue drains.
This counts both where no GPU is at hand.

    python -m bench.step_ops --preset smol-gpu --data data/sw30k --batch 32

Counts the second step (the first also creates the optimizer state). Prints JSON: per part
("vision", "language", "sae", "codebook", "slot_mapper", "mask_decoder", "loss" = everything in the
step outside those modules' forward, "backward", "optimizer" = the foreach AdamW that CUDA runs by
default; a part only called through methods of a module without submodules, like the SAE's encode,
counts where it is called from), the number of op calls and of syncs (`aten::_local_scalar_dense`,
what `.item()` and friends call), the Hungarian matchings (each a host solve) and the host seconds
of collate and of the prompt tokenizing/packing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections import Counter

PARTS = ("vision", "language", "sae", "codebook", "slot_mapper", "mask_decoder")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smol-gpu", help="stage preset (training/configs.py)")
    p.add_argument("--data", default="data/sw30k")
    p.add_argument("--split", default="val")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=8, help="most frequent ops listed per part")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    import training.losses as losses
    from segcompass.build import build_model
    from segcompass.tokenizer import build_word_tokenizer
    from training.configs import model_config, stage_config
    from training.examples import collate, corpus, load_examples, pack_reference
    from training.parts import attention_kernel, set_trainable
    from training.sft import sft_loss, sft_setup

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = stage_config("sft", args.preset, {"batch_size": args.batch, "mixed_precision": "no"})
    mc = model_config(cfg)
    examples = load_examples(args.data, args.split, mc, 2 * args.batch)
    if len(examples) < 2 * args.batch:
        raise SystemExit(f"{args.data}/{args.split} has {len(examples)} examples; {2 * args.batch} needed")
    model = build_model(mc, tokenizer=build_word_tokenizer(corpus(examples))).train()
    set_trainable(model, "sft")
    cpu = torch.device("cpu")
    optimizer, aux_head, vocab = sft_setup(model, cfg, collate(examples[:args.batch]), cpu, cast_weights=False)
    for group in optimizer.param_groups:  # what AdamW does on CUDA; its CPU default loops over the tensors
        group["foreach"] = True
    chosen = examples[args.batch:2 * args.batch]

    t = time.perf_counter()
    batch = collate(chosen)
    collate_s = time.perf_counter() - t
    t = time.perf_counter()
    pack_reference(model, chosen, model.config.head)
    tokenize_s = time.perf_counter() - t

    phase = ["loss"]
    ops: dict[str, Counter] = {}

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args_=(), kwargs=None):
            ops.setdefault(phase[-1], Counter())[str(func.overloadpacket.__name__)] += 1
            return func(*args_, **(kwargs or {}))

    def enter(name):
        return lambda *_: phase.append(name)  # list.append returns None: the input is kept

    def leave(*_):
        phase.pop()  # returns None, so the module's output is kept

    handles = []
    for name in PARTS:
        module = getattr(model, name, None)
        # every submodule: the model calls some parts through methods (language.step, sae.encode), not forward
        for sub in (module.modules() if module is not None else ()):
            handles.append(sub.register_forward_pre_hook(enter(name)))
            handles.append(sub.register_forward_hook(leave))
    hungarian = [0]
    solve = losses.hungarian_match

    def counted(score):
        hungarian[0] += 1
        return solve(score)

    losses.hungarian_match = counted

    def step(count: bool):
        with (Count() if count else contextlib.nullcontext()), attention_kernel(cpu):
            loss, _ = sft_loss(model, batch, cfg, cpu, aux_head, vocab)
            optimizer.zero_grad(set_to_none=True)
            phase.append("backward")
            loss.backward()
            phase[-1] = "optimizer"
            optimizer.step()
            phase.pop()

    try:
        step(count=False)  # the first step creates the optimizer state; the second is every later step
        ops.clear()
        hungarian[0] = 0
        step(count=True)
    finally:
        losses.hungarian_match = solve
        for h in handles:
            h.remove()

    parts = {}
    for name, counter in ops.items():
        parts[name] = {"ops": sum(counter.values()), "syncs": counter.get("_local_scalar_dense", 0),
                       "top": dict(counter.most_common(args.top))}
    result = {"preset": args.preset, "batch": args.batch,
              "ops_total": sum(v["ops"] for v in parts.values()),
              "syncs_total": sum(v["syncs"] for v in parts.values()),
              "hungarian_matchings": hungarian[0],
              "host_collate_s": round(collate_s, 4), "host_tokenize_pack_s": round(tokenize_s, 4),
              "parts": dict(sorted(parts.items(), key=lambda kv: -kv[1]["ops"]))}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
