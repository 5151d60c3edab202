"""gIoU / cIoU / N-acc / T-acc edge cases (shared/spec/shapeworld.md, "Scoring")."""

from __future__ import annotations

import math

import numpy as np
import pytest

from segcompass.metrics import Scoreboard, intersection_union, iou, score_split


def _gt(*rows: str) -> np.ndarray:
    """'.' = 0, '#' = 1, 'x' = 255."""
    return np.array([[{".": 0, "#": 1, "x": 255}[c] for c in row] for row in rows], dtype=np.uint8)


def _pred(*rows: str) -> np.ndarray:
    return np.array([[c == "#" for c in row] for row in rows])


def test_empty_prediction_on_empty_target_is_one():
    gt = _gt("...", "...")
    assert intersection_union(_pred("...", "..."), gt) == (0, 0)
    assert iou(_pred("...", "..."), gt) == 1.0
    assert iou(_pred("#..", "..."), gt) == 0.0


def test_ignored_pixels_count_in_neither_intersection_nor_union():
    gt = _gt("##x", "..x")
    assert intersection_union(_pred("###", "..#"), gt) == (2, 2)
    assert intersection_union(_pred("#..", "..."), gt) == (1, 2)
    # A prediction only on ignored pixels of an empty target is an empty prediction.
    assert iou(_pred("..#", "..."), _gt("..x", "...")) == 1.0


def test_ciou_and_giou_differ():
    big, small = _gt("####", "####"), _gt("#...", "....")
    preds = [_pred("####", "####"), _pred("....", "....")]  # big right (IoU 1), small missed (IoU 0)
    scores = score_split(preds, [big, small])
    assert scores.giou == pytest.approx(0.5)
    assert scores.ciou == pytest.approx(8 / 9)
    assert scores.count == 2


def test_missing_prediction_is_an_empty_mask_not_a_skip():
    gts = [_gt("##", ".."), _gt("..", "..")]
    scores = score_split([None, None], gts)
    assert scores.count == 2
    assert scores.giou == pytest.approx(0.5)  # 0 on the target, 1 on the empty one
    assert scores.ciou == 0.0
    assert scores.n_acc == 1.0 and scores.t_acc == 0.0


def test_n_acc_and_t_acc():
    gts = [_gt("..", ".."), _gt("..", ".."), _gt("#.", ".."), _gt("#.", "..")]
    preds = [_pred("..", ".."), _pred(".#", ".."), _pred("#.", ".."), _pred(".#", "..")]
    scores = score_split(preds, gts, families=["none", "none", "attribute", "multi"])
    assert scores.n_acc == 0.5  # one of two empty targets predicted empty
    assert scores.t_acc == 1.0  # both non-empty targets predicted non-empty (even if wrong)
    assert scores.per_family == {"attribute": 1.0, "multi": 0.0, "none": 0.5}
    assert scores.family_counts == {"attribute": 1, "multi": 1, "none": 2}


def test_accuracies_are_none_without_such_targets_and_empty_board_is_nan():
    scores = score_split([_pred("#")], [_gt("#")])
    assert scores.n_acc is None and scores.t_acc == 1.0
    empty = Scoreboard().result()
    assert empty.count == 0 and math.isnan(empty.giou) and math.isnan(empty.ciou)


def test_all_empty_split_has_ciou_one():
    assert score_split([None], [_gt("..")]).ciou == 1.0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="original resolution"):
        iou(np.zeros((4, 4), dtype=bool), np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(ValueError):
        score_split([None], [_gt(".."), _gt("..")])


def test_scoreboard_matches_score_split():
    rng = np.random.default_rng(0)
    gts = [rng.choice(np.array([0, 1, 255], dtype=np.uint8), size=(5, 7), p=[0.5, 0.4, 0.1]) for _ in range(6)]
    preds = [rng.random((5, 7)) < 0.5 for _ in range(6)]
    board = Scoreboard()
    values = [board.add(p, g) for p, g in zip(preds, gts)]
    assert values == [iou(p, g) for p, g in zip(preds, gts)]
    assert board.result() == score_split(preds, gts)
