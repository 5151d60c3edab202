"""Configuration of a SegCompass model: frozen dataclasses that round-trip through JSON.

One `SegCompassConfig` describes a whole model; named presets live in `segcompass.presets`.
Sizes use the paper's terms: D is the language model's width, F the SAE width (number of
concepts), K the number of slots, Dq the codebook width, Dm the mask path's width.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class VisionConfig:
    """Vision encoder: one trunk, two outputs (visual tokens for the LM, image features for the mask path)."""

    kind: str = "tiny_cnn"  # "tiny_cnn" | "efficientnet_lite0"
    image_size: int = 128  # square model input; images are resized on the longest side and padded
    token_grid: int = 8  # visual tokens form a token_grid x token_grid grid
    feature_grid: int = 16  # mask-path image features are feature_grid x feature_grid
    width: int = 128  # channels of the tiny trunk's last stage (tiny_cnn only)
    frozen: bool = False  # frozen pretrained encoders are never updated
    # efficientnet_lite0 only: "head" = the trunk's 1280-d head pooled to the token grid (smol runs 1-3);
    # "multiscale" = a trained token neck over the head, stride-32/16/8 maps and patch colour statistics.
    tokens: str = "head"
    token_width: int = 512  # channels of the "multiscale" token neck (= visual token dim)
    # efficientnet_lite0 only: the mask-path neck also reads each feature cell's pixel colour statistics
    # (avg / max / min); False keeps the smol run 1-4 checkpoints loading.
    mask_pixels: bool = False


@dataclass(frozen=True)
class LMConfig:
    """Causal language model that writes the chain of thought."""

    kind: str = "tiny"  # "tiny" (trained from scratch) | "smollm2" (pretrained + LoRA) | "hf" (local folder)
    hidden_size: int = 128  # D
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    max_positions: int = 384
    hook_layer: int = 2  # L: the SAE reads the residual stream after this many decoder layers
    max_new_tokens: int = 64  # CoT budget at inference
    path: str | None = None  # local folder for kind="hf"
    lora_rank: int = 0  # > 0: adapt the pretrained LM with LoRA instead of full fine-tuning
    dtype: str = "float32"  # weights of a pretrained LM ("float32" | "bfloat16" | "float16"); heads stay float32
    # inference: region words of the CoT ("… star at top left") follow the visual tokens' logit lens
    # (segcompass.grounding); needs a model trained with the naming loss
    ground_regions: bool = False
    # inference: a greedy CoT whose decision (an extreme, a relation, an absence) the visual tokens contradict is
    # written again with the decision they support (segcompass.repair); needs the naming loss too
    repair: bool = False


@dataclass(frozen=True)
class SAEConfig:
    """Sparse autoencoder on the layer-L residual stream (the SAME one for every token kind)."""

    kind: str = "topk"  # "relu" (the paper: MSE + l1_coeff * sum_i f_i ||W_dec,i||) | "topk"
    d_sae: int = 1024  # F
    k: int = 16  # L0 of the TopK SAE
    l1_coeff: float = 5.0
    code_threshold: float = 0.0  # the codebook zeroes |activation| below this (paper: 2.0 for ReLU)


@dataclass(frozen=True)
class CodebookConfig:
    """Query codebook: e_t = W_cb z_t, K slot queries + a small transformer encoder."""

    num_slots: int = 4  # K
    dim: int = 128  # Dq
    num_layers: int = 2
    num_heads: int = 4
    ffn_dim: int = 256


@dataclass(frozen=True)
class MaskConfig:
    """Slot mapper and SAM-architecture mask decoder."""

    dim: int = 64  # Dm: mask-path feature width
    heatmap_heads: int = 4
    decoder_layers: int = 2
    decoder_heads: int = 4
    decoder_mlp_dim: int = 256
    confidence_threshold: float = 0.5  # a slot joins the final mask when sigmoid(conf) passes this
    top_slot_threshold: float = 1.0  # the most confident slot joins when it passes this, even below the above (1: off)
    out_of_image_logit: float = -50.0  # heatmap value for padded pixels outside the image
    sam_path: str | None = None  # full scale: local SAM checkpoint (HF SamModel format) for the mask path


@dataclass(frozen=True)
class SegCompassConfig:
    preset: str = "tiny"
    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    head: str = "segcompass"  # "segcompass" | "latent_query" (LISA-style baseline) | "box_text" (textual readout baseline)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SegCompassConfig":
        parts = {
            "vision": VisionConfig,
            "lm": LMConfig,
            "sae": SAEConfig,
            "codebook": CodebookConfig,
            "mask": MaskConfig,
        }
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        kwargs = {}
        for key, value in data.items():
            if key in parts:
                sub = parts[key]
                sub_known = {f.name for f in dataclasses.fields(sub)}
                bad = set(value) - sub_known
                if bad:
                    raise ValueError(f"unknown keys in config section '{key}': {sorted(bad)}")
                kwargs[key] = sub(**value)
            else:
                kwargs[key] = value
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "SegCompassConfig":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read model config {path}: {err}") from err
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "SegCompassConfig":
        return dataclasses.replace(self, **changes)

    def inference(self, ground_regions: bool | None = None, repair: bool | None = None) -> "SegCompassConfig":
        """This config with the inference-time switches of the language model set (None keeps each as it is)."""
        switches = {k: v for k, v in (("ground_regions", ground_regions), ("repair", repair)) if v is not None}
        return self.replace(lm=dataclasses.replace(self.lm, **switches)) if switches else self
