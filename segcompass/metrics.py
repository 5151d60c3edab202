"""Segmentation scores, the public ReasonSeg convention (shared/spec/shapeworld.md, "Scoring").

Per example, the predicted mask (H, W) bool is compared with the ground truth (H, W) uint8
(0 background, 1 target, 255 ignored) at the original resolution; ignored pixels count in
neither intersection nor union. IoU = I / U, and 1 when U = 0 (empty on empty is right).
gIoU = mean IoU; cIoU = ΣI / ΣU. N-acc: share of empty targets predicted empty; T-acc: share
of non-empty targets predicted non-empty ("empty" over the scored pixels). A missing
prediction (None) is an empty mask, never a skipped example.

>>> gt = np.array([[1, 1], [0, 255]], dtype=np.uint8)
>>> intersection_union(np.array([[True, False], [False, True]]), gt)
(1, 2)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

IGNORE = 255


def _scored(pred: np.ndarray | None, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(predicted, target) bool masks over the scored pixels; None predicts nothing."""
    gt = np.asarray(gt)
    if gt.ndim != 2:
        raise ValueError(f"ground truth must be (H, W), got shape {gt.shape}")
    valid = gt != IGNORE
    if pred is None:
        return np.zeros(gt.shape, dtype=bool), (gt != 0) & valid
    pred = np.asarray(pred)
    if pred.shape != gt.shape:
        raise ValueError(
            f"prediction shape {pred.shape} != ground truth shape {gt.shape}: predict at the original resolution"
        )
    return pred.astype(bool) & valid, (gt != 0) & valid


def intersection_union(pred: np.ndarray | None, gt: np.ndarray) -> tuple[int, int]:
    """Pixel counts (I, U) of a prediction (H, W) bool against a ground truth (H, W) uint8, 255 excluded."""
    p, g = _scored(pred, gt)
    return int(np.count_nonzero(p & g)), int(np.count_nonzero(p | g))


def iou(pred: np.ndarray | None, gt: np.ndarray) -> float:
    """IoU of one example; 1.0 when the union is empty.

    >>> iou(None, np.zeros((2, 2), dtype=np.uint8))
    1.0
    """
    inter, union = intersection_union(pred, gt)
    return 1.0 if union == 0 else inter / union


@dataclass(frozen=True)
class Scores:
    """A split's scores. `n_acc` / `t_acc` are None when the split has no empty / non-empty targets."""

    giou: float
    ciou: float
    n_acc: float | None
    t_acc: float | None
    count: int
    per_family: dict[str, float]  # gIoU per query family (examples with a family only)
    family_counts: dict[str, int]


class Scoreboard:
    """Accumulates examples one at a time; `result()` gives the split's Scores."""

    def __init__(self) -> None:
        self._ious: list[float] = []
        self._inter = 0
        self._union = 0
        self._empty_right: list[bool] = []  # per empty target: predicted empty?
        self._target_right: list[bool] = []  # per non-empty target: predicted non-empty?
        self._family_ious: dict[str, list[float]] = defaultdict(list)

    def add(self, pred: np.ndarray | None, gt: np.ndarray, family: str | None = None) -> float:
        """Score one example (pred (H, W) bool or None, gt (H, W) uint8); returns its IoU."""
        p, g = _scored(pred, gt)
        inter, union = int(np.count_nonzero(p & g)), int(np.count_nonzero(p | g))
        value = 1.0 if union == 0 else inter / union
        self._ious.append(value)
        self._inter += inter
        self._union += union
        if g.any():
            self._target_right.append(bool(p.any()))
        else:
            self._empty_right.append(not p.any())
        if family is not None:
            self._family_ious[family].append(value)
        return value

    def result(self) -> Scores:
        """The scores of everything added so far (gIoU and cIoU are NaN when nothing was added)."""
        if not self._ious:
            giou = ciou = float("nan")
        else:
            giou = float(np.mean(self._ious))
            ciou = self._inter / self._union if self._union else 1.0
        return Scores(
            giou=giou,
            ciou=ciou,
            n_acc=float(np.mean(self._empty_right)) if self._empty_right else None,
            t_acc=float(np.mean(self._target_right)) if self._target_right else None,
            count=len(self._ious),
            per_family={f: float(np.mean(v)) for f, v in sorted(self._family_ious.items())},
            family_counts={f: len(v) for f, v in sorted(self._family_ious.items())},
        )


def score_split(
    preds: Sequence[np.ndarray | None],
    gts: Sequence[np.ndarray],
    families: Sequence[str | None] | None = None,
) -> Scores:
    """Scores of a whole split: preds[i] (H_i, W_i) bool or None against gts[i] (H_i, W_i) uint8."""
    if len(preds) != len(gts) or (families is not None and len(families) != len(gts)):
        raise ValueError(
            f"got {len(preds)} predictions, {len(gts)} ground truths"
            + ("" if families is None else f", {len(families)} families")
        )
    board = Scoreboard()
    for i, (pred, gt) in enumerate(zip(preds, gts)):
        board.add(pred, gt, None if families is None else families[i])
    return board.result()
