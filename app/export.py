"""Export one explored example as a zip: pictures, a JSON record, and a ReasonSeg-layout pair.

    image.png                 the image the model saw
    overlay.png               slot heatmaps + final mask painted over the image (current prediction)
    mask.png                  final mask, 0/255
    heatmap_slot{k}.png       slot k's heatmap, 0..255 (k from 1)
    record.json               instruction, CoT, active concepts with labels, edits, slot confidences, metrics
    reasonseg/NAME.jpg|json   a ReasonSeg pair (text, is_sentence, polygon shapes labelled "target"),
                              loadable by training.data.reasonseg.load_reasonseg as training data
"""

from __future__ import annotations

import io
import json
import re
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
from PIL import Image
from skimage import measure

from .render import blend, compare


def mask_polygons(mask: np.ndarray, tolerance: float = 0.5, min_area: int = 4) -> list[list[list[float]]]:
    """Outer contours of each connected part of a boolean mask, as [[x, y], ...] polygons.

    Holes are filled first (ReasonSeg polygons have no holes); parts smaller than `min_area`
    pixels are dropped. Coordinates are pixel centres, x right, y down.
    """
    parts, n = ndi.label(mask)
    polygons = []
    for i in range(1, n + 1):
        part = ndi.binary_fill_holes(parts == i)
        if part.sum() < min_area:
            continue
        padded = np.pad(part, 1).astype(np.float32)
        contours = measure.find_contours(padded, 0.5)
        if not contours:
            continue
        outer = max(contours, key=len)
        outer = measure.approximate_polygon(outer, tolerance) - 1.0  # undo the padding
        if len(outer) >= 3:
            polygons.append([[round(float(x), 2), round(float(y), 2)] for y, x in outer])
    return polygons


def reasonseg_record(instruction: str, mask: np.ndarray) -> dict:
    return {
        "text": [instruction],
        "is_sentence": len(instruction.split()) > 6 or instruction.rstrip().endswith((".", "?")),
        "shapes": [{"label": "target", "points": p, "shape_type": "polygon"} for p in mask_polygons(mask)],
    }


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:limit].strip("-") or "example"


def export_zip(session, labels: dict, checkpoint: dict, out_dir: str | Path | None = None) -> Path:
    """Write the zip of `session`'s current prediction; returns its path (under the temp dir by default)."""
    trace, pred = session.trace, session.current
    out_dir = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="segcompass-export-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"segcompass-{slug(trace.instruction)}-{time.strftime('%Y%m%d-%H%M%S')}"
    cot = session.reasoned.cot if session.current is session.reasoned_pred and session.reasoned else trace.cot
    record = {
        "instruction": trace.instruction,
        "cot": cot,
        "cot_before_edits": trace.cot,
        "completion": trace.completion,
        "reference_token_found": trace.ref_found,
        "image_size": list(trace.original_size),
        "checkpoint": checkpoint,
        "edits": [e.to_dict() for e in session.edits],
        "re_reasoned": session.current is session.reasoned_pred,
        "slot_confidences": [round(float(c), 6) for c in pred.confidences],
        "kept_slots": list(pred.kept_slots),
        "mask_pixels": int(pred.mask.sum()),
        "metrics": compare(session.base, pred).to_dict(),
        "concepts": [
            {**c.to_dict(), "label": labels[c.concept].text if c.concept in labels else "",
             "label_source": labels[c.concept].source if c.concept in labels else "",
             "edited": any(e.concept == c.concept for e in session.edits)}
            for c in session.concepts
        ],
    }
    path = out_dir / f"{name}.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("image.png", _png(session.image))
        z.writestr("overlay.png", _png(blend(session.image, pred)))
        z.writestr("mask.png", _png(pred.mask.astype(np.uint8) * 255))
        for k in range(pred.slot_heatmaps.shape[0]):
            z.writestr(f"heatmap_slot{k + 1}.png", _png((np.clip(pred.slot_heatmaps[k], 0, 1) * 255).astype(np.uint8)))
        z.writestr("record.json", json.dumps(record, indent=2))
        z.writestr(f"reasonseg/{name}.jpg", _jpeg(session.image))
        z.writestr(f"reasonseg/{name}.json", json.dumps(reasonseg_record(trace.instruction, pred.mask), indent=2))
    return path
