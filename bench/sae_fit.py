"""How well a checkpoint's SAE still fits its language model's layer-L states.

The SFT stage trains every part but the SAE, so after more SFT the LM's states drift away from what the SAE was
fitted on; `scripts/offline_gpu/rest.sh` with STAGES=refit keeps that SAE (the heads were trained against it). This
caches the teacher-forced layer-L states of the first LIMIT examples (reference CoT, as the SAE stage does) and reports
the SAE's explained variance, L0 and dead share on them, in raw units and standardised per dimension the way the
SAE stage normalises before it fits (`training.sae_stage.normalisation(..., "dim")`, on these states). Several checkpoints in one call are scored on the same examples.

    python -m bench.sae_fit --checkpoint assets/checkpoints/smol OTHER_CKPT --data data/sw30k --split val --limit 64
"""

from __future__ import annotations

import argparse
import json
import os


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", default=["assets/checkpoints/smol"])
    p.add_argument("--data", default="data/sw30k")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from segcompass.model import SegCompass
    from segcompass.sae import explained_variance
    from training.examples import load_examples
    from training.sae_stage import cache_activations, evaluate_sae, normalisation

    torch.set_num_threads(args.threads)
    rows = []
    for ckpt in args.checkpoint:
        model = SegCompass.from_pretrained(ckpt).eval()
        examples = load_examples(args.data, args.split, model.config, args.limit, cache=False)
        x_ND, _ = cache_activations(model, examples, args.batch_size)
        sae = model.sae.float()
        raw = evaluate_sae(sae, x_ND)
        with torch.no_grad():
            _, x_hat = sae(x_ND)
            shift, scale = normalisation(x_ND, "dim")
            ev_std = explained_variance((x_ND - shift) * scale, (x_hat - shift) * scale)
        rows.append({"checkpoint": str(ckpt), "tokens": int(x_ND.shape[0]), "ev_raw": round(raw["explained_variance"], 4),
                     "ev_standardised": round(ev_std, 4), "l0": round(raw["l0"], 1),
                     "dead_fraction": round(raw["dead_fraction"], 4)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
