"""Image preprocessing and vision encoders.

A vision encoder has one trunk and two outputs: token features (a token_grid x token_grid grid,
projected into the LM as visual tokens) and mask-path image features (Dm channels on a
feature_grid x feature_grid grid, what the slot mapper and the mask decoder look at).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .config import MaskConfig, VisionConfig


@dataclass
class PreparedImage:
    pixels: torch.Tensor  # [3, S, S] float in [0, 1], image at top-left, zero padding
    valid_hw: tuple[int, int]  # size of the resized image inside S x S
    original_size: tuple[int, int]  # (H, W)


def to_rgb_array(image) -> np.ndarray:
    """Accept a path, PIL image or array; return uint8 [H, W, 3]. Raises ValueError on bad input."""
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__"):
        try:
            with Image.open(image) as im:
                image = im.convert("RGB")
        except Exception as err:  # PIL raises many types for corrupt files
            raise ValueError(f"cannot read image {image!s}: {err}") from err
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.max() <= 1.0:
            arr = arr * 255.0
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if min(arr.shape[:2]) < 8:
        raise ValueError(f"image too small: {arr.shape[1]}x{arr.shape[0]} pixels")
    return arr


def prepare_image(image, size: int) -> PreparedImage:
    """Resize the longest side to `size` (bilinear) and pad to size x size, SAM-style."""
    arr = to_rgb_array(image)
    h, w = arr.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = arr if (nh, nw) == (h, w) else np.asarray(Image.fromarray(arr).resize((nw, nh), Image.BILINEAR))
    pixels = torch.zeros(3, size, size)
    pixels[:, :nh, :nw] = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float() / 255.0
    return PreparedImage(pixels=pixels, valid_hw=(nh, nw), original_size=(h, w))


def patch_boxes(grid: int, size: int, valid_hw: tuple[int, int], original_size: tuple[int, int]) -> torch.Tensor:
    """[grid*grid, 4] (x0, y0, x1, y1) of each token's patch, in original-image pixels, row-major."""
    step = size / grid
    sy, sx = original_size[0] / valid_hw[0], original_size[1] / valid_hw[1]
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    x0, y0 = cols.flatten() * step * sx, rows.flatten() * step * sy
    return torch.stack([x0, y0, x0 + step * sx, y0 + step * sy], dim=-1)


def sincos_2d(channels: int, grid: int) -> torch.Tensor:
    """[channels, grid, grid]: half the channels encode the row, half the column, at geometric frequencies."""
    quarter = channels // 4
    freqs = 1.0 / (grid ** (torch.arange(quarter) / max(1, quarter)))  # periods from 4 tokens to ~4 * grid
    coords = torch.arange(grid, dtype=torch.float32)
    angle = coords[:, None] * freqs[None] * (math.pi / 2)  # [grid, quarter]
    code = torch.cat([angle.sin(), angle.cos()], dim=-1)  # [grid, 2 * quarter]
    rows = code[:, None, :].expand(grid, grid, -1)
    cols = code[None, :, :].expand(grid, grid, -1)
    out = torch.zeros(grid, grid, channels)
    out[..., : 4 * quarter] = torch.cat([rows, cols], dim=-1)
    return out.permute(2, 0, 1).contiguous()


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.GroupNorm(8, cout), nn.GELU())


class TinyVisionEncoder(nn.Module):
    """A small CNN trained from scratch: a stem down to the feature grid (mask path), then a
    deeper branch down to the token grid (visual tokens)."""

    def __init__(self, cfg: VisionConfig, mask_cfg: MaskConfig):
        super().__init__()
        w = cfg.width
        n_stem = int(math.log2(cfg.image_size // cfg.feature_grid))
        n_deep = int(math.log2(cfg.feature_grid // cfg.token_grid))
        if 2**n_stem * cfg.feature_grid != cfg.image_size or 2**n_deep * cfg.token_grid != cfg.feature_grid:
            raise ValueError("tiny_cnn needs image_size / feature_grid / token_grid to be powers of two apart")
        chans = [3] + [min(64, 16 * 2**i) for i in range(1, n_stem + 1)]
        self.stem = nn.Sequential(*[_conv(a, b, 2) for a, b in zip(chans, chans[1:])], _conv(chans[-1], 64, 1))
        deep = [_conv(64 if i == 0 else w, w, 2) for i in range(n_deep)] or [_conv(64, w, 1)]
        self.deep = nn.Sequential(*deep, _conv(w, w, 1))
        self.token_grid, self.feature_grid = cfg.token_grid, cfg.feature_grid
        self.token_dim = w
        # Learned, but started from a 2D sine-cosine code of (row, column) at the scale of the features:
        # a small random start left the LM unable to tell where a token is (position words ~chance).
        self.pos = nn.Parameter(sincos_2d(w, cfg.token_grid)[None])
        # Mask-path neck: fine features plus the upsampled deep ones, to Dm channels.
        self.neck = nn.Sequential(nn.Conv2d(64 + w, mask_cfg.dim, 1), nn.GroupNorm(8, mask_cfg.dim), nn.GELU(),
                                  nn.Conv2d(mask_cfg.dim, mask_cfg.dim, 3, 1, 1))

    def forward(self, pixels_B3SS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns token features [B, Nv, Cv] and image features [B, Dm, h, w]."""
        x = (pixels_B3SS - 0.5) / 0.25
        fine = self.stem(x)  # [B, 64, h, w]
        deep = self.deep(fine)  # [B, Cv, g, g]
        tokens = (deep + self.pos).flatten(2).transpose(1, 2)  # [B, Nv, Cv]
        up = F.interpolate(deep, size=fine.shape[-2:], mode="bilinear", align_corners=False)
        feats = self.neck(torch.cat([fine, up], dim=1))  # [B, Dm, h, w]
        return tokens, feats


def build_vision_encoder(cfg: VisionConfig, mask_cfg: MaskConfig) -> nn.Module:
    if cfg.kind == "tiny_cnn":
        return TinyVisionEncoder(cfg, mask_cfg)
    if cfg.kind == "efficientnet_lite0":
        from .vision_efficientnet import EfficientNetVisionEncoder

        return EfficientNetVisionEncoder(cfg, mask_cfg)
    raise ValueError(f"unknown vision encoder kind '{cfg.kind}'")
