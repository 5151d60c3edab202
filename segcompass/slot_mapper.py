"""Slot mapper: grounds each slot as a heatmap over the mask path's image features.

    query_k   = MLP([slot_k ; h(<REF_POS>)])                        # [B, K, Dm]
    logits_kh = <query_k,h , key(f)_h> / sqrt(d_h)  per head h      # [B, K, H, h*w]
    heatmap_k = Linear_H->1(logits_k)                                # [B, K, h, w]
    conf_k    = MLP([query_k ; max over pixels of logits_k])        # [B, K]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SlotMapper(nn.Module):
    def __init__(self, slot_dim: int, ref_dim: int, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError("mask dim must be divisible by heatmap heads")
        self.heads, self.head_dim = heads, dim // heads
        self.query = nn.Sequential(nn.Linear(slot_dim + ref_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.ref_norm = nn.LayerNorm(ref_dim)
        self.key = nn.Conv2d(dim, dim, 1)
        self.combine = nn.Linear(heads, 1)
        self.confidence = nn.Sequential(nn.Linear(dim + heads, dim), nn.GELU(), nn.Linear(dim, 1))

    def forward(
        self, slots_BKQ: torch.Tensor, ref_BD: torch.Tensor, feats_BCHW: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns heatmap logits [B, K, h, w] and confidence logits [B, K]."""
        B, K, _ = slots_BKQ.shape
        _, C, h, w = feats_BCHW.shape
        ref = self.ref_norm(ref_BD)[:, None].expand(-1, K, -1)
        q = self.query(torch.cat([slots_BKQ, ref], dim=-1))  # [B, K, Dm]
        q_heads = q.view(B, K, self.heads, self.head_dim)
        k_heads = self.key(feats_BCHW).view(B, self.heads, self.head_dim, h * w)
        logits = torch.einsum("bkhd,bhdn->bkhn", q_heads, k_heads) / self.head_dim**0.5  # [B, K, H, hw]
        heat = self.combine(logits.transpose(2, 3)).squeeze(-1).view(B, K, h, w)
        peak = F.adaptive_max_pool1d(logits.reshape(B * K, self.heads, h * w), 1).view(B, K, self.heads)
        conf = self.confidence(torch.cat([q, peak], dim=-1)).squeeze(-1)
        return heat, conf


def kept_slots(conf_K: torch.Tensor, confidence_threshold: float, top_slot_threshold: float = 1.0) -> torch.Tensor:
    """Bool [..., K]: which slots join the final mask, given their confidences (probabilities) [..., K].

    The slots that pass `confidence_threshold`, plus the most confident slot when it passes
    `top_slot_threshold` (1: off). The second rule is for a model whose confidence is split between
    two slots that show the same object (Hungarian matching hands the target to either), so neither
    passes the first; both thresholds are the decode's global rule, picked on val (`training calibrate
    --top-slot`; on smol run 6 the pair did not beat the threshold alone on test).

    >>> kept_slots(torch.tensor([0.45, 0.40, 0.02]), 0.5, 0.3).tolist()
    [True, False, False]
    """
    keep = conf_K > confidence_threshold
    top = conf_K.argmax(-1, keepdim=True)
    return keep | torch.zeros_like(keep).scatter(-1, top, conf_K.gather(-1, top) > top_slot_threshold)
