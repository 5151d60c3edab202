"""Sparse autoencoder on the language model's layer-L residual stream.

    z     = act(W_enc (x - b_dec) + b_enc)          # [.., F] sparse concept codes
    x_hat = W_dec z + b_dec                         # [.., D] reconstruction
    error = x - x_hat                               # kept so a spliced SAE is exact

act is ReLU (the paper; trained with MSE + l1_coeff * sum_i z_i ||W_dec,i||) or TopK (keep the k
largest pre-activations, ReLU'd; trained with MSE alone, L0 fixed at k).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SparseAutoencoder(nn.Module):
    def __init__(self, d_in: int, d_sae: int, kind: str = "topk", k: int = 16, l1_coeff: float = 5.0):
        super().__init__()
        if kind not in ("relu", "topk"):
            raise ValueError(f"unknown SAE kind '{kind}'")
        self.d_in, self.d_sae, self.kind, self.k, self.l1_coeff = d_in, d_sae, kind, k, l1_coeff
        self.W_enc = nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        nn.init.kaiming_uniform_(self.W_dec, a=5**0.5)
        with torch.no_grad():
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))
            self.W_enc.copy_(self.W_dec.t())

    def encode(self, x_ND: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., F] non-negative codes."""
        pre = (x_ND - self.b_dec) @ self.W_enc + self.b_enc
        if self.kind == "relu":
            return F.relu(pre)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))

    def decode(self, z_NF: torch.Tensor) -> torch.Tensor:
        """[..., F] -> [..., D]."""
        return z_NF @ self.W_dec + self.b_dec

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x_ND)
        return z, self.decode(z)

    @torch.no_grad()
    def init_b_dec(self, x_ND: torch.Tensor) -> None:
        """Start the decoder bias at the data's geometric median proxy (the mean)."""
        self.b_dec.copy_(x_ND.mean(0))


def sae_loss(sae: SparseAutoencoder, x_ND: torch.Tensor) -> dict[str, torch.Tensor]:
    """Training loss of one batch of activations [N, D]; returns loss and diagnostics."""
    z, x_hat = sae(x_ND)
    mse = (x_hat - x_ND).pow(2).sum(-1).mean()
    total = mse
    sparsity = (z * sae.W_dec.norm(dim=1)).sum(-1).mean()
    if sae.kind == "relu":
        total = mse + sae.l1_coeff * sparsity
    return {"loss": total, "mse": mse, "sparsity": sparsity, "codes": z.detach(), "x_hat": x_hat.detach()}


def explained_variance(x_ND: torch.Tensor, x_hat_ND: torch.Tensor) -> float:
    """1 - ||x - x_hat||^2 / ||x - mean(x)||^2 over a batch."""
    resid = (x_ND - x_hat_ND).pow(2).sum()
    total = (x_ND - x_ND.mean(0)).pow(2).sum().clamp_min(1e-12)
    return float(1.0 - resid / total)
