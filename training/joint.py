"""Stage 3, joint training: GRPO on the CoT plus segmentation supervision, one objective:

    loss = policy + kl_coeff * KL_k3(pi || pi_init) + seg_weight * seg + conf_weight * confidence

GRPO steps sample G completions per prompt from the CURRENT policy (so the generator learns from
its own rollouts), score each with 0.3 format + 0.7 mask score of the mask those very tokens lead
to (the SAE codes come from the rollout's own forward pass), normalise rewards within each group
and apply the clipped surrogate; the seg/confidence losses are applied to the rollouts' masks too.
Between GRPO steps, cheap supervised steps apply the seg/confidence losses to the reference CoT
(teacher-forced), so the mask path gets enough updates within a CPU budget.
Trained/frozen parts and per-module learning rates: see training/parts.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from segcompass.slot_mapper import kept_slots

from .common import MODEL_DIR, Batches, Clock, load_state, resume_state, seed_everything, setup_run
from .configs import JointConfig, save_config
from .examples import Batch, collate, load_examples
from .grpo import completion_logprobs, group_advantages, grpo_loss
from .losses import stage_seg_losses
from .loop import train_loop
from .parts import (attention_kernel, cast_external_language, freeze_unused, param_groups, set_trainable,
                    with_runnable_precision)
from .rewards import format_reward, mask_score, total_reward
from .sft import completion_ce, teacher_forced

log = logging.getLogger(__name__)


def _seg(out, batch_targets_heat, batch_targets_mask, cfg: JointConfig):
    return stage_seg_losses(out.heatmap_logits, out.mask_logits, out.confidence_logits, batch_targets_heat,
                            batch_targets_mask, cfg)


def supervised_step(model, batch: Batch, cfg: JointConfig, device) -> tuple[torch.Tensor, dict]:
    with torch.no_grad():
        vision_out = model.vision(batch.pixels_on(device))
    out, _ = teacher_forced(model, batch, device, model.config.head, vision_out=vision_out,
                            ref_dropout=cfg.ref_dropout, ref_shuffle=cfg.ref_shuffle, logits="none")
    seg = _seg(out, batch.target_heat, batch.target_mask, cfg)
    loss = cfg.seg_weight * seg.seg + cfg.conf_weight * seg.confidence
    return loss, {"seg": float(seg.seg.detach()), "conf": float(seg.confidence.detach())}


def _valid_prefix(ids: list[int], lang) -> list[int]:
    """A sample cut before any token that can never be fed back as text (an <image> placeholder
    would need a visual token; the prompt's own special tokens). The cut completion lacks its
    reference token, so the format reward scores it 0, as it should."""
    bad = {lang.image_id, lang.tokenizer.bos_token_id, lang.pad_id}
    for i, t in enumerate(ids):
        if t in bad and not (t == lang.pad_id == lang.eos_id):
            return ids[:i] or [lang.eos_id]
    return ids


def rollout_step(model, ref_model, batch: Batch, cfg: JointConfig, device, generator) -> tuple[torch.Tensor, dict]:
    """One GRPO step on P prompts x G own samples."""
    lang, G = model.language, cfg.group_size
    with torch.no_grad():
        tokens, feats = model.vision(batch.pixels_on(device))
    tokens, feats = tokens.repeat_interleave(G, 0), feats.repeat_interleave(G, 0)
    rows = [e for e in batch.examples for _ in range(G)]
    valid_hw = [e.valid_hw for e in rows]
    prompts = [lang.build_prompt(e.instruction, model.num_visual) for e in rows]
    gen = lang.generate(prompts, tokens, cfg.max_new_tokens, cfg.temperature, generator)
    completions = [_valid_prefix(gen.completion_ids[i][gen.completion_mask[i].bool()].tolist(), lang)
                   for i in range(len(rows))]
    packed = lang.pack(prompts, completions)
    ids, mask = packed.ids.to(device), packed.attention_mask.to(device)
    prompt_lengths = packed.prompt_lengths.to(device)
    T = ids.shape[1]
    # LM logits only from the last prompt position on: the visual tokens and prompt make up most of
    # the sequence, and their [rows, T, vocab] fp32 logits (x3 with log-softmax and the reference
    # policy) were computed for nothing.
    keep = T - int(packed.prompt_lengths.min()) + 1
    out = model(None, valid_hw, ids, packed.roles.to(device), mask, prompt_lengths,
                vision_out=(tokens, feats), logits_to_keep=keep)
    logp, comp_mask = completion_logprobs(out.lm_logits, ids, prompt_lengths, mask)
    with torch.no_grad():
        ref_lang = ref_model.language
        positions = torch.arange(T, device=device).expand_as(ids)
        ref_logits = ref_lang.step(ref_lang.embed(ids, tokens), mask, positions, logits_to_keep=keep).logits
        ref_logp, _ = completion_logprobs(ref_logits, ids, prompt_lengths, mask)
        probs = torch.sigmoid(out.mask_logits.float())
        rule = model.config.mask
        kept = kept_slots(torch.sigmoid(out.confidence_logits.float()), rule.confidence_threshold, rule.top_slot_threshold)
        fmt = [format_reward(lang.tokenizer.decode(c, skip_special_tokens=False), cfg.max_reasoning_words)
               for c in completions]
        msk = [mask_score(probs[i], kept[i], rows[i].target_mask.float().to(device)) for i in range(len(rows))]
        rewards = torch.tensor([total_reward(f, m) for f, m in zip(fmt, msk)])
        adv = group_advantages(rewards, G).to(device)
    g = grpo_loss(logp, logp.detach(), ref_logp, adv, comp_mask, cfg.clip_eps, cfg.kl_coeff)
    seg = _seg(out, [e.target_heat.float() for e in rows], [e.target_mask.float() for e in rows], cfg)
    loss = g.loss + cfg.seg_weight * seg.seg + cfg.conf_weight * seg.confidence
    stats = {"reward": float(rewards.mean()), "format": sum(fmt) / len(fmt), "mask": sum(msk) / len(msk),
             "kl": float(g.kl.detach()), "policy": float(g.policy.detach()), "seg": float(seg.seg.detach()),
             "conf": float(seg.confidence.detach()),
             "len": float(comp_mask.sum(1).float().mean())}
    return loss, stats


def run_joint(cfg: JointConfig, init: str | Path, run_dir: str | Path, resume: bool = True, examples=None) -> Path:
    from accelerate import Accelerator

    from segcompass.model import SegCompass

    run = setup_run(run_dir, "joint")
    cfg = with_runnable_precision(cfg)
    save_config(cfg, run / "joint_config.json")
    seed_everything(cfg.seed)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    device = accelerator.device
    state = load_state(run) if resume else None
    model = SegCompass.from_pretrained(run / MODEL_DIR if state is not None else init).to(device)
    ref_model = SegCompass.from_pretrained(init).to(device).eval()  # the initial policy, frozen
    for p in ref_model.parameters():
        p.requires_grad_(False)
    if examples is None:
        examples = load_examples(cfg.data, cfg.split, model.config, cfg.limit)
    model.train()
    set_trainable(model, "joint")
    batches = Batches(len(examples), min(cfg.batch_size, len(examples)), cfg.seed)
    prompts = Batches(len(examples), min(cfg.prompts, len(examples)), cfg.seed + 1)
    probe_batch = collate([examples[i] for i in batches.at(0)])
    out, packed = teacher_forced(model, probe_batch, device, model.config.head)
    probe = _seg(out, probe_batch.target_heat, probe_batch.target_mask, cfg)
    freeze_unused(model, probe.seg + probe.confidence + completion_ce(out.lm_logits, packed, device))
    cast_external_language(model, cfg.mixed_precision)
    cast_external_language(ref_model, cfg.mixed_precision)
    optimizer = torch.optim.AdamW(param_groups(model, "joint", cfg.lr, cfg, weight_decay=0.0))
    clock = Clock(cfg.steps, cfg.minutes)
    step = resume_state(state, optimizer, clock, "joint")
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)
    # multinomial sampling needs the generator on the probabilities' device
    generator = torch.Generator(device=device).manual_seed(cfg.seed + step)
    log.info("joint: %d examples, %d trainable parameters, G=%d, %d prompts per GRPO step", len(examples),
             sum(p.numel() for p in inner.parameters() if p.requires_grad), cfg.group_size, cfg.prompts)
    n_grpo = 0

    def joint_step(step: int):
        nonlocal n_grpo
        is_grpo = cfg.grpo_every > 0 and step % cfg.grpo_every == cfg.grpo_every - 1
        with accelerator.autocast(), attention_kernel(device):  # autocast: no-op unless mixed_precision is set
            if is_grpo:
                batch = collate([examples[i] for i in prompts.at(n_grpo + step)])
                loss, stats = rollout_step(inner, ref_model, batch, cfg, device, generator)
                n_grpo += 1
            else:
                batch = collate([examples[i] for i in batches.at(step)])
                loss, stats = supervised_step(inner, batch, cfg, device)
        return loss, stats, "grpo" if is_grpo else ""

    train_loop("joint", run, inner, optimizer, clock, step, cfg, joint_step, accelerator)
    return run / MODEL_DIR
