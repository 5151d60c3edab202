"""Stage 2, SAE pretraining on cached layer-L activations of every token kind (padding excluded).

Activations of teacher-forced training sequences (visual, instruction, special and CoT tokens)
are cached once; the SAE trains on them scaled to mean squared norm D (so the ReLU-L1
coefficient means the same at any width or scale), optionally after standardising each dimension
(`normalize=dim`); the affine map is folded back into W_enc, W_dec, b_dec afterwards, so the
model's SAE reads the raw residual stream. ReLU-L1 (the paper: MSE +
l1_coeff * sum_i f_i ||W_dec,i||) and TopK (MSE, L0 = k) are both supported; with `compare` both
are trained and explained variance, L0 and dead latents on held-out activations are reported.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from segcompass.sae import SparseAutoencoder, explained_variance, sae_loss

from .common import MODEL_DIR, default_device, seed_everything, setup_run
from .configs import SAEStageConfig, save_config
from .examples import collate, load_examples
from .parts import attention_kernel
from .sft import teacher_forced

log = logging.getLogger(__name__)


@torch.no_grad()
def cache_activations(model, examples, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer-L states [N, D] of all non-padding tokens and the example index of each row.
    fp32, with the training step's attention kernel (math SDPA on CPU; a one-off timing: 17.7 s vs 19.6 s for 64 smol
    val sequences on 2 cores, states equal to 3e-4; bf16 autocast took 11.2 s but moved the states
    by 1 % of their norm, so it is not used)."""
    from tqdm import tqdm

    model.eval()
    device = model._device()
    acts, owner = [], []
    for start in tqdm(range(0, len(examples), batch_size), desc="cache layer-L activations", unit="batch"):
        chunk = examples[start: start + batch_size]
        with attention_kernel(device):
            out, packed = teacher_forced(model, collate(chunk), device, "segcompass", logits="none")
        real = packed.attention_mask.bool()
        acts.append(out.hook_states[real.to(device)].float())
        owner.append((torch.arange(len(chunk))[:, None] + start).expand_as(real)[real])
    return torch.cat(acts), torch.cat(owner).to(device)


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, x_ND: torch.Tensor) -> dict:
    z, x_hat = sae(x_ND)
    active = (z > 0)
    return {
        "explained_variance": explained_variance(x_ND, x_hat),
        "l0": float(active.sum(-1).float().mean()),
        "dead_fraction": float((~active.any(0)).float().mean()),
        "mse": float((x_hat - x_ND).pow(2).sum(-1).mean()),
    }


def train_sae(train_ND: torch.Tensor, d_sae: int, kind: str, k: int, l1_coeff: float, steps: int, batch_size: int,
              lr: float, minutes: float, seed: int) -> SparseAutoencoder:
    """Train on already-normalised activations; decoder rows kept at unit norm."""
    torch.manual_seed(seed)
    sae = SparseAutoencoder(train_ND.shape[1], d_sae, kind, k, l1_coeff).to(train_ND.device)
    sae.init_b_dec(train_ND)
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(train_ND), (batch_size,))
        loss = sae_loss(sae, train_ND[idx])["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))
        if time.perf_counter() - start > 60 * minutes:
            log.info("SAE %s: time budget reached at step %d", kind, step + 1)
            break
    return sae


@torch.no_grad()
def fold_affine(sae: SparseAutoencoder, scale: torch.Tensor | float, shift: torch.Tensor | float = 0.0
                ) -> SparseAutoencoder:
    """An SAE trained on u = (x - shift) * scale (scale a scalar or one value per dimension) -> the
    same codes from raw x, and reconstructions in raw units: exact, since the SAE is affine around
    its nonlinearity (pre = (x - b_dec') W_enc' + b_enc with W_enc' = diag(scale) W_enc,
    b_dec' = b_dec / scale + shift; x_hat = z W_dec' + b_dec' with W_dec' = W_dec diag(1 / scale))."""
    scale = torch.as_tensor(scale, dtype=sae.W_enc.dtype, device=sae.W_enc.device)
    shift = torch.as_tensor(shift, dtype=sae.W_enc.dtype, device=sae.W_enc.device)
    sae.W_enc.mul_(scale.reshape(-1, 1) if scale.ndim else scale)
    sae.W_dec.div_(scale)
    sae.b_dec.div_(scale).add_(shift)
    return sae


def normalisation(train_ND: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, scale) with (x - shift) * scale of mean squared norm D on the training activations.
    "global": shift 0, one scale; "dim": each dimension standardised first (a residual stream with a
    few huge dimensions otherwise spends the SAE on them), then the same global scale."""
    D = train_ND.shape[1]
    if how == "global":
        shift, scale = torch.zeros(D, device=train_ND.device), torch.ones(D, device=train_ND.device)
    elif how == "dim":
        shift, sd = train_ND.mean(0), train_ND.std(0)
        scale = 1.0 / sd.clamp_min(1e-3 * float(sd.mean()))
    else:
        raise ValueError(f"unknown SAE normalisation '{how}' (global | dim)")
    g = (D / ((train_ND - shift) * scale).pow(2).sum(-1).mean()).sqrt()
    return shift, scale * g


def run_sae(cfg: SAEStageConfig, init: str | Path, run_dir: str | Path, resume: bool = True) -> Path:
    from segcompass.model import SegCompass

    run = setup_run(run_dir, "sae")
    if resume and (run / "sae_report.json").is_file() and (run / MODEL_DIR / "model.safetensors").is_file():
        log.info("SAE stage already done in %s", run)
        return run / MODEL_DIR
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    model = SegCompass.from_pretrained(init, device=default_device())
    preset = model.config.sae
    cfg = dataclasses.replace(cfg, kind=cfg.kind or preset.kind, k=cfg.k or preset.k,
                              l1_coeff=preset.l1_coeff if cfg.l1_coeff is None else cfg.l1_coeff)
    save_config(cfg, run / "sae_config.json")
    examples = load_examples(cfg.data, cfg.split, model.config, cfg.limit)
    acts, owner = cache_activations(model, examples)
    n_held = max(1, int(len(examples) * cfg.heldout))
    held = owner >= len(examples) - n_held  # whole sequences held out
    shift, scale = normalisation(acts[~held], cfg.normalize)
    train, test = (acts[~held] - shift) * scale, (acts[held] - shift) * scale
    t_cache = time.perf_counter() - t0
    log.info("cached %d activations (%d held out) of %d sequences in %.1f s; %s scale %.3f (mean)",
             len(acts), int(held.sum()), len(examples), t_cache, cfg.normalize, float(scale.mean()))
    kinds = [cfg.kind] + ([k for k in ("topk", "relu") if k != cfg.kind] if cfg.compare else [])
    report = {"activations": len(acts), "heldout_activations": int(held.sum()), "d_in": acts.shape[1],
              "d_sae": model.config.sae.d_sae, "normalize": cfg.normalize, "scale": float(scale.mean()),
              "cache_seconds": t_cache, "runs": {}}
    saes = {}
    for kind in kinds:
        t = time.perf_counter()
        sae = train_sae(train, model.config.sae.d_sae, kind, cfg.k, cfg.l1_coeff, cfg.steps, cfg.batch_size, cfg.lr,
                        cfg.minutes, cfg.seed)
        stats = evaluate_sae(sae, test)
        stats.update(seconds=time.perf_counter() - t, k=cfg.k if kind == "topk" else None,
                     l1_coeff=cfg.l1_coeff if kind == "relu" else None)
        report["runs"][kind] = stats
        saes[kind] = sae
        log.info("SAE %s: EV %.4f  L0 %.1f  dead %.3f  (%.1f s)", kind, stats["explained_variance"], stats["l0"],
                 stats["dead_fraction"], stats["seconds"])
    chosen = fold_affine(saes[cfg.kind], scale, shift)
    model.sae.load_state_dict(chosen.state_dict())
    model.sae.kind, model.sae.k, model.sae.l1_coeff = cfg.kind, cfg.k, cfg.l1_coeff
    model.config = model.config.replace(sae=dataclasses.replace(model.config.sae, kind=cfg.kind, k=cfg.k,
                                                                l1_coeff=cfg.l1_coeff, code_threshold=0.0))
    report["kept"] = cfg.kind
    report["seconds"] = time.perf_counter() - t0
    model.save_pretrained(run / MODEL_DIR)
    (run / "sae_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("SAE stage done in %.1f s -> %s", report["seconds"], run / MODEL_DIR)
    return run / MODEL_DIR
