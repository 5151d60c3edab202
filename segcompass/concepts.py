"""Reading a trace in terms of concepts: which concepts drive the slots, which fire where.

Contribution of a concept = activation x gradient (summed over tokens) of the slots' objective:
the confidence-weighted mean heatmap logit inside each slot's own heatmap. One backward pass
through codebook + slot mapper, no language model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .records import ConceptEdit, TokenRole, Trace


@dataclass(frozen=True)
class ConceptInfo:
    concept: int
    contribution: float  # signed attribution to the slots (larger = drives the prediction more)
    max_activation: float
    visual_tokens: int  # how many visual tokens it fires on
    cot_tokens: int
    instruction_tokens: int
    top_positions: tuple[int, ...]  # sequence positions of its strongest activations

    def to_dict(self) -> dict:
        d = asdict(self)
        d["top_positions"] = list(self.top_positions)
        return d


def concept_contributions(model, trace: Trace, codes_TF: torch.Tensor | None = None) -> torch.Tensor:
    """[F] attribution of each concept to the slot heatmaps (activation x gradient)."""
    codes = (trace.dense_codes() if codes_TF is None else codes_TF).clone().requires_grad_(True)
    device = model._device()
    with torch.enable_grad():
        slots = model.codebook(codes[None].to(device), trace.roles[None].to(device),
                               torch.zeros(1, codes.shape[0], dtype=torch.bool, device=device))
        heat, conf = model.slot_mapper(slots, trace.ref_state[None].to(device), trace.image_features[None].to(device))
        weight = torch.sigmoid(heat).detach()
        objective = (torch.sigmoid(conf)[..., None, None] * heat * weight).sum() / weight.sum().clamp_min(1e-6)
        (grad,) = torch.autograd.grad(objective, codes)
    return (grad * codes.detach()).sum(0).cpu()


def top_concepts(model, trace: Trace, limit: int = 20) -> list[ConceptInfo]:
    """The active concepts ranked by |contribution|."""
    codes = trace.dense_codes()
    contrib = concept_contributions(model, trace, codes)
    active = (codes > 0).any(0).nonzero().flatten()
    order = active[contrib[active].abs().argsort(descending=True)][:limit]
    roles = trace.roles
    out = []
    for f in order.tolist():
        col = codes[:, f]
        on = col > 0
        top = col.argsort(descending=True)[: min(5, int(on.sum()))]
        out.append(ConceptInfo(
            concept=f, contribution=float(contrib[f]), max_activation=float(col.max()),
            visual_tokens=int((on & (roles == TokenRole.VISUAL)).sum()),
            cot_tokens=int((on & (roles == TokenRole.COT)).sum()),
            instruction_tokens=int((on & (roles == TokenRole.INSTRUCTION)).sum()),
            top_positions=tuple(int(i) for i in top),
        ))
    return out


def toggle_effects(model, trace: Trace, concepts: list[int]) -> list[int]:
    """Mask pixels that change when each concept alone is switched off (decode with one ConceptEdit):
    how causal each of the explorer's concept toggles is."""
    base = model.decode(trace).mask
    return [int(np.logical_xor(base, model.decode(trace, [ConceptEdit(c)]).mask).sum()) for c in concepts]


def reason_effects(model, image, trace: Trace, concepts: list[int]) -> list[tuple[int, bool]]:
    """The slow path's version of `toggle_effects`: for each concept switched off, regenerate the CoT
    with the edit spliced into layer L (`model.reason`) and decode; (mask pixels changed, did the CoT
    change)."""
    base = model.decode(trace).mask
    out = []
    for c in concepts:
        edit = [ConceptEdit(c)]
        again = model.reason(image, trace, edit)
        out.append((int(np.logical_xor(base, model.decode(again, edit).mask).sum()), again.cot != trace.cot))
    return out


def concepts_at(trace: Trace, position: int, limit: int = 10) -> list[tuple[int, float]]:
    """[(concept, activation)] of one token, strongest first."""
    if not 0 <= position < len(trace.tokens):
        raise IndexError(f"token position {position} outside 0..{len(trace.tokens) - 1}")
    sel = trace.code_index[:, 0] == position
    concepts, values = trace.code_index[sel, 1], trace.code_value[sel]
    order = values.argsort(descending=True)[:limit]
    return [(int(concepts[i]), float(values[i])) for i in order]


def visual_token_at(trace: Trace, x: float, y: float) -> int | None:
    """Sequence position of the visual token whose patch holds pixel (x, y), or None."""
    b = trace.patch_boxes
    inside = ((b[:, 0] <= x) & (x < b[:, 2]) & (b[:, 1] <= y) & (y < b[:, 3])).nonzero().flatten()
    if not len(inside):
        return None
    visual = (trace.roles == TokenRole.VISUAL).nonzero().flatten()
    return int(visual[int(inside[0])]) if int(inside[0]) < len(visual) else None


def strongest_concept_per_token(trace: Trace) -> list[tuple[int, float] | None]:
    """For each token, its strongest (concept, activation), or None when no concept fires."""
    best: list[tuple[int, float] | None] = [None] * len(trace.tokens)
    for (pos, f), v in zip(trace.code_index.tolist(), trace.code_value.tolist()):
        if best[pos] is None or v > best[pos][1]:
            best[pos] = (f, v)
    return best
