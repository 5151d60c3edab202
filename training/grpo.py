"""GRPO maths: group-normalised advantages, PPO-clipped policy loss, k3 KL to the initial policy.

Shapes: B = prompts x G sampled completions (a group is G consecutive rows), C completion tokens.
All token averages are token-means over the real (unmasked) completion tokens of the batch.

    A_i      = (R_i - mean_group(R)) / (std_group(R) + 1e-6)
    ratio_t  = exp(logp_t - logp_old_t)
    policy   = -mean_t min(ratio_t A, clip(ratio_t, 1 - eps, 1 + eps) A)
    kl_t     = exp(ref_t - logp_t) - (ref_t - logp_t) - 1          # k3, >= 0, unbiased for KL(pi||ref)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GRPOLoss:
    loss: torch.Tensor  # policy + kl_coeff * kl
    policy: torch.Tensor
    kl: torch.Tensor
    clip_fraction: torch.Tensor


def group_advantages(rewards_B: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """(R - group mean) / (group std + eps); groups are consecutive rows (std unbiased, as in trl).

    >>> [round(a, 4) for a in group_advantages(torch.tensor([1., 0., 2., 2.]), 2).tolist()]
    [0.7071, -0.7071, 0.0, 0.0]
    """
    r = rewards_B.float().view(-1, group_size)
    std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
    return ((r - r.mean(dim=1, keepdim=True)) / (std + eps)).view(-1)


def token_logprobs(logits_BCV: torch.Tensor, ids_BC: torch.Tensor) -> torch.Tensor:
    """log pi(ids) under logits [B, C, V] that predict ids [B, C]."""
    return torch.log_softmax(logits_BCV.float(), dim=-1).gather(-1, ids_BC[..., None]).squeeze(-1)


def completion_logprobs(logits_BKV: torch.Tensor, ids_BT: torch.Tensor, prompt_lengths_B: torch.Tensor,
                        attention_mask_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi of each next token under the logits of the LAST K positions of packed sequences
    (prompt left, completion after it, right padding), and the mask of the completion tokens among them.

    K = T gives every position; K = T - min(prompt length) + 1 is the least that still covers every
    completion token. Returns ([B, K-1] log-probs, [B, K-1] bool mask)."""
    T, K = ids_BT.shape[1], logits_BKV.shape[1]
    positions = torch.arange(1, T, device=ids_BT.device)[None]
    completion = (positions >= prompt_lengths_B[:, None]) & (attention_mask_BT[:, 1:] > 0)
    return token_logprobs(logits_BKV[:, :-1], ids_BT[:, T - K + 1:]), completion[:, T - K:]


def masked_mean(x_BC: torch.Tensor, mask_BC: torch.Tensor) -> torch.Tensor:
    mask = mask_BC.to(x_BC.dtype)
    return (x_BC * mask).sum() / mask.sum().clamp_min(1.0)


def k3_kl(logp_BC: torch.Tensor, ref_logp_BC: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref): exp(d) - d - 1 with d = ref - logp.

    >>> float(k3_kl(torch.tensor([-1.0]), torch.tensor([-1.0])))
    0.0
    """
    d = ref_logp_BC - logp_BC
    return torch.exp(d) - d - 1


def grpo_loss(
    logp_BC: torch.Tensor,
    old_logp_BC: torch.Tensor,
    ref_logp_BC: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_BC: torch.Tensor,
    clip_eps: float = 0.2,
    kl_coeff: float = 0.2,
) -> GRPOLoss:
    """Clipped surrogate + kl_coeff * k3 KL, both token-means over the completion tokens."""
    ratio = torch.exp(logp_BC - old_logp_BC)
    adv = advantages_B[:, None].to(logp_BC.dtype)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    policy = masked_mean(-torch.minimum(unclipped, clipped), mask_BC)
    kl = masked_mean(k3_kl(logp_BC, ref_logp_BC), mask_BC)
    clip_fraction = masked_mean(((ratio - 1).abs() > clip_eps).float(), mask_BC).detach()
    return GRPOLoss(loss=policy + kl_coeff * kl, policy=policy, kl=kl, clip_fraction=clip_fraction)
