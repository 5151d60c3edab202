"""Checkpoint folders: config.json + model.safetensors + tokenizer files. No pickle anywhere."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import SegCompassConfig

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(ValueError):
    """A checkpoint folder is missing, incomplete or corrupt."""


def external_prefixes(model) -> tuple[str, ...]:
    """State-dict prefixes of the weights that load from a package or a local folder (pretrained
    base weights of `smol` and full-scale models): never stored in a checkpoint, so never trained."""
    return tuple(getattr(model.language, "external_prefixes", ())) + tuple(getattr(model.vision, "external_prefixes", ()))


def freeze_external(model) -> int:
    """Freeze every parameter a checkpoint would not store; returns how many tensors were trainable.

    Training stages call this after choosing what trains: an update to such a weight would be
    lost silently at the next save/load.
    """
    skip = external_prefixes(model)
    thawed = [p for n, p in model.named_parameters() if p.requires_grad and any(n.startswith(s) for s in skip)]
    for p in thawed:
        p.requires_grad_(False)
    return len(thawed)


def checkpoint_state(model) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores: everything except frozen weights that load from a package."""
    skip = external_prefixes(model)
    out, seen = {}, set()
    for k, v in model.state_dict().items():
        if any(k.startswith(p) for p in skip):
            continue
        # A tied tensor (e.g. the new token rows shared by tied input/output embeddings) is stored
        # once; loading it restores every alias since they share memory.
        alias = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
        if v.numel() and alias in seen:
            continue
        seen.add(alias)
        out[k] = v
    return out


def save_checkpoint(model, folder, dtype: torch.dtype | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    skip = external_prefixes(model)
    lost = [n for n, p in model.named_parameters() if p.requires_grad and any(n.startswith(s) for s in skip)]
    if lost:
        log.warning("%d trainable parameters load from a package and are not saved (e.g. %s); "
                    "call segcompass.checkpoint.freeze_external(model) before training", len(lost), lost[0])
    model.config.save(folder / CONFIG)
    model.tokenizer.save_pretrained(folder)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
             for k, v in checkpoint_state(model).items()}
    tmp = folder / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "preset": model.config.preset})
    tmp.replace(folder / WEIGHTS)  # atomic: a crash never leaves a half-written checkpoint
    return folder


def load_checkpoint(folder, device: str = "cpu"):
    from transformers import AutoTokenizer

    from .build import build_model

    folder = Path(folder)
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder} is not a SegCompass checkpoint: {name} is missing")
    config = SegCompassConfig.load(folder / CONFIG)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as err:
        raise CheckpointError(f"cannot load the tokenizer of {folder}: {err}") from err
    try:
        state = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{folder / WEIGHTS} is corrupt or unreadable: {err}") from err
    model = build_model(config, tokenizer=tokenizer)
    expected = checkpoint_state(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{folder / WEIGHTS} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    ref = model.state_dict()
    for key, tensor in state.items():
        if tensor.shape != ref[key].shape:
            raise CheckpointError(f"{folder / WEIGHTS}: {key} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(ref[key].shape)}")
    model.load_state_dict({k: v.to(ref[k].dtype) for k, v in state.items()}, strict=False)
    return model.to(device).eval()
