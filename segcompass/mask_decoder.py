"""SAM-architecture mask path: each slot's heatmap is the only (dense) prompt.

Reuses transformers' SAM prompt encoder (its mask embedding and positional encoding) and its
two-way-transformer mask decoder; a full-scale model can load them from a SAM checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SamConfig, SamMaskDecoderConfig, SamPromptEncoderConfig, SamVisionConfig
from transformers.models.sam.modeling_sam import SamMaskDecoder, SamPromptEncoder

from .config import MaskConfig


def sam_config(cfg: MaskConfig, image_size: int, feature_grid: int) -> SamConfig:
    """A SamConfig whose prompt encoder and mask decoder match our mask path's sizes."""
    config = SamConfig(
        vision_config=SamVisionConfig(
            hidden_size=cfg.dim, num_pos_feats=cfg.dim // 2, image_size=image_size,
            patch_size=image_size // feature_grid, output_channels=cfg.dim,
            num_hidden_layers=1, num_attention_heads=1, mlp_dim=cfg.dim, global_attn_indexes=[0],
        ),
        prompt_encoder_config=SamPromptEncoderConfig(
            hidden_size=cfg.dim, image_size=image_size, patch_size=image_size // feature_grid, mask_input_channels=16,
        ),
        mask_decoder_config=SamMaskDecoderConfig(
            hidden_size=cfg.dim, num_hidden_layers=cfg.decoder_layers, num_attention_heads=cfg.decoder_heads,
            mlp_dim=cfg.decoder_mlp_dim, iou_head_hidden_dim=cfg.dim,
        ),
    )
    config.mask_decoder_config._attn_implementation = "sdpa"
    return config


class HeatmapPromptedDecoder(nn.Module):
    """Heatmap logits [B, K, h, w] + image features [B, Dm, h, w] -> mask logits [B, K, 4h, 4w]."""

    def __init__(self, cfg: MaskConfig, image_size: int, feature_grid: int):
        super().__init__()
        config = sam_config(cfg, image_size, feature_grid)
        self.prompt_encoder = SamPromptEncoder(config)
        self.mask_decoder = SamMaskDecoder(config.mask_decoder_config)
        self.grid = feature_grid
        self.image_size = image_size
        self.out_of_image_logit = cfg.out_of_image_logit

    def image_positional_embeddings(self) -> torch.Tensor:
        """[1, Dm, h, w] dense positional encoding of the feature grid (as SamModel computes it)."""
        pe = self.prompt_encoder.shared_embedding
        size = self.grid
        grid = torch.ones(size, size, device=pe.positional_embedding.device, dtype=pe.positional_embedding.dtype)
        y = (grid.cumsum(0) - 0.5) / size
        x = (grid.cumsum(1) - 0.5) / size
        return pe(torch.stack([x, y], dim=-1)).permute(2, 0, 1).unsqueeze(0)

    def prompt_from_heatmap(self, heat_BKhw: torch.Tensor, valid_hw: list[tuple[int, int]]) -> torch.Tensor:
        """Upsample heatmap logits to the mask-prompt size 4h x 4w; pixels outside the image get -50."""
        B, K, h, w = heat_BKhw.shape
        up = F.interpolate(heat_BKhw, size=(4 * h, 4 * w), mode="bilinear", align_corners=False)
        outside = torch.ones(B, 1, 4 * h, 4 * w, dtype=torch.bool, device=up.device)
        for b, (vh, vw) in enumerate(valid_hw):
            outside[b, :, : round(vh * 4 * h / self.image_size), : round(vw * 4 * w / self.image_size)] = False
        return up.masked_fill(outside, self.out_of_image_logit)

    def forward(
        self, heat_BKhw: torch.Tensor, feats_BChw: torch.Tensor, valid_hw: list[tuple[int, int]]
    ) -> torch.Tensor:
        B, K, h, w = heat_BKhw.shape
        prompt = self.prompt_from_heatmap(heat_BKhw, valid_hw).reshape(B * K, 1, 4 * h, 4 * w)
        dense = self.prompt_encoder.mask_embed(prompt)  # [B*K, Dm, h, w]
        feats = feats_BChw.repeat_interleave(K, dim=0)
        pos = self.image_positional_embeddings().expand(B * K, -1, -1, -1)
        sparse = feats.new_zeros(B * K, 1, 0, feats.shape[1])  # no point or box prompts
        masks, _ = self.mask_decoder(feats, pos, sparse, dense, multimask_output=False)
        return masks.reshape(B, K, 4 * h, 4 * w)
