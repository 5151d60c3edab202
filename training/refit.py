"""Heads refit: the mask path re-trained on cached, frozen language-model states.

    cache once (no grad):  reference CoT, teacher-forced ──► layer-L states [T, D] (fp16), reference state [D]
    then for many steps:   SAE codes ──► codebook ──► slot mapper ──► mask decoder   (trained)
                           pixels ──► vision encoder ──► mask neck ──► image features  (the neck trained)

Why: the codebook, slot mapper and mask decoder learn in SFT from a random SAE (it is trained on
SFT's activations afterwards), and the joint stage, which sees the trained SAE, is dominated by
the language model's cost: on smol it gives the heads ~110 supervised steps in 15 minutes. Here
the language model, the SAE, the vision trunk and the visual tokens are frozen, so the states can
be computed once and the heads trained for thousands of steps at the cost of the heads alone.
The language model is unchanged, so the checkpoint's chains of thought are the same as its init's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from segcompass.records import TokenRole

from .common import MODEL_DIR, Batches, Clock, default_device, load_state, resume_state, seed_everything, setup_run
from .configs import RefitConfig, save_config
from .examples import Example, collate, load_examples, pack_reference
from .heads import swap_head
from .losses import stage_seg_losses
from .loop import train_loop
from .parts import with_runnable_precision

log = logging.getLogger(__name__)


@dataclass
class CachedStates:
    """One example's frozen language-model pass over its reference completion."""

    hook: torch.Tensor  # [T, D] float16 layer-L states of every real token
    ids: torch.Tensor  # [T] long
    roles: torch.Tensor  # [T] long
    ref: torch.Tensor  # [D] float32 reference state
    prompt_length: int


def trained_modules(model) -> list[torch.nn.Module]:
    """What the refit trains: the heads after the SAE and the vision encoder's mask neck (which only
    makes the mask path's image features; the visual tokens, hence the cached states, do not depend on it)."""
    heads = [model.mask_decoder, model.vision.neck]
    heads += [model.codebook, model.slot_mapper] if model.baseline is None else [model.baseline]
    return heads


COT_SOURCES = ("reference", "generated")


def check_cot(cot: str) -> None:
    if cot not in COT_SOURCES:
        raise ValueError(f"refit cot must be one of {COT_SOURCES}, got {cot!r}")


def check_fp16(hook: torch.Tensor) -> None:
    """The cache stores layer-L states in float16: refuse states it cannot hold."""
    if not torch.isfinite(hook).all() or hook.abs().max() > 6e4:
        raise ValueError("layer-L states do not fit float16; the refit cache cannot hold them")


@torch.no_grad()
def cache_states(model, examples: list[Example], batch_size: int = 16, cot: str = "reference") -> list[CachedStates]:
    """The language model's states on each example (fp32 compute, as at inference): teacher-forced on the
    reference completion (`cot="reference"`), or its own greedy completion as `encode` writes it for a user
    (`cot="generated"`: the states the heads read at inference, right or wrong)."""
    from tqdm import tqdm

    check_cot(cot)
    model.eval()
    device = model._device()
    head = model.config.head
    cached: list[CachedStates] = []
    for start in tqdm(range(0, len(examples), batch_size), desc=f"cache language-model states ({cot} CoT)",
                      unit="batch"):
        chunk = examples[start: start + batch_size]
        if cot == "generated":
            cached += [generated_states(model, trace) for trace in model.encode_batch(
                [example_image(e) for e in chunk], [e.instruction for e in chunk])]
            continue
        packed = pack_reference(model, chunk, head)
        tokens, _ = model.vision(collate(chunk).pixels_on(device))
        step, _, ref = model.language_states(tokens, packed.ids.to(device), packed.attention_mask.to(device),
                                             packed.prompt_lengths.to(device), logits_to_keep=1)
        hook = step.hook.float()
        check_fp16(hook)
        for b, n in enumerate(packed.lengths.tolist()):
            cached.append(CachedStates(hook=hook[b, :n].half().cpu(), ids=packed.ids[b, :n], roles=packed.roles[b, :n],
                                       ref=ref[b].float().cpu(), prompt_length=int(packed.prompt_lengths[b])))
    return cached


def example_image(example: Example):
    """The example's image as `encode` takes it: the valid part of its prepared pixels (already at the model's
    size, so `prepare` keeps it as it is)."""
    h, w = example.valid_hw
    return example.pixels[:, :h, :w].permute(1, 2, 0).contiguous().numpy()


def generated_states(model, trace) -> CachedStates:
    """A trace's layer-L states, rebuilt exactly (SAE reconstruction + the error term it keeps)."""
    device = model._device()
    hook = model.sae.decode(trace.dense_codes().to(device)) + trace.sae_error.to(device)
    check_fp16(hook)
    return CachedStates(hook=hook.half().cpu(), ids=trace.token_ids.clone(), roles=trace.roles.clone(),
                        ref=trace.ref_state.float().cpu(), prompt_length=trace.prompt_length)


STATES_FILE = "states.pt"


def load_or_cache_states(run: Path, init: str | Path, model, examples: list[Example], cfg: RefitConfig
                         ) -> list[CachedStates]:
    """RUN/states.pt when it was cached from the same checkpoint and examples, else a fresh cache saved there
    (a resumed or repeated refit then skips the language model; ~0.15 MB per smol example)."""
    key = {"init": str(Path(init).resolve()), "data": str(Path(cfg.data).resolve()), "split": cfg.split,
           "cot": cfg.cot, "names": [e.name for e in examples]}
    path = run / STATES_FILE
    if path.is_file():
        try:
            saved = torch.load(path, weights_only=True, mmap=True)
            if saved["key"] == key:
                log.info("refit: states of %d examples loaded from %s", len(examples), path)
                return [CachedStates(**d) for d in saved["states"]]
            log.info("refit: %s was cached from another checkpoint or data; caching again", path)
        except (RuntimeError, EOFError, KeyError, TypeError, ValueError) as err:
            log.warning("refit: %s is unreadable (%s); caching again", path, err)
    states = cache_states(model, examples, cfg.cache_batch_size, cfg.cot)
    tmp = path.with_suffix(".tmp")
    torch.save({"key": key, "states": [s.__dict__ for s in states]}, tmp)
    tmp.replace(path)
    return states


def stack_states(states: list[CachedStates], pad_id: int, special_role: int, device):
    """Right-padded [B, T] batch of cached states: (hook [B,T,D], ids, roles, pad [B,T] bool, ref [B,D], prompt lengths [B])."""
    B, T, D = len(states), max(len(s.ids) for s in states), states[0].hook.shape[1]
    hook = torch.zeros(B, T, D)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    roles = torch.full((B, T), special_role, dtype=torch.long)
    pad = torch.ones(B, T, dtype=torch.bool)
    for b, s in enumerate(states):
        n = len(s.ids)
        hook[b, :n], ids[b, :n], roles[b, :n], pad[b, :n] = s.hook.float(), s.ids, s.roles, False
    ref = torch.stack([s.ref for s in states])
    lengths = torch.tensor([s.prompt_length for s in states])
    return (hook.to(device), ids.to(device), roles.to(device), pad.to(device), ref.to(device), lengths.to(device))


def refit_loss(model, batch, states: list[CachedStates], cfg: RefitConfig, device) -> tuple[torch.Tensor, dict]:
    hook, ids, roles, pad, ref, lengths = stack_states(states, model.language.pad_id, int(TokenRole.SPECIAL), device)
    if cfg.ref_dropout > 0:
        ref = ref * (torch.rand(len(ref), 1, device=device) >= cfg.ref_dropout)
    # bf16 autocast (as SFT's): 1.12 s instead of 1.76 s per smol step of 16 on 2 cores (mostly the vision trunk)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
        _, feats = model.vision(batch.pixels_on(device))
        codes = model.codes_from_states(hook, pad) if model.baseline is None else None
        heat, conf, masks = model.heads(codes, roles, pad, ref, feats, batch.valid_hw, ids, lengths)
    heat, conf, masks = heat.float(), conf.float(), masks.float()
    seg = stage_seg_losses(heat, masks, conf, batch.target_heat, batch.target_mask, cfg)
    loss = cfg.seg_weight * seg.seg + cfg.conf_weight * seg.confidence
    return loss, {"seg": float(seg.seg.detach()), "conf": float(seg.confidence.detach()),
                  "dice": float(seg.mask_dice.detach())}


def run_refit(cfg: RefitConfig, init: str | Path, run_dir: str | Path, resume: bool = True) -> Path:
    """Refit the heads of the checkpoint `init` (or resume run_dir); returns the checkpoint folder."""
    from segcompass.model import SegCompass

    check_cot(cfg.cot)  # before any model loads
    if cfg.head == "box_text":
        raise ValueError("refit cannot swap in box_text: its boxes are text the frozen language model would "
                         "have to write (use `sft --init CKPT --head box_text`)")
    if cfg.mixed_precision not in ("no", "bf16"):
        raise ValueError(f"refit mixed_precision must be 'no' or 'bf16', got {cfg.mixed_precision!r}")
    run = setup_run(run_dir, "refit")
    cfg = with_runnable_precision(cfg)
    save_config(cfg, run / "refit_config.json")
    seed_everything(cfg.seed)
    state = load_state(run) if resume else None
    model = SegCompass.from_pretrained(run / MODEL_DIR if state is not None else init, device=default_device())
    device = model._device()
    if state is None and cfg.head:
        swap_head(model, cfg.head)
        log.info("refit: head swapped to a fresh %s head", cfg.head)
    if model.baseline is not None and cfg.ref_dropout > 0:
        raise ValueError(f"a {model.config.head} head reads only the reference state: refit it with ref_dropout=0")
    examples = load_examples(cfg.data, cfg.split, model.config, cfg.limit)
    states = load_or_cache_states(run, init, model, examples, cfg)
    model.requires_grad_(False)
    modules = trained_modules(model)
    for m in modules:
        m.requires_grad_(True)
    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.AdamW([{"params": params, "lr": cfg.lr, "base_lr": cfg.lr}], weight_decay=cfg.weight_decay)
    clock = Clock(cfg.steps, cfg.minutes)
    step = resume_state(state, optimizer, clock, "refit")
    model.train()
    batches = Batches(len(examples), min(cfg.batch_size, len(examples)), cfg.seed)
    log.info("refit: %d examples cached, %d trainable parameters", len(examples), sum(p.numel() for p in params))

    def refit_step(step: int):
        idx = batches.at(step)
        loss, stats = refit_loss(model, collate([examples[i] for i in idx]), [states[i] for i in idx], cfg, device)
        return loss, stats, ""

    train_loop("refit", run, model, optimizer, clock, step, cfg, refit_step, log_every=50)
    return run / MODEL_DIR
