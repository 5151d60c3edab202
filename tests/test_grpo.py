"""GRPO maths: group-normalised advantages, PPO clipping, k3 KL, token-mean masking."""

import torch

from training.grpo import group_advantages, grpo_loss, k3_kl, masked_mean, token_logprobs


def test_advantages_are_normalised_within_each_group():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
    a = group_advantages(r, 4)
    g0 = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.allclose(a[:4], (g0 - g0.mean()) / (g0.std() + 1e-6))
    assert torch.allclose(a[4:], torch.zeros(4))  # identical rewards: no signal
    assert abs(float(a[:4].sum())) < 1e-5


def test_clipping_stops_the_gradient_beyond_the_trust_region():
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    ref = torch.zeros(1, 2)
    # ratio e^0.5 > 1.2 with a positive advantage: clipped, no gradient
    logp = torch.full((1, 2), 0.5, requires_grad=True)
    out = grpo_loss(logp, old, ref, torch.tensor([1.0]), mask, clip_eps=0.2, kl_coeff=0.0)
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.zeros(1, 2))
    assert float(out.clip_fraction) == 1.0
    # same ratio, negative advantage: the unclipped (pessimistic) term keeps its gradient
    logp = torch.full((1, 2), 0.5, requires_grad=True)
    grpo_loss(logp, old, ref, torch.tensor([-1.0]), mask, kl_coeff=0.0).loss.backward()
    assert bool((logp.grad > 0).all())
    # on-policy (ratio 1): loss = -A, gradient = -A / n_tokens per token
    logp = torch.zeros(1, 2, requires_grad=True)
    out = grpo_loss(logp, logp.detach(), ref, torch.tensor([2.0]), mask, kl_coeff=0.0)
    assert float(out.policy) == -2.0
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.full((1, 2), -1.0))


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    assert torch.allclose(k3_kl(logp, logp), torch.zeros(3))
    assert bool((k3_kl(logp, logp - 0.3) > 0).all()) and bool((k3_kl(logp, logp + 0.3) > 0).all())
    # unbiased: E_pi[k3] = KL(pi || ref) for categorical distributions
    p = torch.tensor([0.7, 0.2, 0.1])
    q = torch.tensor([0.5, 0.3, 0.2])
    kl = float((p * (p / q).log()).sum())
    est = float((p * k3_kl(p.log(), q.log())).sum())
    assert abs(kl - est) < 1e-6


def test_token_mean_ignores_padding_and_logprobs_gather():
    x = torch.tensor([[1.0, 3.0, 100.0], [2.0, 100.0, 100.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert float(masked_mean(x, m)) == 2.0
    logits = torch.log(torch.tensor([[[0.25, 0.75], [0.5, 0.5]]]))
    lp = token_logprobs(logits, torch.tensor([[1, 0]]))
    assert torch.allclose(lp, torch.log(torch.tensor([[0.75, 0.5]])))


def test_completion_logprobs_from_the_last_positions_equal_the_full_pass():
    """The joint stage computes LM logits only from the shortest prompt's last position on: the
    completion tokens' log-probs and mask must equal those read from every position."""
    from training.grpo import completion_logprobs

    torch.manual_seed(0)
    B, T, V = 3, 9, 11
    logits = torch.randn(B, T, V)
    ids = torch.randint(0, V, (B, T))
    prompt_lengths = torch.tensor([3, 5, 4])
    attention = torch.ones(B, T, dtype=torch.long)
    attention[0, 7:] = 0  # right padding
    full_logp, full_mask = completion_logprobs(logits, ids, prompt_lengths, attention)
    keep = T - int(prompt_lengths.min()) + 1
    kept_logp, kept_mask = completion_logprobs(logits[:, -keep:], ids, prompt_lengths, attention)
    assert full_mask.sum() == kept_mask.sum() == (6 - 2) + (8 - 4) + (8 - 3)
    assert torch.equal(full_logp[full_mask], kept_logp[kept_mask])
    assert torch.isclose(masked_mean(full_logp, full_mask), masked_mean(kept_logp, kept_mask))
    # row 1's first completion token (position 5) is predicted by the logits at position 4
    assert torch.isclose(kept_logp[1][kept_mask[1]][0], torch.log_softmax(logits[1, 4], -1)[ids[1, 5]])
