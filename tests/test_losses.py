"""Hungarian slot matching and the segmentation / confidence losses."""

import pytest
import torch

from training.losses import dice_loss, focal_loss, hungarian_match, seg_losses, soft_iou_matrix


def test_hungarian_matching_by_soft_iou():
    a = torch.zeros(4, 4); a[:2] = 1
    b = torch.zeros(4, 4); b[2:] = 1
    slots = torch.stack([b, torch.zeros(4, 4), a]).flatten(1)
    targets = torch.stack([a, b]).flatten(1)
    score = soft_iou_matrix(slots, targets)
    assert sorted(hungarian_match(score)) == [(0, 1), (2, 0)]
    assert hungarian_match(torch.zeros(3, 0)) == []


def test_dice_and_focal_prefer_the_right_mask():
    t = torch.tensor([1.0, 1.0, 0.0, 0.0])
    good, bad = torch.tensor([9.0, 9.0, -9.0, -9.0]), -torch.tensor([9.0, 9.0, -9.0, -9.0])
    assert dice_loss(good, t) < 0.01 < 0.7 < dice_loss(bad, t)
    assert focal_loss(good, t) < focal_loss(bad, t)


def _logits(mask, scale=8.0):
    return (mask * 2 - 1) * scale


def test_seg_losses_match_slots_and_set_confidence_targets():
    h = torch.zeros(2, 4, 4); h[0, :2] = 1; h[1, 2:] = 1  # two targets
    m = h.repeat_interleave(2, 1).repeat_interleave(2, 2)  # the same at 8 x 8
    heat = torch.stack([_logits(h[1]), _logits(torch.zeros(4, 4)), _logits(h[0])])[None]  # slots: t1, -, t0
    mask = torch.stack([_logits(m[1]), _logits(torch.zeros(8, 8)), _logits(m[0])])[None]
    conf = torch.tensor([[5.0, -5.0, 5.0]])
    out = seg_losses(heat, mask, conf, [h], [m], c_dice=1.0, c_focal=1.0)
    assert sorted(out.matches[0]) == [(0, 1), (2, 0)]
    assert float(out.seg) < 0.05 and float(out.confidence) < 0.05
    wrong_conf = seg_losses(heat, mask, -conf, [h], [m])
    assert float(wrong_conf.confidence) > 1.0


def test_iou_confidence_target_keeps_both_duplicate_slots():
    """Two slots showing the one target: "match" trains one towards 1 and the other towards 0 (and
    which one flips with the heatmaps), "iou" trains both towards 1 and an empty slot towards 0."""
    h = torch.zeros(1, 4, 4); h[0, :2] = 1
    m = h.repeat_interleave(2, 1).repeat_interleave(2, 2)
    heat = torch.stack([_logits(h[0]), _logits(h[0]), _logits(torch.zeros(4, 4))])[None]
    mask = torch.stack([_logits(m[0]), _logits(m[0]), _logits(torch.zeros(8, 8))])[None]
    both = torch.tensor([[6.0, 6.0, -6.0]])
    match = seg_losses(heat, mask, both, [h], [m])
    iou = seg_losses(heat, mask, both, [h], [m], conf_target="iou")
    assert float(match.confidence) > 1.0 and float(iou.confidence) < 0.01
    half = torch.stack([_logits(m[0]), _logits(m[0] * 0 + (torch.arange(8) < 2).float()[:, None]), mask[0, 2]])[None]
    from training.losses import best_mask_iou
    assert best_mask_iou(half[0], m).tolist() == [1.0, 0.5, 0.0]
    conf = torch.zeros(1, 3, requires_grad=True)  # sigmoid 0.5: the half-right slot is already where it should be
    seg_losses(heat, half, conf, [h], [m], conf_target="iou").confidence.backward()
    assert conf.grad[0, 0] < 0 and abs(float(conf.grad[0, 1])) < 1e-7 and conf.grad[0, 2] > 0
    with pytest.raises(ValueError, match="conf_target"):
        seg_losses(heat, mask, both, [h], [m], conf_target="best")


def test_seg_losses_with_no_target_push_confidence_and_final_mask_down():
    heat = torch.randn(1, 3, 4, 4, requires_grad=True)
    mask = torch.randn(1, 3, 8, 8, requires_grad=True)
    conf = torch.zeros(1, 3, requires_grad=True)
    out = seg_losses(heat, mask, conf, [torch.zeros(0, 4, 4)], [torch.zeros(0, 8, 8)])
    assert out.matches == [[]] and float(out.heatmap_bce) == 0.0 and float(out.mask_dice) == 0.0
    assert float(out.union) > 0.0  # the final mask should be empty and is not
    assert heat.grad is None or float(heat.grad.abs().sum()) == 0.0
    (out.seg + out.confidence).backward()
    assert bool((conf.grad > 0).all())  # pushes every slot's confidence down
    assert bool((mask.grad >= 0).all()) and float(mask.grad.sum()) > 0  # and every mask towards empty
    assert float(seg_losses(heat, mask, conf, [torch.zeros(0, 4, 4)], [torch.zeros(0, 8, 8)], c_union=0.0).seg) == 0.0


def test_final_mask_loss_scores_the_union_of_confident_slots():
    from training.losses import final_mask_loss, soft_final_mask

    t = torch.zeros(1, 8, 8); t[0, :4] = 1
    good = _logits(t[0])
    empty = _logits(torch.zeros(8, 8))
    wrong = _logits(1 - t[0])
    masks = torch.stack([good, wrong])[None]  # slot 0 right, slot 1 wrong
    right_conf, wrong_conf = torch.tensor([[6.0, -6.0]]), torch.tensor([[-6.0, 6.0]])
    assert float(final_mask_loss(masks, right_conf, [t])) < 0.1
    assert float(final_mask_loss(masks, wrong_conf, [t])) > 1.0
    # An unconfident slot adds (almost) nothing to the soft final mask.
    assert torch.allclose(soft_final_mask(torch.stack([good, empty])[None], right_conf), torch.sigmoid(good)[None] * torch.sigmoid(torch.tensor(6.0)), atol=1e-2)


@pytest.mark.parametrize("conf_target", ["match", "iou"])
def test_seg_losses_of_a_batch_compose_from_its_examples_alone(conf_target):
    """The batched losses (targets zero-padded to the largest N, every matched pair in one batch of rows)
    equal what each example gives alone: the matched-slot terms averaged over the examples with
    targets, the union term and the confidence over all examples; gradients too."""
    torch.manual_seed(0)
    counts = [2, 0, 1, 3, 0]
    heat = torch.randn(len(counts), 4, 6, 6, requires_grad=True)
    mask = torch.randn(len(counts), 4, 12, 12, requires_grad=True)
    conf = torch.randn(len(counts), 4, requires_grad=True)
    th = [torch.rand(n, 6, 6) for n in counts]
    tm = [(torch.rand(n, 12, 12) > 0.6).float() for n in counts]
    weights = [None, (torch.rand(12, 12) > 0.2).float(), None, (torch.rand(12, 12) > 0.2).float(), None]
    kw = dict(c_dice=0.8, c_focal=0.5, c_mask_bce=0.3, conf_target=conf_target)
    batch = seg_losses(heat, mask, conf, th, tm, weights_mask=weights, **kw)
    alone = [seg_losses(heat[b:b + 1], mask[b:b + 1], conf[b:b + 1], [th[b]], [tm[b]], weights_mask=[weights[b]], **kw)
             for b in range(len(counts))]
    with_targets = [a for a, n in zip(alone, counts) if n]
    matched = torch.stack([a.seg - a.union for a in with_targets]).mean()
    union = torch.stack([a.union for a in alone]).mean()
    assert torch.allclose(batch.union, union, atol=1e-6)
    assert torch.allclose(batch.seg, matched + union, atol=1e-6)
    assert torch.allclose(batch.confidence, torch.stack([a.confidence for a in alone]).mean(), atol=1e-6)
    assert batch.matches == [a.matches[0] for a in alone]
    assert [len(m) for m in batch.matches] == [min(n, 4) for n in counts]
    grads = torch.autograd.grad(batch.seg + batch.confidence, [heat, mask, conf])
    expected = torch.autograd.grad(matched + union + torch.stack([a.confidence for a in alone]).mean(),
                                   [heat, mask, conf])
    assert all(torch.allclose(g, e, atol=1e-6) for g, e in zip(grads, expected))
