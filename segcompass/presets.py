"""Named model presets. The only place that knows each preset's hyperparameters."""

from __future__ import annotations

from .config import CodebookConfig, LMConfig, MaskConfig, SAEConfig, SegCompassConfig, VisionConfig

# The paper's SAE, codebook and mask-path numbers, shared by every full-scale preset.
PAPER_SAE = SAEConfig(kind="relu", d_sae=65536, l1_coeff=5.0, code_threshold=2.0)
PAPER_CODEBOOK = CodebookConfig(num_slots=4, dim=512, num_layers=2, num_heads=8, ffn_dim=2048)
PAPER_MASK = MaskConfig(dim=256, heatmap_heads=4, decoder_layers=2, decoder_heads=8, decoder_mlp_dim=2048)

PRESETS: dict[str, SegCompassConfig] = {
    # Tests, CI and the first shipped checkpoint: trains in minutes on 2 CPU cores.
    "tiny": SegCompassConfig(preset="tiny"),
    # The intended default (shipped once it beats tiny): SmolLM2-135M-Instruct + LoRA, EfficientNet-Lite0 frozen + token neck + projector;
    # the mask path reads the pixels' colour statistics too (smol run 5 on).
    "smol": SegCompassConfig(
        preset="smol",
        vision=VisionConfig(kind="efficientnet_lite0", image_size=256, token_grid=8, feature_grid=32, frozen=True,
                            tokens="multiscale", mask_pixels=True),
        lm=LMConfig(
            kind="smollm2", hidden_size=576, num_layers=30, num_heads=9, intermediate_size=1536,
            max_positions=2048, hook_layer=15, max_new_tokens=64, lora_rank=16,
        ),
        sae=SAEConfig(kind="topk", d_sae=4096, k=32),
        codebook=CodebookConfig(num_slots=4, dim=256, num_layers=2, num_heads=8, ffn_dim=1024),
        mask=MaskConfig(dim=128, heatmap_heads=4, decoder_layers=2, decoder_heads=8, decoder_mlp_dim=1024),
    ),
    # Full scale, the paper's numbers (GPUs, local weights; see README "Full scale").
    "qwen2.5-vl-7b": SegCompassConfig(
        preset="qwen2.5-vl-7b",
        # SAM's 1024 px frame; Qwen sees it resized to 30 * 28 = 840 px -> 30 x 30 = 900 visual tokens.
        vision=VisionConfig(kind="hf", image_size=1024, token_grid=30, feature_grid=64, frozen=True),
        lm=LMConfig(kind="hf", hidden_size=3584, num_layers=28, num_heads=28, intermediate_size=18944,
                    max_positions=128000, hook_layer=13, max_new_tokens=256),
        sae=PAPER_SAE, codebook=PAPER_CODEBOOK, mask=PAPER_MASK,
    ),
    # LLaVA-1.5: CLIP ViT-L/14 at 336 px -> 24 x 24 = 576 visual tokens.
    "llava-1.5-7b": SegCompassConfig(
        preset="llava-1.5-7b",
        vision=VisionConfig(kind="hf", image_size=1024, token_grid=24, feature_grid=64, frozen=True),
        lm=LMConfig(kind="hf", hidden_size=4096, num_layers=32, num_heads=32, intermediate_size=11008,
                    max_positions=4096, hook_layer=16, max_new_tokens=256),
        sae=PAPER_SAE, codebook=PAPER_CODEBOOK, mask=PAPER_MASK,
    ),
    "llava-1.5-13b": SegCompassConfig(
        preset="llava-1.5-13b",
        vision=VisionConfig(kind="hf", image_size=1024, token_grid=24, feature_grid=64, frozen=True),
        lm=LMConfig(kind="hf", hidden_size=5120, num_layers=40, num_heads=40, intermediate_size=13824,
                    max_positions=4096, hook_layer=16, max_new_tokens=256),
        sae=PAPER_SAE, codebook=PAPER_CODEBOOK, mask=PAPER_MASK,
    ),
}


def get_preset(name: str) -> SegCompassConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset '{name}'; known: {sorted(PRESETS)}") from None
