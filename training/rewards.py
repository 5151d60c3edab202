"""GRPO rewards: pure functions of one completion and one predicted segmentation.

    reward = 0.3 * format + 0.7 * mask score

Format in {0, 0.9, 1}: one non-empty `<think>...</think>` followed by the reference token; 0.9
when the reasoning is overlong or there is stray text around the parts; 0 when malformed.
Mask score: a single target scores 0.5 soft IoU + 0.2 soft Dice + 0.3 hard IoU of the union of
the kept (confident) slots; several targets score the Hungarian-matched hard IoU of the kept
slots, summed and divided by max(#kept, #targets); an empty prediction on an empty target is 1.
"""

from __future__ import annotations

import torch

from segcompass.tokenizer import EOS, PAD, REF_TOKEN, THINK_END, THINK_START

from .losses import hungarian_match

FORMAT_WEIGHT, MASK_WEIGHT = 0.3, 0.7


def format_reward(completion: str, max_reasoning_words: int = 64) -> float:
    """Score the layout of a completion (special tokens kept in the text).

    >>> format_reward("<think> the red circle . </think> <REF_POS> <eos>")
    1.0
    >>> format_reward("well <think> the red circle . </think> <REF_POS>")
    0.9
    >>> format_reward("<think> </think> <REF_POS>")
    0.0
    >>> format_reward("<think> red circle </think>")
    0.0
    """
    text = completion.replace(PAD, " ").strip()
    while text.endswith(EOS):
        text = text[: -len(EOS)].rstrip()
    if text.count(THINK_START) != 1 or text.count(THINK_END) != 1:
        return 0.0
    before, rest = text.split(THINK_START, 1)
    reasoning, after = rest.split(THINK_END, 1)
    if THINK_END in before or not reasoning.replace(REF_TOKEN, " ").strip() or REF_TOKEN not in after:
        return 0.0
    between, tail = after.split(REF_TOKEN, 1)
    stray = bool(before.strip() or between.strip() or tail.strip() or REF_TOKEN in reasoning)
    overlong = len(reasoning.split()) > max_reasoning_words
    return 0.9 if (stray or overlong) else 1.0


def _soft_iou(p: torch.Tensor, t: torch.Tensor) -> float:
    inter = (p * t).sum()
    union = p.sum() + t.sum() - inter
    return float(inter / union) if float(union) > 0 else 1.0


def _soft_dice(p: torch.Tensor, t: torch.Tensor) -> float:
    denom = p.sum() + t.sum()
    return float(2 * (p * t).sum() / denom) if float(denom) > 0 else 1.0


def mask_score(slot_probs_KP: torch.Tensor, kept_K: torch.Tensor, targets_NP: torch.Tensor) -> float:
    """Score one prediction: slot mask probabilities [K, ...], kept slots [K] bool, target masks [N, ...].

    >>> t = torch.tensor([[1., 1., 0., 0.]])
    >>> mask_score(torch.tensor([[1., 1., 0., 0.], [0., 0., 1., 1.]]), torch.tensor([True, False]), t)
    1.0
    >>> mask_score(torch.zeros(2, 4), torch.tensor([False, False]), torch.zeros(0, 4))
    1.0
    >>> mask_score(torch.ones(2, 4), torch.tensor([True, False]), torch.zeros(0, 4))
    0.0
    """
    probs = slot_probs_KP.flatten(1).float()
    targets = (targets_NP.flatten(1).float() > 0.5).float()
    kept = kept_K.bool()
    n_kept, n_targets = int(kept.sum()), targets.shape[0]
    if n_targets == 0:
        return 1.0 if n_kept == 0 or float((probs[kept] > 0.5).sum()) == 0 else 0.0
    if n_kept == 0:
        return 0.0
    if n_targets == 1:
        union_soft = probs[kept].max(0).values
        union_hard = (union_soft > 0.5).float()
        t = targets[0]
        return 0.5 * _soft_iou(union_soft, t) + 0.2 * _soft_dice(union_soft, t) + 0.3 * _soft_iou(union_hard, t)
    hard = (probs[kept] > 0.5).float()
    inter = hard @ targets.t()
    union = hard.sum(-1, keepdim=True) + targets.sum(-1)[None] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1e-9), torch.ones_like(inter))
    pairs = hungarian_match(iou)
    return float(sum(float(iou[k, n]) for k, n in pairs) / max(n_kept, n_targets))


def total_reward(format_score: float, mask: float) -> float:
    """0.3 * format + 0.7 * mask score."""
    return FORMAT_WEIGHT * format_score + MASK_WEIGHT * mask
