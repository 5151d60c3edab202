"""Typed records that cross the model's interface: Trace, Prediction, ConceptEdit, ForwardOutput.

Shapes: T tokens, F concepts (SAE width), D LM width, K slots, Dm mask-path width,
h x w heatmap grid, H x W original image size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Literal

import numpy as np
import torch


class TokenRole(IntEnum):
    """What a token of the sequence is; stored per token in a Trace."""

    SPECIAL = 0
    VISUAL = 1
    INSTRUCTION = 2
    COT = 3


EditOp = Literal["zero", "scale", "set"]
EditScope = Literal["all", "visual", "instruction", "cot"]


@dataclass(frozen=True)
class ConceptEdit:
    """An intervention on one SAE concept: which concept, which tokens, which operation.

    Tokens are chosen by `scope` (all / visual / instruction / cot) and, optionally narrowed by
    `token_range` (half-open [start, stop) over sequence positions) or `region` (x0, y0, x1, y1 in
    original-image pixels: the visual tokens whose patch overlaps it). `op` is "zero" (activation
    := 0), "scale" (activation *= value) or "set" (activation := value, also where it was 0).
    """

    concept: int
    op: EditOp = "zero"
    value: float = 0.0
    scope: EditScope = "all"
    token_range: tuple[int, int] | None = None
    region: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.op not in ("zero", "scale", "set"):
            raise ValueError(f"unknown edit op '{self.op}'")
        if self.scope not in ("all", "visual", "instruction", "cot"):
            raise ValueError(f"unknown edit scope '{self.scope}'")
        if self.concept < 0:
            raise ValueError("concept index must be >= 0")

    def to_dict(self) -> dict:
        return {
            "concept": self.concept, "op": self.op, "value": self.value, "scope": self.scope,
            "token_range": list(self.token_range) if self.token_range else None,
            "region": list(self.region) if self.region else None,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ConceptEdit":
        return cls(
            concept=int(d["concept"]), op=d.get("op", "zero"), value=float(d.get("value", 0.0)),
            scope=d.get("scope", "all"),
            token_range=tuple(d["token_range"]) if d.get("token_range") else None,
            region=tuple(d["region"]) if d.get("region") else None,
        )


@dataclass
class Trace:
    """Everything `decode` needs, kept from one `encode` (the expensive pass). Batch size 1.

    The codes are the thresholded SAE codes exactly as the codebook reads them, stored sparsely
    (COO); `sae_error` is x - x_hat per token so a spliced SAE reproduces layer L exactly.
    """

    instruction: str
    cot: str  # the generated completion's text between <think> and </think> (or all of it)
    completion: str  # the whole generated text, special tokens included
    token_ids: torch.Tensor  # [T] long
    tokens: list[str]  # [T] display strings
    roles: torch.Tensor  # [T] long (TokenRole)
    prompt_length: int  # tokens before the first generated one
    code_index: torch.Tensor  # [N, 2] long: (token position, concept) of every non-zero code
    code_value: torch.Tensor  # [N] float
    d_sae: int  # F
    sae_error: torch.Tensor  # [T, D]
    ref_state: torch.Tensor  # [D] last-layer state of the reference token (or of the last token)
    ref_found: bool  # did the model emit the reference token?
    image_features: torch.Tensor  # [Dm, h, w] mask-path image features
    valid_hw: tuple[int, int]  # size of the resized image inside the padded model input
    original_size: tuple[int, int]  # (H, W)
    patch_boxes: torch.Tensor  # [Nv, 4] (x0, y0, x1, y1) of each visual token in original pixels
    repair: str = ""  # why the CoT was written again (segcompass.repair; "" when it is the LM's own)

    def dense_codes(self) -> torch.Tensor:
        """[T, F] dense codes."""
        value = self.code_value
        codes = torch.zeros(len(self.tokens), self.d_sae, dtype=value.dtype, device=value.device)
        if self.code_index.numel():
            codes[self.code_index[:, 0], self.code_index[:, 1]] = value
        return codes


@dataclass
class Prediction:
    """What `decode` returns. Masks are at the original image size."""

    heatmaps: torch.Tensor  # [K, h, w] heatmap logits (padded model-input frame)
    confidences: torch.Tensor  # [K] probabilities
    slot_masks: np.ndarray  # [K, H, W] bool
    mask: np.ndarray  # [H, W] bool: union of the slots whose confidence passes the threshold
    slot_heatmaps: np.ndarray  # [K, H, W] float32 sigmoid(heatmap) resized to the original image
    kept_slots: list[int] = field(default_factory=list)


@dataclass
class ForwardOutput:
    """The batch forward pass (training). B batch, T tokens, V vocab, K slots, h x w heatmap grid."""

    lm_logits: torch.Tensor  # [B, T, V]; with forward(logits_to_keep=k > 0) the last k positions [B, k, V]
    codes: torch.Tensor  # [B, T, F] thresholded SAE codes (padding zeroed)
    heatmap_logits: torch.Tensor  # [B, K, h, w]
    mask_logits: torch.Tensor  # [B, K, 4h, 4w] in the padded model-input frame
    confidence_logits: torch.Tensor  # [B, K]
    ref_positions: torch.Tensor  # [B] index of the reference token used (-1 where none was found)
    hook_states: torch.Tensor  # [B, T, D] residual stream at layer L
