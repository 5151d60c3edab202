"""Applying concept edits: one pure function over dense codes. No edits -> the same tensor."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .records import ConceptEdit, TokenRole

_SCOPE_ROLE = {"visual": TokenRole.VISUAL, "instruction": TokenRole.INSTRUCTION, "cot": TokenRole.COT}


def edit_token_mask(edit: ConceptEdit, roles_T: torch.Tensor, patch_boxes_V4: torch.Tensor | None) -> torch.Tensor:
    """[T] bool: the tokens an edit applies to."""
    T = roles_T.shape[0]
    device = roles_T.device
    if edit.scope == "all":
        sel = torch.ones(T, dtype=torch.bool, device=device)
    else:
        sel = roles_T == _SCOPE_ROLE[edit.scope]
    if edit.token_range is not None:
        start, stop = edit.token_range
        in_range = torch.zeros(T, dtype=torch.bool, device=device)
        in_range[max(0, start): max(0, stop)] = True
        sel &= in_range
    if edit.region is not None:
        visual = (roles_T == TokenRole.VISUAL).nonzero().flatten()
        in_region = torch.zeros(T, dtype=torch.bool, device=device)
        if patch_boxes_V4 is not None and len(visual):
            x0, y0, x1, y1 = edit.region
            b = patch_boxes_V4.to(device)
            overlap = (b[:, 0] < x1) & (b[:, 2] > x0) & (b[:, 1] < y1) & (b[:, 3] > y0)
            in_region[visual[overlap[: len(visual)]]] = True
        sel &= in_region
    return sel


def apply_edits(
    codes_TF: torch.Tensor,
    roles_T: torch.Tensor,
    edits: Sequence[ConceptEdit],
    patch_boxes_V4: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return codes [T, F] with every edit applied in order. With no edits, returns `codes_TF` itself."""
    if not edits:
        return codes_TF
    out = codes_TF.clone()
    for edit in edits:
        if edit.concept >= out.shape[1]:
            raise ValueError(f"concept {edit.concept} out of range (the SAE has {out.shape[1]} concepts)")
        sel = edit_token_mask(edit, roles_T, patch_boxes_V4)
        col = out[:, edit.concept]
        if edit.op == "zero":
            col = torch.where(sel, torch.zeros_like(col), col)
        elif edit.op == "scale":
            col = torch.where(sel, col * edit.value, col)
        else:
            col = torch.where(sel, torch.full_like(col, edit.value), col)
        out[:, edit.concept] = col
    return out
