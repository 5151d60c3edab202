"""Stage 1, SFT cold start: teacher-forced CoT + reference token, jointly with the mask losses.

    loss = lm_weight * CE(completion tokens) + seg_weight * seg + conf_weight * confidence

The SAE is random and frozen here (it is trained on this stage's activations next); the vision
encoder's mask-path features are learned here only (it is frozen in the joint stage).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from segcompass.verify import naming_vocab

from .common import MODEL_DIR, Batches, Clock, load_state, resume_state, seed_everything, setup_run
from .configs import SFTConfig, model_config, save_config
from .examples import Batch, collate, corpus, load_examples, packed_reference
from .heads import swap_head
from .losses import stage_seg_losses
from .loop import train_loop
from .parts import (attention_kernel, cast_external_language, freeze_unused, param_groups, set_trainable,
                    with_runnable_precision)
from .prefetch import Prefetcher

log = logging.getLogger(__name__)


def teacher_forced(model, batch: Batch, device, head: str, vision_out=None, ref_dropout: float = 0.0,
                   ref_shuffle: float = 0.0, logits: str = "completion"):
    """Forward the reference completions of a batch; returns (ForwardOutput, PackedBatch).

    `logits`: "completion" computes LM logits from the last prompt position on (all that
    `completion_ce` reads), "none" for the last position only (seg-only steps), "all" everywhere."""
    packed = packed_reference(model, batch, head)
    T = packed.ids.shape[1]
    keep = {"all": 0, "none": 1, "completion": T - int(packed.prompt_lengths.min()) + 1}[logits]
    if vision_out is None:
        vision_out = model.vision(batch.pixels_on(device))
    out = model(None, batch.valid_hw, packed.ids.to(device), packed.roles.to(device),
                packed.attention_mask.to(device), packed.prompt_lengths.to(device), vision_out=vision_out,
                ref_dropout=ref_dropout, ref_shuffle=ref_shuffle, logits_to_keep=keep)
    return out, packed


def completion_ce(logits_BKV: torch.Tensor, packed, device) -> torch.Tensor:
    """Token-mean cross-entropy of the completion tokens (each predicted from the previous position).
    `logits_BKV`: the logits of the last K positions of the packed sequences (K = T: all of them)."""
    ids = packed.ids.to(device)
    T, K = ids.shape[1], logits_BKV.shape[1]
    first = T - K + 1  # the first position whose token is predicted by a kept logit
    pos = torch.arange(first, T, device=device)[None]
    target_mask = ((pos >= packed.prompt_lengths.to(device)[:, None])
                   & (packed.attention_mask.to(device)[:, first:] > 0))
    ce = F.cross_entropy(logits_BKV[:, :-1].float().reshape(-1, logits_BKV.shape[-1]), ids[:, first:].reshape(-1),
                         reduction="none").view(ids.shape[0], K - 1)
    return (ce * target_mask).sum() / target_mask.sum().clamp_min(1)


def perception_loss(aux_head, tokens_BND: torch.Tensor, batch: Batch) -> torch.Tensor | None:
    """Cross-entropy of colour / shape / size of the object under each visual token (ShapeWorld)."""
    from .examples import COLOURS, SHAPES, SIZES

    if any(e.token_labels is None for e in batch.examples):
        return None
    labels = torch.stack([e.token_labels[:, :3] for e in batch.examples]).to(tokens_BND.device)  # [B, Nv, 3]
    logits = aux_head(tokens_BND)  # [B, Nv, 16]
    splits = logits.split([len(COLOURS), len(SHAPES), len(SIZES)], dim=-1)
    losses = [F.cross_entropy(lg.reshape(-1, lg.shape[-1]), labels[..., i].reshape(-1), ignore_index=-100)
              for i, lg in enumerate(splits) if bool((labels[..., i] >= 0).any())]
    return torch.stack(losses).mean() if losses else None


def naming_loss(model, hook_BTD: torch.Tensor, ids_BT: torch.Tensor, batch: Batch, vocab: list[list[int]]
                ) -> torch.Tensor | None:
    """Cross-entropy of the colour / shape / size (and row / column) words of the object under each
    visual token, read from that token's layer-L state through the LM's own final norm and
    unembedding (logit lens).
    The middle of the LM then names what each visual token shows in its own vocabulary, so a later
    layer can copy the word by attending to the token, and the SAE (which reads layer L) sees
    visual tokens and CoT words in one space. `vocab`: `naming_vocab` of the LM (computed once per
    run). ShapeWorld only; None without `objects`."""
    lang = model.language
    if any(e.token_labels is None for e in batch.examples):
        return None
    labels = torch.stack([e.token_labels[:, :len(vocab)] for e in batch.examples]).to(hook_BTD.device)
    states = hook_BTD[ids_BT.to(hook_BTD.device) == lang.image_id].view(*labels.shape[:2], -1)  # [B, Nv, D]
    losses = []
    for i, word_ids in enumerate(vocab):
        if bool((labels[..., i] >= 0).any()):
            logits = lang.word_logits(states, word_ids).float()
            losses.append(F.cross_entropy(logits.reshape(-1, len(word_ids)), labels[..., i].reshape(-1),
                                          ignore_index=-100))
    return torch.stack(losses).mean() if losses else None


def sft_loss(model, batch: Batch, cfg: SFTConfig, device, aux_head=None, vocab=None, logits: str = "completion"
             ) -> tuple[torch.Tensor, dict]:
    """`vocab` (the `naming_vocab` of the LM) switches the naming loss on when cfg.naming_weight > 0;
    `logits`: see `teacher_forced` (benchmarks compare "all")."""
    vision_out = model.vision(batch.pixels_on(device))
    out, packed = teacher_forced(model, batch, device, model.config.head, vision_out=vision_out, logits=logits)
    ce = completion_ce(out.lm_logits, packed, device)
    loss = cfg.lm_weight * ce
    stats = {"ce": float(ce.detach())}
    if aux_head is not None:
        aux = perception_loss(aux_head, vision_out[0], batch)
        if aux is not None:
            loss = loss + cfg.aux_weight * aux
            stats["aux"] = float(aux.detach())
    if cfg.naming_weight > 0 and vocab is not None:
        naming = naming_loss(model, out.hook_states, packed.ids, batch, vocab)
        if naming is not None:
            loss = loss + cfg.naming_weight * naming
            stats["name"] = float(naming.detach())
    if cfg.mask_loss:
        seg = stage_seg_losses(out.heatmap_logits, out.mask_logits, out.confidence_logits, batch.target_heat,
                               batch.target_mask, cfg)
        loss = loss + cfg.seg_weight * seg.seg + cfg.conf_weight * seg.confidence
        stats.update(seg=float(seg.seg.detach()), conf=float(seg.confidence.detach()),
                     dice=float(seg.mask_dice.detach()))
    return loss, stats


def sft_setup(model, cfg: SFTConfig, probe_batch: Batch, device, cast_weights: bool = True):
    """Everything between choosing what trains and the first step, shared by `run_sft` and
    `bench.train_step`: the naming vocabulary, freezing what a probe loss never reaches, the bf16
    package weights (`cast_weights`), the optimizer and the training-only perception head.
    Returns (optimizer, aux_head or None, vocab or None)."""
    vocab = naming_vocab(model.language, cfg.naming_regions) if cfg.naming_weight > 0 else None
    if cfg.naming_weight > 0 and vocab is None:
        log.warning("naming loss off: an attribute word is unknown to this tokenizer, or two share a first token")
    probe, _ = sft_loss(model, probe_batch, cfg, torch.device("cpu"), vocab=vocab)
    freeze_unused(model, probe)
    if cast_weights and cast_external_language(model, cfg.mixed_precision):
        log.info("bf16: the language model's frozen package weights are kept in bf16")
    groups = param_groups(model, "sft", cfg.lr, cfg, weight_decay=cfg.weight_decay)
    aux_head = None
    if cfg.aux_weight > 0:  # training-only head (not part of the checkpoint; a resumed run starts it afresh)
        from .examples import COLOURS, SHAPES, SIZES

        aux_head = torch.nn.Linear(model.vision.token_dim, len(COLOURS) + len(SHAPES) + len(SIZES)).to(device)
        groups.append({"params": list(aux_head.parameters()), "lr": cfg.lr, "base_lr": cfg.lr, "weight_decay": 0.0,
                       "name": "aux"})
    return torch.optim.AdamW(groups), aux_head, vocab


def run_sft(cfg: SFTConfig, run_dir: str | Path, resume: bool = True, examples=None, model=None,
            init: str | Path | None = None) -> Path:
    """Train (or resume) SFT in run_dir; `model` optionally supplies the fresh model (tests).

    `init`: start from this checkpoint's weights (e.g. a shipped one, to train it further) instead of a
    fresh model, with a fresh optimizer and schedule; its model config (preset, head, tokenizer) is
    used, so cfg.preset / lm_path / sam_path are ignored and cfg.head must match (or, with cfg.swap_head,
    replaces the checkpoint's readout: a baseline head on the same trained model, training.heads)."""
    from accelerate import Accelerator

    from segcompass.build import build_model
    from segcompass.model import SegCompass
    from segcompass.tokenizer import build_word_tokenizer

    run = setup_run(run_dir, "sft")
    cfg = with_runnable_precision(cfg)
    save_config(cfg, run / "sft_config.json")
    seed_everything(cfg.seed)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    state = load_state(run) if resume else None
    if state is not None:
        model = SegCompass.from_pretrained(run / MODEL_DIR)
        log.info("resuming SFT from step %d", state["step"])
    elif init is not None:
        model = SegCompass.from_pretrained(init)
        if model.config.head != cfg.head and not cfg.swap_head:
            raise ValueError(f"--init {init} is a {model.config.head} model but the SFT head is {cfg.head}: "
                             f"pass --head {model.config.head}, or --head {cfg.head} to swap in a fresh one")
        log.info("SFT from the weights of %s (%s preset)", init, model.config.preset)
        if model.config.head != cfg.head:
            swap_head(model, cfg.head)
            log.info("SFT: head swapped from %s to a fresh %s head", init, cfg.head)
    # resumed or not, a run started from a checkpoint keeps that checkpoint's model config
    model_cfg = model_config(cfg) if init is None else model.config
    if examples is None:
        examples = load_examples(cfg.data, cfg.split, model_cfg, cfg.limit, cache=cfg.cache_examples)
    if model is None:
        model = build_model(model_cfg, tokenizer=build_word_tokenizer(corpus(examples)))
    model.train()
    set_trainable(model, "sft")
    batches = Batches(len(examples), min(cfg.batch_size, len(examples)), cfg.seed)
    optimizer, aux_head, vocab = sft_setup(model, cfg, collate([examples[i] for i in batches.at(0)]),
                                           accelerator.device)
    clock = Clock(cfg.steps, cfg.minutes)
    step = resume_state(state, optimizer, clock, "sft")
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)
    log.info("SFT: %d examples, %d trainable parameters, head %s", len(examples),
             sum(p.numel() for p in inner.parameters() if p.requires_grad), cfg.head)

    def make_batch(step: int) -> Batch:
        batch = collate([examples[i] for i in batches.at(step)])
        packed_reference(inner, batch, cfg.head)
        return batch

    # on a GPU the next batch is made while the step runs (training.prefetch); on a CPU the step has the cores
    if cfg.prefetch not in ("auto", "on", "off"):
        raise ValueError(f"sft prefetch must be auto, on or off, got {cfg.prefetch!r}")
    prefetch = cfg.prefetch == "on" or (cfg.prefetch == "auto" and accelerator.device.type == "cuda")
    with Prefetcher(make_batch, enabled=prefetch) as next_batch:
        def sft_step(step: int):
            batch = next_batch(step)
            with accelerator.autocast(), attention_kernel(accelerator.device):  # autocast: no-op unless mixed_precision
                loss, stats = sft_loss(inner, batch, cfg, accelerator.device, aux_head, vocab)
            return loss, stats, ""

        train_loop("sft", run, inner, optimizer, clock, step, cfg, sft_step, accelerator)
    return run / MODEL_DIR
