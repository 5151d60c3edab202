"""Which parameters each stage trains, and the per-module learning-rate groups.

SFT: everything except the SAE (random and frozen until the SAE stage).
Joint (ARCHITECTURE.md): trained = LM layers above L (with the final norm and LM head), codebook,
slot mapper, mask decoder (prompt encoder x10, decoder x5 of the LM's lr; codebook x30, slot
mapper x25); frozen = vision encoder, SAE, LM embeddings + projector + layers <= L.
A baseline head replaces codebook + slot mapper (which it never uses, so they stay frozen).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from torch import nn

from segcompass.checkpoint import freeze_external

from .common import default_device

log = logging.getLogger(__name__)


def _set(module: nn.Module | None, flag: bool) -> None:
    if module is not None:
        for p in module.parameters():
            p.requires_grad_(flag)


def set_trainable(model, stage: str) -> None:
    baseline = model.config.head != "segcompass"
    _set(model, stage == "sft")
    _set(model.sae, False)
    if baseline:
        _set(model.codebook, False)
        _set(model.slot_mapper, False)
    if stage == "joint":
        lm = model.language.lm
        L = model.language.hook_layer
        for layer in model.language.decoder_layers()[L:]:
            _set(layer, True)
        _set(lm.get_decoder().norm, True)
        _set(lm.get_output_embeddings(), True)
        _set(model.mask_decoder, True)
        _set(model.baseline, True)
        if not baseline:
            _set(model.codebook, True)
            _set(model.slot_mapper, True)
    elif stage != "sft":
        raise ValueError(f"unknown stage {stage}")
    # Pretrained base weights (smol, full scale) load from their packages and are never saved:
    # training them would be lost at the next load.
    freeze_external(model)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 / AMX, or AVX512 through oneDNN). On an AVX2-only
    CPU PyTorch emulates it: a [2048 x 576] @ [576 x 1536] matmul took 2.89 s in bf16 against 0.040 s in fp32 on
    2 cores (72x; `python -m bench.cpu_bf16`), so a bf16 smol SFT step crawled (docs/results.md, "Session 21")."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: trust the instruction set
        return torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "AVX2", "NO AVX")


def resolve_mixed_precision(requested: str, device: torch.device) -> str:
    """The mixed precision a stage actually runs with: the requested one, except bf16 on a CPU without fast bf16,
    which falls back to fp32 ("no") with a warning (every smol stage preset asks for bf16)."""
    if requested == "bf16" and torch.device(device).type == "cpu" and not cpu_has_fast_bf16():
        log.warning("mixed_precision bf16 -> no: this CPU (%s) has no native bf16, which PyTorch would emulate "
                    "about 70x slower than fp32", torch.backends.cpu.get_cpu_capability())
        return "no"
    return requested


def with_runnable_precision(cfg, device: torch.device | None = None):
    """A stage config with `mixed_precision` resolved (`resolve_mixed_precision`) for `device` (default: the GPU
    when one is visible, else the CPU), so that the stage runs and saves what it will really use."""
    device = default_device() if device is None else device
    return dataclasses.replace(cfg, mixed_precision=resolve_mixed_precision(cfg.mixed_precision, device))


def cast_external_language(model, mixed_precision: str) -> int:
    """Under bf16 mixed precision, keep the language model's package weights (frozen, never saved)
    in bf16; returns how many tensors were cast.

    Autocast otherwise re-casts every fp32 weight on every call (about a fifth of a smol SFT step
    on 2 CPU cores under torch.profiler; `python -m bench.train_step --fp32-weights` times it). Checkpoints are unaffected (they never hold these weights,
    and a loaded model gets fp32 ones from the package again)."""
    if mixed_precision != "bf16":
        return 0
    skip = tuple(getattr(model.language, "external_prefixes", ()))
    cast = [p for n, p in model.named_parameters() if not p.requires_grad and any(n.startswith(s) for s in skip)]
    for p in cast:
        p.data = p.data.to(torch.bfloat16)
    return len(cast)


def attention_kernel(device: torch.device):
    """Context for training steps: PyTorch's math attention on CPU, whose backward was faster than
    the CPU flash kernel's for our ~150-token sequences (`python -m bench.train_step --flash` compares)."""
    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else contextlib.nullcontext()


def freeze_unused(model, loss: torch.Tensor) -> list[str]:
    """Backpropagate a probe loss and freeze trainable parameters it never reaches (e.g. SAM's point
    embeddings when only mask prompts are used, or the multimask output heads whose outputs are
    sliced away and so get exactly zero gradient); returns their names."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    # LoRA's A matrices get an exactly-zero gradient at the start (B is initialised to 0): exempt.
    unused = [n for n, p in model.named_parameters()
              if p.requires_grad and "lora_A" not in n and (p.grad is None or not bool(p.grad.any()))]
    for n, p in model.named_parameters():
        if n in unused:
            p.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    if unused:
        log.info("frozen (no gradient reaches them): %s", ", ".join(unused))
    return unused


def param_groups(model, stage: str, base_lr: float, cfg=None, weight_decay: float = 0.0) -> list[dict]:
    """AdamW groups with `base_lr` (each group remembers it as base_lr for the schedule)."""
    if stage == "sft":
        # A pretrained LM's adapters (LoRA, new token rows) take lr_adapters x the lr of the parts
        # trained from scratch (projector, vision neck, heads); a from-scratch LM has no adapters.
        from segcompass.smol import ADAPTER_MARKERS

        scale = getattr(cfg, "lr_adapters", 1.0)  # 1 without a config
        adapters, rest = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (adapters if any(m in name for m in ADAPTER_MARKERS) else rest).append(p)
        out = [{"params": rest, "lr": base_lr, "base_lr": base_lr, "weight_decay": weight_decay, "name": "all"}]
        if adapters:
            lr = base_lr * scale
            out.append({"params": adapters, "lr": lr, "base_lr": lr, "weight_decay": weight_decay, "name": "adapters"})
            log.info("lr groups: %d from-scratch params at %.2e, %d adapter params at %.2e",
                     sum(p.numel() for p in rest), base_lr, sum(p.numel() for p in adapters), lr)
        return out
    scales = {
        "codebook": cfg.lr_codebook, "slot_mapper": cfg.lr_slot_mapper,
        "mask_decoder.prompt_encoder": cfg.lr_prompt_encoder, "mask_decoder.mask_decoder": cfg.lr_mask_decoder,
        "baseline": cfg.lr_baseline, "language": cfg.lr_language,
    }
    groups: dict[str, list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = next((k for k in scales if name.startswith(k + ".")), "language")
        groups.setdefault(key, []).append(p)
    out = []
    for key, params in groups.items():
        lr = base_lr * scales.get(key, 1.0)
        out.append({"params": params, "lr": lr, "base_lr": lr, "weight_decay": weight_decay, "name": key})
        log.info("lr group %-28s %8d params  lr %.2e", key, sum(p.numel() for p in params), lr)
    return out
