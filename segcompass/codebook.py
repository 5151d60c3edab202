"""Query codebook: turns per-token sparse concept codes into K slot vectors.

    e_t   = W_cb z_t + role_t                 # [B, T, Dq]   one embedding per token
    slots = Encoder([q_1..q_K ; e_1..e_T])[:K]  # [B, K, Dq]  K learned slot queries read the tokens

Padding tokens are masked out of the attention (the reference code let them in).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import CodebookConfig
from .records import TokenRole


class QueryCodebook(nn.Module):
    def __init__(self, d_sae: int, cfg: CodebookConfig):
        super().__init__()
        self.num_slots = cfg.num_slots
        self.W_cb = nn.Linear(d_sae, cfg.dim, bias=False)
        self.role = nn.Embedding(len(TokenRole), cfg.dim)
        self.norm = nn.LayerNorm(cfg.dim)
        self.slot_queries = nn.Parameter(torch.randn(cfg.num_slots, cfg.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.dim, cfg.num_heads, cfg.ffn_dim, dropout=0.0, batch_first=True, norm_first=True, activation="gelu"
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.out_norm = nn.LayerNorm(cfg.dim)

    def forward(self, codes_BTF: torch.Tensor, roles_BT: torch.Tensor, pad_BT: torch.Tensor) -> torch.Tensor:
        """codes [B, T, F], roles [B, T] long, pad [B, T] bool (True = padding) -> slots [B, K, Dq]."""
        B = codes_BTF.shape[0]
        e = self.norm(self.W_cb(codes_BTF) + self.role(roles_BT))  # [B, T, Dq]
        x = torch.cat([self.slot_queries.expand(B, -1, -1), e], dim=1)  # [B, K+T, Dq]
        pad = torch.cat([pad_BT.new_zeros(B, self.num_slots), pad_BT], dim=1)
        x = self.encoder(x, src_key_padding_mask=pad)
        return self.out_norm(x[:, : self.num_slots])
