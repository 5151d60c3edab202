"""Latency of the `smol` model on CPU: vision encoder, encode (prompt + CoT generation), decode.

    python bench/bench_smol.py [--threads 2] [--tokens 32] [--repeats 3] [--checkpoint DIR] [--no-merge]

Without --checkpoint it builds an untrained smol model (same compute as a trained one). Reports
the median over repeats; tokens/s counts generated tokens only (the prompt's ~100 tokens, 64
of them visual, are the "prefill" part of encode).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", type=int, default=32, help="CoT budget (max_new_tokens)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--no-merge", action="store_true", help="keep LoRA unmerged (the training layout)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import numpy as np
    import torch

    from segcompass.build import build_model
    from segcompass.model import SegCompass
    from segcompass.smol import count_parameters, merge_adapters

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = SegCompass.from_pretrained(args.checkpoint) if args.checkpoint else build_model("smol").eval()
    build_s = time.perf_counter() - t0
    trainable, total = count_parameters(model)
    merged = False if args.no_merge else merge_adapters(model)
    image = np.full((240, 320, 3), 128, np.uint8)
    image[40:120, 60:140] = (220, 40, 40)
    # Force the full budget: an untrained model may stop at once, so EOS / <REF_POS> never end it here.
    lang = model.language
    stop_ids = (lang.eos_id, lang.ref_id)
    if not args.checkpoint:
        lang.eos_id = lang.ref_id = -1

    vision, encode, decode, tokens = [], [], [], []
    with torch.no_grad():
        pixels = model.prepare(image).pixels[None]
        model.vision(pixels)  # warm-up
        model.encode(image, "the red square", max_new_tokens=4)
        for _ in range(args.repeats):
            t = time.perf_counter()
            model.vision(pixels)
            vision.append(time.perf_counter() - t)
            t = time.perf_counter()
            trace = model.encode(image, "the red square", max_new_tokens=args.tokens)
            encode.append(time.perf_counter() - t)
            tokens.append(len(trace.tokens) - trace.prompt_length)
            t = time.perf_counter()
            model.decode(trace)
            decode.append(time.perf_counter() - t)
        prompt_len = trace.prompt_length
        # Prefill alone: the same encode with a one-token budget.
        prefill = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            model.encode(image, "the red square", max_new_tokens=1)
            prefill.append(time.perf_counter() - t)
    lang.eos_id, lang.ref_id = stop_ids
    med = statistics.median
    gen_s = med(encode) - med(prefill)
    print(f"threads {args.threads}  LoRA merged {merged}  build {build_s:.1f} s  params {trainable / 1e6:.2f}M trainable / {total / 1e6:.1f}M")
    print(f"vision encoder   {1000 * med(vision):7.1f} ms")
    print(f"encode prefill   {1000 * med(prefill):7.1f} ms  ({prompt_len} prompt tokens)")
    print(f"encode total     {1000 * med(encode):7.1f} ms  ({med(tokens):.0f} generated tokens, "
          f"{(med(tokens) - 1) / max(gen_s, 1e-9):.1f} tok/s after prefill)")
    print(f"decode           {1000 * med(decode):7.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
