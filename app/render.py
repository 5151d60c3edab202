"""Pictures and numbers the explorer shows: slot overlays, token shading, before/after change.

Pure functions of numpy arrays and model records; no gradio here.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

from segcompass.records import Prediction

SLOT_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45")
MASK_COLOUR = "#00e5ff"  # cyan: no ShapeWorld object has this colour
HEAT_FLOOR = 0.15  # heatmap probabilities below this are drawn transparent
HEAT_OPACITY = 0.6
MASK_OPACITY = 0.45


def slot_colour(k: int) -> str:
    return SLOT_COLOURS[k % len(SLOT_COLOURS)]


def concept_colour(concept: int) -> str:
    """A stable, distinct-looking colour per concept (golden-ratio hue walk), as #rrggbb."""
    hue = (concept * 0.618033988749895) % 1.0
    r, g, b = colorsys.hls_to_rgb(hue, 0.72, 0.75)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def _rgb(hex_colour: str) -> np.ndarray:
    h = hex_colour.lstrip("#")
    return np.array([int(h[i: i + 2], 16) for i in (0, 2, 4)], dtype=np.float32)


def heat_alpha(heat_HW: np.ndarray) -> np.ndarray:
    """[H, W] opacity 0..HEAT_OPACITY of a slot heatmap (probabilities 0..1)."""
    h = np.clip(heat_HW.astype(np.float32), 0.0, 1.0)
    return np.where(h >= HEAT_FLOOR, h * HEAT_OPACITY, 0.0)


def slot_name(k: int, pred: Prediction) -> str:
    kept = " ✓" if k in pred.kept_slots else ""
    return f"slot {k + 1} ({float(pred.confidences[k]):.2f}){kept}"


def annotations(image: np.ndarray | str, pred: Prediction) -> tuple[tuple, dict[str, str]]:
    """(value, color_map) for gr.AnnotatedImage: every slot's heatmap in its colour, then the mask."""
    items, colours = [], {}
    for k in range(pred.slot_heatmaps.shape[0]):
        name = slot_name(k, pred)
        items.append((heat_alpha(pred.slot_heatmaps[k]), name))
        colours[name] = slot_colour(k)
    name = f"mask ({int(pred.mask.sum())} px)"
    items.append((pred.mask.astype(np.float32) * MASK_OPACITY, name))
    colours[name] = MASK_COLOUR
    return (image, items), colours


def blend(image: np.ndarray, pred: Prediction) -> np.ndarray:
    """[H, W, 3] uint8: the image with every slot heatmap and the mask painted over it (for export)."""
    out = image.astype(np.float32)
    layers = [(heat_alpha(pred.slot_heatmaps[k]), slot_colour(k)) for k in range(pred.slot_heatmaps.shape[0])]
    layers.append((pred.mask.astype(np.float32) * MASK_OPACITY, MASK_COLOUR))
    for alpha, colour in layers:
        a = alpha[..., None]
        out = out * (1 - a) + _rgb(colour) * a
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


# ---- before / after ---------------------------------------------------------------------------
def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; two empty masks agree perfectly (1.0).

    >>> mask_iou(np.array([True, False]), np.array([True, True]))
    0.5
    >>> mask_iou(np.zeros(3, bool), np.zeros(3, bool))
    1.0
    """
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@dataclass(frozen=True)
class Change:
    """How an edited prediction differs from the unedited one."""

    iou: float  # IoU between the old and the new final mask
    pixels_changed: int  # pixels whose mask value flipped
    pixels_before: int
    pixels_after: int
    confidence_before: tuple[float, ...]  # [K]
    confidence_after: tuple[float, ...]
    kept_before: tuple[int, ...]
    kept_after: tuple[int, ...]

    @property
    def confidence_delta(self) -> tuple[float, ...]:
        return tuple(b - a for a, b in zip(self.confidence_before, self.confidence_after))

    def to_dict(self) -> dict:
        return {
            "mask_iou_old_new": round(self.iou, 6), "pixels_changed": self.pixels_changed,
            "mask_pixels_before": self.pixels_before, "mask_pixels_after": self.pixels_after,
            "slot_confidence_before": [round(c, 6) for c in self.confidence_before],
            "slot_confidence_after": [round(c, 6) for c in self.confidence_after],
            "slot_confidence_delta": [round(c, 6) for c in self.confidence_delta],
            "kept_slots_before": list(self.kept_before), "kept_slots_after": list(self.kept_after),
        }


def compare(before: Prediction, after: Prediction) -> Change:
    return Change(
        iou=mask_iou(before.mask, after.mask),
        pixels_changed=int(np.logical_xor(before.mask, after.mask).sum()),
        pixels_before=int(before.mask.sum()), pixels_after=int(after.mask.sum()),
        confidence_before=tuple(float(c) for c in before.confidences),
        confidence_after=tuple(float(c) for c in after.confidences),
        kept_before=tuple(before.kept_slots), kept_after=tuple(after.kept_slots),
    )


def change_markdown(change: Change, n_edits: int) -> str:
    rows = "\n".join(
        f"| slot {k + 1} | {a:.3f} | {b:.3f} | {b - a:+.3f} |"
        for k, (a, b) in enumerate(zip(change.confidence_before, change.confidence_after))
    )
    hint = ""
    if n_edits and change.pixels_changed == 0:
        hint = ("\n\nThe mask did not move: here the slots see the edited concepts but keep the reference "
                "token's state, which can carry the answer on its own. **Re-reason with these edits** regenerates "
                "the CoT with the edit inside the language model and shows its full effect.")
    return (
        f"**{n_edits} edit{'s' if n_edits != 1 else ''}** · mask IoU old/new **{change.iou:.3f}** · "
        f"pixels changed **{change.pixels_changed}** ({change.pixels_before} → {change.pixels_after} px)\n\n"
        f"| slot | confidence before | after | change |\n|---|---|---|---|\n{rows}{hint}"
    )
