"""Reward edge cases: malformed format, stray text, empty targets, several targets."""

import pytest
import torch

from training.rewards import format_reward, mask_score, total_reward


@pytest.mark.parametrize("text, expected", [
    ("<think> the red circle . </think> <REF_POS> <eos>", 1.0),
    ("<think> the red circle . </think> <REF_POS>", 1.0),
    ("<think> a b c </think> <REF_POS> <eos> <pad> <pad>", 1.0),
    ("hello <think> the red circle . </think> <REF_POS>", 0.9),  # stray text before
    ("<think> red </think> so <REF_POS>", 0.9),  # stray text between
    ("<think> red </think> <REF_POS> more", 0.9),  # stray text after
    ("<think> red <REF_POS> </think> <REF_POS>", 0.9),  # reference token inside the reasoning
    ("<think> " + "word " * 65 + "</think> <REF_POS>", 0.9),  # overlong
    ("<think> </think> <REF_POS>", 0.0),  # empty reasoning
    ("<think> red circle </think>", 0.0),  # no reference token
    ("<think> red circle <REF_POS>", 0.0),  # unclosed
    ("red circle </think> <REF_POS>", 0.0),  # never opened
    ("<think> a </think> <think> b </think> <REF_POS>", 0.0),  # two blocks
    ("<REF_POS> <think> a </think>", 0.0),  # reference token before the reasoning only
    ("", 0.0),
])
def test_format_reward(text, expected):
    assert format_reward(text) == expected


def square(size=8, box=(0, 0, 4, 4)):
    m = torch.zeros(size, size)
    m[box[1]:box[3], box[0]:box[2]] = 1
    return m


def test_mask_score_single_target():
    t = square()[None]
    perfect = torch.stack([square(), torch.zeros(8, 8)])
    assert mask_score(perfect, torch.tensor([True, False]), t) == pytest.approx(1.0)
    # an unkept slot does not count, a kept wrong slot hurts
    assert mask_score(perfect, torch.tensor([False, False]), t) == 0.0
    wrong = torch.stack([square(box=(4, 4, 8, 8)), torch.zeros(8, 8)])
    assert mask_score(wrong, torch.tensor([True, False]), t) == pytest.approx(0.0)
    # soft probabilities: 0.5 soft IoU + 0.2 soft Dice + 0.3 hard IoU
    soft = torch.stack([square() * 0.8, torch.zeros(8, 8)])
    expected = 0.5 * 0.8 + 0.2 * (2 * 0.8 * 16 / (0.8 * 16 + 16)) + 0.3 * 1.0
    assert mask_score(soft, torch.tensor([True, False]), t) == pytest.approx(expected, rel=1e-5)


def test_mask_score_empty_target():
    empty = torch.zeros(0, 8, 8)
    assert mask_score(torch.zeros(4, 8, 8), torch.zeros(4, dtype=torch.bool), empty) == 1.0
    assert mask_score(torch.ones(4, 8, 8), torch.zeros(4, dtype=torch.bool), empty) == 1.0  # nothing kept
    assert mask_score(torch.ones(4, 8, 8), torch.tensor([True, False, False, False]), empty) == 0.0
    # predicting nothing on a non-empty target scores 0
    assert mask_score(torch.zeros(4, 8, 8), torch.zeros(4, dtype=torch.bool), square()[None]) == 0.0


def test_mask_score_several_targets_hungarian_over_max_kept_targets():
    a, b = square(box=(0, 0, 4, 4)), square(box=(4, 4, 8, 8))
    targets = torch.stack([a, b])
    slots = torch.stack([b, a, torch.zeros(8, 8), a])
    # slots 0 and 1 match b and a perfectly (order does not matter)
    assert mask_score(slots, torch.tensor([True, True, False, False]), targets) == pytest.approx(1.0)
    # a third kept slot (duplicate) is unmatched: 2 / max(3, 2)
    assert mask_score(slots, torch.tensor([True, True, False, True]), targets) == pytest.approx(2 / 3)
    # only one kept: 1 / max(1, 2)
    assert mask_score(slots, torch.tensor([True, False, False, False]), targets) == pytest.approx(0.5)


def test_total_reward_weights():
    assert total_reward(1.0, 1.0) == pytest.approx(1.0)
    assert total_reward(0.9, 0.5) == pytest.approx(0.3 * 0.9 + 0.7 * 0.5)
