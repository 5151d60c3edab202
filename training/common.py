"""Shared plumbing of the stages: run folders, logging, resumable trainer state, schedules, freezing."""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger("training")

MODEL_DIR = "model"
STATE_FILE = "trainer_state.pt"


def setup_run(run_dir: str | Path, name: str) -> Path:
    """Create the run folder and log to RUN/NAME.log as well as stderr."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not any(isinstance(h, logging.FileHandler) and h.baseFilename == str((run / f"{name}.log").resolve())
               for h in root.handlers):
        fh = logging.FileHandler(run / f"{name}.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)
    if not any(type(h) is logging.StreamHandler for h in root.handlers):
        sh = logging.StreamHandler()
        sh.setFormatter(fmt)
        root.addHandler(sh)
    return run


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Clock:
    """Progress of a stage in [0, 1]: the larger of step / steps and elapsed / budget."""

    steps: int
    minutes: float
    elapsed: float = 0.0  # seconds spent in earlier (resumed-from) runs
    _start: float = field(default_factory=time.perf_counter)

    def seconds(self) -> float:
        return self.elapsed + time.perf_counter() - self._start

    def progress(self, step: int) -> float:
        by_time = self.seconds() / (60 * self.minutes) if self.minutes > 0 else 0.0
        return min(1.0, max(step / max(1, self.steps), by_time))

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0


def lr_factor(step: int, progress: float, warmup_steps: int) -> float:
    """Linear warm-up over warmup_steps, then cosine from 1 to 0.05 over progress."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    return warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def freeze(module: nn.Module, trainable: bool = False) -> None:
    for p in module.parameters():
        p.requires_grad_(trainable)


def save_state(run: Path, model, optimizer, step: int, clock: Clock, extra: dict | None = None) -> None:
    """model/ (a plain checkpoint) + trainer_state.pt (optimizer, step, time, RNG) beside it."""
    model.save_pretrained(run / MODEL_DIR)
    state = {
        "step": step, "elapsed": clock.seconds(), "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(), "numpy_rng": list(np.random.get_state()[1].tolist()),
        "extra": extra or {},
    }
    tmp = run / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    tmp.replace(run / STATE_FILE)


def load_state(run: Path) -> dict | None:
    path = run / STATE_FILE
    if not (path.is_file() and (run / MODEL_DIR / "model.safetensors").is_file()):
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch_rng"])


def resume_state(state: dict | None, optimizer: torch.optim.Optimizer, clock: Clock, stage: str) -> int:
    """Restore optimizer, clock and RNG from a trainer state; returns the step to continue from."""
    if state is None:
        return 0
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as err:  # the trainable set changed since the state was saved
        log.warning("optimizer state not restored (%s); continuing with a fresh optimizer", err)
    clock.elapsed = state["elapsed"]
    restore_rng(state)
    log.info("resuming the %s stage from step %d", stage, state["step"])
    return state["step"]


class Batches:
    """Endless shuffled mini-batches of indices (epoch by epoch), reproducible from (seed, step)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed

    def at(self, step: int) -> list[int]:
        per_epoch = max(1, self.n // self.batch_size)
        epoch, i = divmod(step, per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return order[i * self.batch_size: (i + 1) * self.batch_size].tolist()


def default_device() -> torch.device:
    """The GPU when one is visible, else the CPU: where the stages without accelerate (SAE, eval) run."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def count(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
