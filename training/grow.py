"""Grow a stage's run in place to a model config with more inputs, then resume the stage as usual.

    python -m training.grow --run runs/smol-v5/sft --set vision.mask_pixels=true

RUN/model is rebuilt with the changed config. Every weight whose shape is unchanged is copied; a
weight that gained input channels (dim 1, the new channels appended last, as `mask_pixels` does)
keeps its old columns and gets zeros in the new ones, so the grown model computes exactly what the
old one did and training moves the new weights from zero. The AdamW moments in RUN/trainer_state.pt
are padded the same way, so the resumed stage keeps its step, clock and schedule.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from .common import MODEL_DIR, STATE_FILE


def grow_tensor(old: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """`old` zero-padded at the end of dim 1 to `shape`; ValueError for any other change."""
    if old.shape == shape:
        return old
    if (old.dim() != len(shape) or old.dim() < 2 or shape[1] < old.shape[1]
            or old.shape[:1] + old.shape[2:] != shape[:1] + shape[2:]):
        raise ValueError(f"cannot grow a tensor of shape {tuple(old.shape)} to {tuple(shape)}: "
                         "only dim 1 (input channels) may grow")
    out = old.new_zeros(shape)
    out[:, : old.shape[1]] = old
    return out


def grow_state(old: dict[str, torch.Tensor], template: dict[str, torch.Tensor]
               ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Size, torch.Size]]]:
    """The old state grown to the template's shapes; also {name: (old shape, new shape)} of what grew."""
    if set(old) != set(template):
        raise ValueError(f"the configs differ in more than input widths: missing {sorted(set(template) - set(old))[:5]}, "
                         f"unexpected {sorted(set(old) - set(template))[:5]}")
    grown = {k: (old[k].shape, template[k].shape) for k in old if old[k].shape != template[k].shape}
    return {k: grow_tensor(v, template[k].shape).to(template[k].dtype) for k, v in old.items()}, grown


def grow_optimizer(opt_state: dict, grown: dict[str, tuple[torch.Size, torch.Size]]) -> int:
    """Pad, in place, the moments of each grown parameter (found by its old shape, which must be unique
    among the optimizer's tensors); returns how many parameter states were padded."""
    padded = 0
    for name, (old_shape, new_shape) in grown.items():
        hits = [s for s in opt_state["state"].values() if s.get("exp_avg") is not None and s["exp_avg"].shape == old_shape]
        if len(hits) > 1:
            raise ValueError(f"{name}: {len(hits)} optimizer states have its shape {tuple(old_shape)}; cannot tell them apart")
        for s in hits:
            for key in ("exp_avg", "exp_avg_sq"):
                s[key] = grow_tensor(s[key], new_shape)
            padded += 1
    return padded


def grow_run(run: str | Path, changes: dict[str, dict]) -> dict:
    """Grow RUN/model (and RUN/trainer_state.pt if present) to its config with `changes` applied
    ({section: {field: value}}); returns a report."""
    from segcompass.build import build_model
    from segcompass.checkpoint import checkpoint_state
    from segcompass.model import SegCompass

    run = Path(run)
    old_model = SegCompass.from_pretrained(run / MODEL_DIR)
    data = old_model.config.to_dict()
    config = type(old_model.config).from_dict({**data, **{sec: data[sec] | fields for sec, fields in changes.items()}})
    new_model = build_model(config, tokenizer=old_model.tokenizer)
    state, grown = grow_state(checkpoint_state(old_model), checkpoint_state(new_model))
    new_model.load_state_dict(state, strict=False)
    report = {"run": str(run), "changes": changes, "grown": {k: [list(a), list(b)] for k, (a, b) in grown.items()}}
    state_file = run / STATE_FILE
    if state_file.is_file():
        trainer = torch.load(state_file, weights_only=False)
        report["optimizer_states_padded"] = grow_optimizer(trainer["optimizer"], grown)
        tmp = run / (STATE_FILE + ".tmp")
        torch.save(trainer, tmp)
        tmp.replace(state_file)
    new_model.save_pretrained(run / MODEL_DIR)
    return report


def parse_changes(pairs: list[str]) -> dict[str, dict]:
    """["vision.mask_pixels=true"] -> {"vision": {"mask_pixels": True}} (values are JSON)."""
    out: dict[str, dict] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        section, dot, field = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"--set wants SECTION.FIELD=VALUE, got '{pair}'")
        out.setdefault(section, {})[field] = json.loads(value)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a stage's run folder (holds model/ and trainer_state.pt)")
    parser.add_argument("--set", action="append", metavar="SECTION.FIELD=JSON", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(grow_run(args.run, parse_changes(args.set)), indent=2))


if __name__ == "__main__":
    main()
