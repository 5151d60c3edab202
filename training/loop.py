"""The optimisation loop of the resumable stages (SFT, joint, refit): one copy of the schedule,
backward, clipping, progress bar, log lines and checkpoints, so the stages differ only in their loss."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from .common import MODEL_DIR, Clock, lr_factor, save_state, set_lr

log = logging.getLogger("training")

# step_fn(step) -> (loss, stats, label): the loss to minimise, floats to show, and a label for the
# step's log line ("" for an ordinary step; a non-empty label logs the step whatever its number).
StepFn = Callable[[int], tuple[torch.Tensor, dict, str]]


def train_loop(name: str, run: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, clock: Clock,
               step: int, cfg, step_fn: StepFn, accelerator=None, log_every: int = 25) -> int:
    """Step until `clock` is done, from `step` (0, or where a resumed run stopped); returns the last step.

    Every step: the learning-rate factor (`lr_factor`: warm-up, then cosine over the clock's progress)
    on each group's base_lr, `step_fn`, backward (through `accelerator` when given, which also
    unscales before clipping), gradient-norm clipping of the model's trainable parameters at
    cfg.grad_clip, the optimizer step. A log line every `log_every` steps or for a labelled step, and
    RUN/model + RUN/trainer_state.pt every cfg.save_every steps and at the end (`save_state`).
    `cfg` needs steps, warmup_steps, grad_clip and save_every."""
    from tqdm import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(total=cfg.steps, initial=step, desc=name, unit="step")
    while not clock.done(step):
        set_lr(optimizer, lr_factor(step, clock.progress(step), cfg.warmup_steps))
        loss, stats, label = step_fn(step)
        optimizer.zero_grad(set_to_none=True)
        if accelerator is not None:
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, cfg.grad_clip)
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items()})
        if label or step % log_every == 0:
            log.info("%s step %d %s%s  lr %.2e  %.0fs", name, step, f"{label} " if label else "",
                     " ".join(f"{k} {v:.4f}" for k, v in stats.items()), optimizer.param_groups[0]["lr"],
                     clock.seconds())
        if step % cfg.save_every == 0:
            save_state(run, model, optimizer, step, clock)
    bar.close()
    save_state(run, model, optimizer, step, clock)
    log.info("%s done: %d steps in %.1f s -> %s", name, step, clock.seconds(), run / MODEL_DIR)
    return step
