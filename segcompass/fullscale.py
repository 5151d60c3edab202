"""Full scale: SegCompass around a Hugging Face VLM and a SAM checkpoint, both from local folders.

    VLM folder (lm.path) ──► vision tower ─────────────► visual tokens [B, Nv, D]  (already LM width:
                        │                                the LanguageModel's projector is the identity)
                        └──► text decoder + LM head ────► HFCausalLM (what LanguageModel wraps: hook at
                                                          layer L, chain of thought, <REF_POS>)
    SAM folder (mask.sam_path) ──► ViT image encoder ──► image features [B, 256, 64, 64] (mask path)
                               └─► prompt encoder + mask decoder ──► HeatmapPromptedDecoder's weights

Supported VLMs: Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`) and LLaVA-1.5
(`LlavaForConditionalGeneration`). The model's input frame is SAM's (vision.image_size, 1024);
the VLM sees the same padded frame resized to its own input size, so visual token i covers the
same patch `patch_boxes` reports (row-major token_grid x token_grid):
- Qwen2.5-VL: token_grid * 28 pixels square (patch 14, 2x2 merge), so Nv = token_grid²; its
  3D (M-RoPE) positions are rebuilt from the 1D positions the LanguageModel passes (`MRopeLayout`);
- LLaVA-1.5: CLIP's fixed 336 px -> 24 x 24 = 576 tokens (token_grid must be 24).

Trained vs frozen (what a checkpoint stores): the vision tower and SAM's image encoder are frozen
and always reload from their folders. With lm.lora_rank > 0 the LM gets LoRA + trainable rows for
the new tokens (stored: adapters only); with lora_rank = 0 the embeddings and layers <= L are
frozen and layers > L, the final norm and the LM head train (the paper's split) and are stored.
SAM's prompt encoder and mask decoder train (the paper scales their learning rates) and are stored.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import SegCompassConfig
from .mask_decoder import HeatmapPromptedDecoder
from .smol import (add_special_tokens, adapter_free_keys, apply_lora, count_parameters, pick_tokenizer,
                   resize_embeddings)

log = logging.getLogger(__name__)

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SAM_MEAN, SAM_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# LLaVA-1.5's conversation format, for tokenizers that ship without a chat template.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }} "
    "{% elif message['role'] == 'user' %}USER: {{ message['content'] }} "
    "{% else %}ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def config_for(preset: str | SegCompassConfig, lm_path: str, sam_path: str, **lm_changes) -> SegCompassConfig:
    """A full-scale preset pointed at local weights, e.g. `config_for("qwen2.5-vl-7b", "/w/qwen", "/w/sam")`."""
    import dataclasses

    from .presets import get_preset

    config = get_preset(preset) if isinstance(preset, str) else preset
    return config.replace(
        lm=dataclasses.replace(config.lm, path=str(lm_path), **lm_changes),
        mask=dataclasses.replace(config.mask, sam_path=str(sam_path)),
    )


def _image_norm(folder: Path, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """[1, 3, 1, 1] mean and std for pixels in 0..1, from the folder's preprocessor_config.json if any."""
    path = Path(folder) / "preprocessor_config.json"
    if path.is_file():
        data = json.loads(path.read_text())
        mean, std = data.get("image_mean", mean), data.get("image_std", std)
    return torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)


# ---- language side ---------------------------------------------------------------------------
@dataclass
class MRopeLayout:
    """Qwen2.5-VL's 3D rotary positions for one image block in the prompt.

    Text before the image: (p, p, p). Visual token (r, c) at 1D position s + r*gw + c:
    (s, s + r, s + c). Text after the image continues from s + max(gh, gw): (p', p', p') with
    p' = p - gh*gw + max(gh, gw). This is what `Qwen2_5_VLModel.get_rope_index` computes for a
    prompt with one image, as a pure function of the 1D position (tested against it).
    """

    image_start: int  # s: index of the first visual token in every prompt
    grid_h: int
    grid_w: int

    def positions(self, position_ids_BT: torch.Tensor) -> torch.Tensor:
        """[B, T] 1D positions -> [3, B, T] (temporal, height, width)."""
        p = position_ids_BT
        n = self.grid_h * self.grid_w
        rel = p - self.image_start
        inside = (rel >= 0) & (rel < n)
        text = torch.where(rel >= n, p - n + max(self.grid_h, self.grid_w), p)
        s = torch.full_like(p, self.image_start)
        t = torch.where(inside, s, text)
        h = torch.where(inside, s + rel.clamp(0, n - 1) // self.grid_w, text)
        w = torch.where(inside, s + rel.clamp(0, n - 1) % self.grid_w, text)
        return torch.stack([t, h, w])


class HFCausalLM(nn.Module):
    """The text half of a VLM as a plain causal LM: decoder (embed_tokens, layers, norm) + LM head.

    Interface used by LanguageModel: forward(inputs_embeds, attention_mask, position_ids,
    past_key_values, use_cache) -> .logits [B, T, V], .hidden_states[-1] [B, T, D] (after the final
    norm), .past_key_values; get_decoder().layers; get_input_embeddings(); config (the text config).
    """

    def __init__(self, decoder: nn.Module, lm_head: nn.Linear, config, mrope: MRopeLayout | None = None):
        super().__init__()
        self.decoder = decoder
        self.lm_head = lm_head
        self.config = config
        self.mrope = mrope

    def get_decoder(self) -> nn.Module:
        return self.decoder

    def get_input_embeddings(self) -> nn.Embedding:
        return self.decoder.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @torch.no_grad()
    def resize_token_embeddings(self, n: int, mean_resizing: bool = False) -> nn.Embedding:
        """Grow input and output embeddings to n rows (new rows zero; see `smol.resize_embeddings`)."""
        old_in, old_out = self.decoder.embed_tokens, self.lm_head
        new_in = nn.Embedding(n, old_in.embedding_dim, old_in.padding_idx, dtype=old_in.weight.dtype,
                              device=old_in.weight.device)
        new_in.weight.zero_()
        new_in.weight[: old_in.num_embeddings] = old_in.weight
        self.decoder.embed_tokens = new_in
        if old_out.weight is old_in.weight:
            self.lm_head.weight = new_in.weight
        else:
            new_out = nn.Linear(old_out.in_features, n, bias=False, dtype=old_out.weight.dtype,
                                device=old_out.weight.device)
            new_out.weight.zero_()
            new_out.weight[: old_out.out_features] = old_out.weight
            self.lm_head = new_out
        self.config.vocab_size = n
        return new_in

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None,
                past_key_values=None, use_cache=False, logits_to_keep: int = 0, **_):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if inputs_embeds is None:
            inputs_embeds = self.decoder.embed_tokens(input_ids)
        if self.mrope is not None and position_ids is not None:
            position_ids = self.mrope.positions(position_ids)
        out = self.decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                           past_key_values=past_key_values, use_cache=use_cache)
        hidden = out.last_hidden_state  # [B, T, D], after the final norm
        kept = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        return CausalLMOutputWithPast(logits=self.lm_head(kept), hidden_states=(hidden,),
                                      past_key_values=out.past_key_values)


# ---- vision side -----------------------------------------------------------------------------
class QwenVisualTokens(nn.Module):
    """Qwen2.5-VL's vision tower on a square frame: pixels [B, 3, S, S] -> tokens [B, g², D]."""

    def __init__(self, visual: nn.Module, vision_config, token_grid: int, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.visual = visual
        self.patch, self.merge = vision_config.patch_size, vision_config.spatial_merge_size
        self.temporal = vision_config.temporal_patch_size
        self.grid = token_grid * self.merge  # patches per side
        self.size = self.grid * self.patch  # input pixels per side
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def patchify(self, x_B3HW: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B * gh * gw, 3 * t * p * p], Qwen2-VL image processor's layout (merge groups contiguous)."""
        B, C = x_B3HW.shape[:2]
        g, m, p = self.grid, self.merge, self.patch
        x = x_B3HW.reshape(B, C, g // m, m, p, g // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, self.temporal, -1, -1)  # a still image repeats in time
        return x.reshape(B * g * g, C * self.temporal * p * p)

    def forward(self, pixels_B3SS: torch.Tensor) -> torch.Tensor:
        B = pixels_B3SS.shape[0]
        x = F.interpolate(pixels_B3SS, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 1)
        x = (x - self.mean) / self.std
        grid_thw = torch.tensor([[1, self.grid, self.grid]] * B, device=x.device)
        dtype = next(self.visual.parameters()).dtype
        merged = self.visual(self.patchify(x).to(dtype), grid_thw=grid_thw).pooler_output  # [B*Nv, D], row-major
        return merged.view(B, -1, merged.shape[-1])


class LlavaVisualTokens(nn.Module):
    """LLaVA's CLIP tower + projector: pixels [B, 3, S, S] -> tokens [B, 576, D] (CLS dropped)."""

    def __init__(self, tower: nn.Module, projector: nn.Module, config, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.tower, self.projector = tower, projector
        self.size = config.vision_config.image_size
        self.layers = config.vision_feature_layer
        self.strategy = config.vision_feature_select_strategy
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, pixels_B3SS: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(pixels_B3SS, size=(self.size, self.size), mode="bicubic", align_corners=False).clamp(0, 1)
        x = ((x - self.mean) / self.std).to(next(self.tower.parameters()).dtype)
        states = self.tower(x, output_hidden_states=True).hidden_states
        layers = [self.layers] if isinstance(self.layers, int) else list(self.layers)
        picked = [states[i][:, 1:] if self.strategy == "default" else states[i] for i in layers]
        return self.projector(torch.cat(picked, dim=-1))


class HFVisionEncoder(nn.Module):
    """Frozen VLM vision tower + frozen SAM image encoder.

    pixels [B, 3, S, S] (0..1, zero-padded, S = SAM's 1024) -> (visual tokens [B, Nv, D] in LM
    width, image features [B, 256, S/16, S/16] = SAM's image embeddings).
    """

    external_prefixes = ("vision.",)  # all of it reloads from the local folders

    def __init__(self, visual_tokens: nn.Module, sam_encoder: nn.Module, token_dim: int, sam_mean, sam_std):
        super().__init__()
        self.visual_tokens = visual_tokens
        self.sam = sam_encoder
        self.token_dim = token_dim
        self.tokens_in_lm_space = True
        self.register_buffer("sam_mean", sam_mean, persistent=False)
        self.register_buffer("sam_std", sam_std, persistent=False)
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> "HFVisionEncoder":
        super().train(mode)
        return super().train(False)  # frozen: no dropout, no statistics updates

    @torch.no_grad()
    def forward(self, pixels_B3SS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.visual_tokens(pixels_B3SS)
        x = ((pixels_B3SS - self.sam_mean) / self.sam_std).to(next(self.sam.parameters()).dtype)
        feats = self.sam(x).last_hidden_state  # [B, 256, S/16, S/16]
        return tokens, feats.float()


# ---- loading -------------------------------------------------------------------------------------
def load_vlm(path: str | Path, dtype: torch.dtype = torch.float32):
    """A Qwen2.5-VL or LLaVA model from a local folder (no network)."""
    from transformers import AutoConfig, LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model folder (config.json missing)")
    classes = {"qwen2_5_vl": Qwen2_5_VLForConditionalGeneration, "llava": LlavaForConditionalGeneration}
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type not in classes:
        raise ValueError(f"unsupported VLM type '{model_type}' in {path}; supported: {sorted(classes)}")
    return classes[model_type].from_pretrained(path, dtype=dtype).eval()


def load_sam(path: str | Path, dtype: torch.dtype = torch.float32):
    from transformers import SamModel

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face SamModel folder (config.json missing)")
    return SamModel.from_pretrained(path, dtype=dtype).eval()


def build_sam_decoder(sam, config: SegCompassConfig) -> HeatmapPromptedDecoder:
    """Our heatmap-prompted decoder carrying SAM's prompt encoder and mask decoder weights."""
    m, dec, vis = config.mask, sam.config.mask_decoder_config, sam.config.vision_config
    want = {"mask.dim": dec.hidden_size, "mask.decoder_layers": dec.num_hidden_layers,
            "mask.decoder_heads": dec.num_attention_heads, "mask.decoder_mlp_dim": dec.mlp_dim,
            "vision.image_size": vis.image_size, "vision.feature_grid": vis.image_size // vis.patch_size}
    got = {"mask.dim": m.dim, "mask.decoder_layers": m.decoder_layers, "mask.decoder_heads": m.decoder_heads,
           "mask.decoder_mlp_dim": m.decoder_mlp_dim, "vision.image_size": config.vision.image_size,
           "vision.feature_grid": config.vision.feature_grid}
    if want != got:
        bad = {k: (got[k], want[k]) for k in want if want[k] != got[k]}
        raise ValueError(f"config does not match the SAM checkpoint (config, SAM): {bad}")
    decoder = HeatmapPromptedDecoder(m, config.vision.image_size, config.vision.feature_grid)
    decoder.prompt_encoder.load_state_dict(sam.prompt_encoder.state_dict())
    decoder.mask_decoder.load_state_dict(sam.mask_decoder.state_dict())
    return decoder.float()


def _split_vlm(vlm, config: SegCompassConfig, lm_folder: Path):
    """-> (visual-token module, text decoder, LM head, text config, uses M-RoPE)."""
    kind = vlm.config.model_type
    mean, std = _image_norm(lm_folder, CLIP_MEAN, CLIP_STD)
    g = config.vision.token_grid
    if kind == "qwen2_5_vl":
        if g <= 0:
            raise ValueError("vision.token_grid must be > 0 for Qwen2.5-VL (input size = token_grid * 28 px)")
        visual = QwenVisualTokens(vlm.model.visual, vlm.config.vision_config, g, mean, std)
        return visual, vlm.model.language_model, vlm.lm_head, vlm.config.text_config, True
    vc = vlm.config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    if g * g != n:
        raise ValueError(f"vision.token_grid must be {int(n ** 0.5)} for this LLaVA ({n} visual tokens)")
    visual = LlavaVisualTokens(vlm.model.vision_tower, vlm.model.multi_modal_projector, vlm.config, mean, std)
    return visual, vlm.model.language_model, vlm.lm_head, vlm.config.text_config, False


def build_fullscale_parts(config: SegCompassConfig, tokenizer=None):
    """-> (vision encoder, causal LM, tokenizer, mask decoder) built from config.lm.path and config.mask.sam_path.

    `tokenizer`: a checkpoint's saved tokenizer; None (or one that does not extend the VLM's
    vocabulary) loads the VLM folder's and adds the special tokens.
    """
    from transformers import AutoTokenizer

    if not config.lm.path or not config.mask.sam_path:
        raise ValueError("full scale needs local weights: set lm.path (the VLM folder) and mask.sam_path (SAM folder)")
    dtype = DTYPES[config.lm.dtype]
    lm_folder = Path(config.lm.path)
    vlm = load_vlm(lm_folder, dtype)
    sam = load_sam(config.mask.sam_path, dtype)
    visual, decoder, lm_head, text_config, mrope = _split_vlm(vlm, config, lm_folder)
    if text_config.hidden_size != config.lm.hidden_size or text_config.num_hidden_layers != config.lm.num_layers:
        raise ValueError(f"lm.hidden_size/num_layers = {config.lm.hidden_size}/{config.lm.num_layers} but the VLM "
                         f"has {text_config.hidden_size}/{text_config.num_hidden_layers}")
    g = config.vision.token_grid
    lm = HFCausalLM(decoder, lm_head, text_config, MRopeLayout(0, g, g) if mrope else None)

    base_tokenizer = AutoTokenizer.from_pretrained(lm_folder)
    base_vocab = len(base_tokenizer)
    tokenizer = pick_tokenizer(tokenizer, base_tokenizer)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    token_ids = add_special_tokens(tokenizer)
    new_ids = resize_embeddings(lm, tokenizer, token_ids, base_vocab)
    text_config.pad_token_id = tokenizer.pad_token_id

    L = config.lm.hook_layer
    if config.lm.lora_rank > 0:
        lm = apply_lora(lm, config.lm.lora_rank, new_ids)
        lm.external_keys = adapter_free_keys(lm)
    else:  # the paper's split: embeddings and layers <= L frozen; layers > L, final norm, LM head train
        frozen = [lm.decoder.embed_tokens, *lm.decoder.layers[:L]]
        for module in frozen:
            module.requires_grad_(False)
        frozen_ids = {id(p) for m in frozen for p in m.parameters()}
        lm.external_keys = [k for k, p in lm.named_parameters() if id(p) in frozen_ids]
    vision = HFVisionEncoder(visual, sam.vision_encoder, text_config.hidden_size, *_image_norm(
        Path(config.mask.sam_path), SAM_MEAN, SAM_STD))
    mask_decoder = build_sam_decoder(sam, config)
    del vlm, sam
    trainable, total = count_parameters(lm)
    log.info("full-scale LM: %.1fM trainable of %.1fM parameters", trainable / 1e6, total / 1e6)
    return vision, lm, tokenizer, mask_decoder


def bind_language(language, config: SegCompassConfig) -> None:
    """Finish the LanguageModel around a VLM: identity projector (visual tokens are already in LM
    width) and, for M-RoPE, the index of the first visual token in the prompt."""
    language.projector = nn.Identity()
    lm = language.lm
    layout = getattr(lm, "mrope", None)
    if layout is not None:
        prompt = language.build_prompt("x", config.vision.token_grid**2)
        layout.image_start = prompt.ids.index(language.image_id)


@contextlib.contextmanager
def full_parameters(model: nn.Module):
    """Gather an FSDP2-sharded model's root parameters for calls that bypass its forward.

    `encode`, `reason` and GRPO sampling call sub-modules (vision, LM, heads) directly; under
    FSDP2 the root unit's parameters (embeddings, final norm, LM head, SAE, heads) stay sharded
    there and the call fails ("mixed torch.Tensor and DTensor"). Decoder layers wrapped as their
    own units gather themselves. A no-op for unsharded models and DeepSpeed ZeRO-2.
    """
    unshard = getattr(model, "unshard", None)
    if unshard is None:
        yield model
        return
    unshard()
    try:
        yield model
    finally:
        model.reshard()
