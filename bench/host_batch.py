"""Host-side cost of one training batch: what the training process does on the CPU before the device works.

Every SFT / joint step collates its examples (the uint8 images stacked) and packs the reference
completions (prompt + chain of thought tokenised and padded); on a GPU this runs in the training
process between device steps, so it bounds the step rate. Session 19's H200 SFT ran 0.52 s per step of
128 and session 15's 0.54 s per step of 32: the step time did not grow with the batch, a sign of
host-bound steps. Prints JSON: median milliseconds per batch of each part, over `--reps` batches,
with the two costs this change removed from a GPU step, measured the old way:

- `float_pixels_on_host_ms`: the uint8 -> float conversion of the batch on the host (100 MB at 128 smol
  scenes), which `Batch.pixels_on(device)` now leaves to the device;
- `prompts_uncached_ms`: the prompts with the chat template rendered and tokenised for every example,
  which `LanguageModel.build_prompt` now does once per prompt layout.

    python -m bench.host_batch --checkpoint assets/checkpoints/smol --data data/sw30k --split val --batch 128
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def _ms(fn, reps: int) -> float:
    times = []
    for i in range(reps):
        start = time.perf_counter()
        fn(i)
        times.append(1000 * (time.perf_counter() - start))
    return round(statistics.median(times), 1)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="assets/checkpoints/smol")
    p.add_argument("--data", default="data/sw30k")
    p.add_argument("--split", default="val")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from segcompass.model import SegCompass
    from training.examples import collate, load_examples, pack_reference, unit_pixels

    torch.set_num_threads(1)  # the training process's data work is single-threaded Python + torch
    model = SegCompass.from_pretrained(args.checkpoint)
    examples = load_examples(args.data, args.split, model.config)
    if not examples:
        raise SystemExit(f"no examples in {args.data} ({args.split})")
    lang, n_visual = model.language, model.num_visual

    def chunk(i: int):
        start = (i * args.batch) % len(examples)
        rows = (examples + examples)[start:start + args.batch]
        return rows if len(rows) == args.batch else (rows * args.batch)[:args.batch]

    def uncached_prompt(text: str):  # build_prompt as it was: the template rendered and tokenised per example
        prefix, suffix = lang._template_parts(n_visual)
        return lang.prompt_from_ids(lang._encode(prefix), lang._encode(text), lang._encode(suffix))

    same = all(uncached_prompt(e.instruction) == lang.build_prompt(e.instruction, n_visual) for e in chunk(0))
    lang.build_prompt(examples[0].instruction, n_visual)  # warm the template cache, as after the first step
    batches = [collate(chunk(i)) for i in range(args.reps)]
    report = {
        "checkpoint": args.checkpoint, "batch": args.batch, "reps": args.reps, "threads": 1,
        "collate_ms": _ms(lambda i: collate(chunk(i)), args.reps),
        "pack_reference_ms": _ms(lambda i: pack_reference(model, batches[i].examples, model.config.head), args.reps),
        "prompts_cached_ms": _ms(lambda i: [lang.build_prompt(e.instruction, n_visual) for e in batches[i].examples],
                                 args.reps),
        "prompts_uncached_ms": _ms(lambda i: [uncached_prompt(e.instruction) for e in batches[i].examples],
                                   args.reps),
        "float_pixels_on_host_ms": _ms(lambda i: unit_pixels(batches[i].pixels_uint8), args.reps),
        "cached_prompts_identical": same,
    }
    report["host_ms_per_gpu_step"] = round(report["collate_ms"] + report["pack_reference_ms"], 1)
    report["host_ms_per_gpu_step_before"] = round(
        report["host_ms_per_gpu_step"] + report["float_pixels_on_host_ms"]
        + report["prompts_uncached_ms"] - report["prompts_cached_ms"], 1)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
