"""Does this CPU compute bf16 natively? The check the training stages use (`training.parts.cpu_has_fast_bf16`) and
the time of one smol-sized matmul ([2048 x 576] @ [576 x 1536], a batch of tokens through an MLP projection) in
fp32, in bf16 and under CPU bf16 autocast. Prints JSON. On session 21's AVX2-only machine, 2 threads: fp32 0.040 s,
bf16 2.89 s, autocast 3.01 s (72x), so the stages fall back to fp32 there.

    python -m bench.cpu_bf16 [--threads 2] [--reps 10]
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)

    import torch

    from training.parts import cpu_has_fast_bf16

    torch.set_num_threads(args.threads)
    x, w = torch.randn(2048, 576), torch.randn(576, 1536)

    def seconds(fn) -> float:
        fn()  # warm-up
        start = time.perf_counter()
        for _ in range(args.reps):
            fn()
        return round((time.perf_counter() - start) / args.reps, 4)

    xb, wb = x.bfloat16(), w.bfloat16()
    fp32 = seconds(lambda: x @ w)
    bf16 = seconds(lambda: xb @ wb)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = seconds(lambda: x @ w)
    report = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": cpu_has_fast_bf16(),
              "threads": args.threads, "fp32_s": fp32, "bf16_s": bf16, "autocast_bf16_s": autocast,
              "bf16_over_fp32": round(bf16 / fp32, 1)}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
