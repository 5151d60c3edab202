"""Where the shipped checkpoints live, and which one is the default.

The default is the shipped checkpoint with the best measured test gIoU: each shipped folder keeps the
`python -m training eval` output it was shipped with as `eval_test.json`. A folder without a readable
score ranks after every scored one (then by name), so shipping a model never makes it the default
unless it measured better than the one it would replace.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "assets" / "checkpoints"
SCORE_FILE = "eval_test.json"


def measured_giou(folder: str | Path) -> float | None:
    """The test gIoU recorded beside a checkpoint (`eval_test.json`), or None when absent/unreadable."""
    try:
        value = float(json.loads((Path(folder) / SCORE_FILE).read_text())["gIoU"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None if math.isnan(value) else value


def shipped_checkpoints() -> list[Path]:
    """Every shipped checkpoint folder, best measured test gIoU first."""
    if not CHECKPOINT_DIR.is_dir():
        return []
    found = [f for f in CHECKPOINT_DIR.iterdir() if (f / "model.safetensors").is_file()]

    def rank(folder: Path):
        score = measured_giou(folder)
        return (score is None, -(score or 0.0), folder.name)

    return sorted(found, key=rank)


def default_checkpoint() -> Path | None:
    """The best shipped checkpoint folder present, or None."""
    found = shipped_checkpoints()
    return found[0] if found else None


def resolve_checkpoint(folder: str | Path | None) -> Path:
    """`folder`, or the default checkpoint when none is given; FileNotFoundError when there is neither."""
    found = Path(folder) if folder else default_checkpoint()
    if found is None:
        raise FileNotFoundError("no checkpoint given and none shipped in assets/checkpoints/: pass --checkpoint DIR")
    return found
