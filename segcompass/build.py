"""The one builder: a preset name or a config (+ tokenizer) -> a SegCompass model."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM

from .codebook import QueryCodebook
from .config import LMConfig, SegCompassConfig
from .language import LanguageModel
from .mask_decoder import HeatmapPromptedDecoder
from .model import SegCompass
from .presets import get_preset
from .sae import SparseAutoencoder
from .slot_mapper import SlotMapper
from .tokenizer import SHAPEWORLD_WORDS, build_word_tokenizer
from .vision import build_vision_encoder


def build_tiny_lm(cfg: LMConfig, tokenizer) -> LlamaForCausalLM:
    """A small Llama trained from scratch on the word-level vocabulary."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def build_language_backbone(cfg: LMConfig, tokenizer=None):
    """-> (causal LM, tokenizer, uses_chat_template)."""
    if cfg.kind == "tiny":
        tokenizer = tokenizer or build_word_tokenizer([" ".join(SHAPEWORLD_WORDS)])
        return build_tiny_lm(cfg, tokenizer), tokenizer, False
    if cfg.kind == "smollm2":
        from .smol import build_smollm2_backbone

        lm, tokenizer = build_smollm2_backbone(cfg, tokenizer)
        return lm, tokenizer, True
    if cfg.kind == "hf":
        raise ValueError("lm.kind 'hf' (a local VLM) is built by build_model together with its vision tower")
    raise ValueError(f"unknown language model kind '{cfg.kind}'")


def build_model(config: SegCompassConfig | str, tokenizer=None) -> SegCompass:
    if isinstance(config, str):
        config = get_preset(config)
    sam_decoder = None
    if config.lm.kind == "hf":  # full scale: one local VLM gives both the vision tower and the LM
        from .fullscale import build_fullscale_parts

        vision, lm, tokenizer, sam_decoder = build_fullscale_parts(config, tokenizer)
        chat = True
    else:
        vision = build_vision_encoder(config.vision, config.mask)
        lm, tokenizer, chat = build_language_backbone(config.lm, tokenizer)
    width = lm.config.hidden_size
    if not 1 <= config.lm.hook_layer <= lm.config.num_hidden_layers:
        raise ValueError(f"hook_layer {config.lm.hook_layer} outside 1..{lm.config.num_hidden_layers}")
    language = LanguageModel(lm, tokenizer, config.lm.hook_layer, vision.token_dim, chat_template=chat)
    # Base weights that reload from a package or a local folder stay out of checkpoints.
    language.external_prefixes = tuple(f"language.lm.{k}" for k in getattr(lm, "external_keys", ()))
    if config.lm.kind == "hf":
        from .fullscale import bind_language

        bind_language(language, config)
    sae = SparseAutoencoder(width, config.sae.d_sae, config.sae.kind, config.sae.k, config.sae.l1_coeff)
    codebook = QueryCodebook(config.sae.d_sae, config.codebook)
    slot_mapper = SlotMapper(config.codebook.dim, width, config.mask.dim, config.mask.heatmap_heads)
    decoder = sam_decoder if sam_decoder is not None else HeatmapPromptedDecoder(
        config.mask, config.vision.image_size, config.vision.feature_grid)
    from .baselines import build_head

    baseline = build_head(config, tokenizer, width)
    return SegCompass(config, vision, language, sae, codebook, slot_mapper, decoder, baseline)
