"""Where the shipped checkpoints live, and which one is the default."""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "assets" / "checkpoints"
PREFERENCE = ("smol", "tiny")  # best first


def default_checkpoint() -> Path | None:
    """The best shipped checkpoint folder present, or None."""
    for name in PREFERENCE:
        folder = CHECKPOINT_DIR / name
        if (folder / "model.safetensors").is_file():
            return folder
    return None


def resolve_checkpoint(folder: str | Path | None) -> Path:
    """`folder`, or the default checkpoint when none is given; FileNotFoundError when there is neither."""
    found = Path(folder) if folder else default_checkpoint()
    if found is None:
        raise FileNotFoundError("no checkpoint given and none shipped in assets/checkpoints/: pass --checkpoint DIR")
    return found
