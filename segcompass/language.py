"""The causal language model side: prompt layout, visual-token injection, layer-L hook, generation.

Any Hugging Face causal LM fits (a tiny Llama trained from scratch, SmolLM2 with LoRA, the LM of a
VLM). The residual stream after `hook_layer` decoder layers is read by one forward hook, which can
also splice a replacement in (the "re-reason under an edit" path).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from .records import TokenRole
from .tokenizer import ASSISTANT_TOKEN, BOS, IMAGE_TOKEN, REF_TOKEN, THINK_END, THINK_START, USER_TOKEN


@dataclass
class Prompt:
    ids: list[int]
    roles: list[int]


@dataclass
class PackedBatch:
    """Right-padded prompt + completion sequences for a teacher-forced forward pass."""

    ids: torch.Tensor  # [B, T]
    roles: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    prompt_lengths: torch.Tensor  # [B]
    lengths: torch.Tensor  # [B]


@dataclass
class StepOutput:
    logits: torch.Tensor  # [B, t, V], or the last `logits_to_keep` positions [B, k, V]
    hook: torch.Tensor  # [B, t, D] residual stream after layer L (before any splice)
    last: torch.Tensor  # [B, t, D] final-layer state (after the final norm)
    cache: DynamicCache | None


@dataclass
class Generation:
    """Batched generation result. Sequences are prompt (left-padded) + completion (right-padded)."""

    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    completion_ids: torch.Tensor  # [B, C] right-padded with pad id
    completion_mask: torch.Tensor  # [B, C]


def completion_text(cot: str) -> str:
    """The text a model is taught to write for a reference chain of thought."""
    return f"{THINK_START} {cot} {THINK_END} {REF_TOKEN}"


def head_rows(head: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """`head.weight[ids]` without building the whole weight: peft's trainable-tokens wrapper (smol's new special
    tokens) merges its token deltas into a full copy of the 49k x 576 matrix on every `.weight` read (0.11 s on 2 CPU
    cores, three times per percept), so its rows are gathered from the base weight and the deltas instead."""
    layer = getattr(head, "token_adapter", None)
    if layer is None or getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False) \
            or not hasattr(layer, "trainable_tokens_delta"):
        return head.weight[ids]
    rows = layer.base_layer.weight[ids]
    for name in layer.active_adapters:
        if name not in layer.trainable_tokens_delta:
            continue
        where = {t: k for k, t in enumerate(layer.token_indices[name])}
        hits = [(i, where[t]) for i, t in enumerate(ids.tolist()) if t in where]
        if hits:
            at, src = (torch.tensor(v, device=ids.device) for v in zip(*hits))
            rows = rows.index_copy(0, at, layer.trainable_tokens_delta[name][src].to(rows))
    return rows


def first_of(steers: Sequence[Callable[[int, list[int]], int | None]]) -> Callable[[int, list[int]], int | None]:
    """One `steer` for `LanguageModel.generate` from several: the first that forces a token decides."""
    def steer(b: int, completion_ids: list[int]) -> int | None:
        for one in steers:
            if (token := one(b, completion_ids)) is not None:
                return token
        return None

    return steer


class LanguageModel(nn.Module):
    def __init__(self, lm: nn.Module, tokenizer, hook_layer: int, visual_dim: int, chat_template: bool = False):
        super().__init__()
        self.lm = lm
        self.tokenizer = tokenizer
        self.hook_layer = hook_layer
        self.chat_template = chat_template
        width = lm.config.hidden_size
        self.projector = nn.Sequential(nn.Linear(visual_dim, width), nn.GELU(), nn.Linear(width, width))
        ids = tokenizer.convert_tokens_to_ids
        self.image_id, self.ref_id = ids(IMAGE_TOKEN), ids(REF_TOKEN)
        self.think_start_id, self.think_end_id = ids(THINK_START), ids(THINK_END)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.special_ids = set(tokenizer.all_special_ids)
        self._splice: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._captured: torch.Tensor | None = None
        self._template_cache: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
        self.decoder_layers()[hook_layer - 1].register_forward_hook(self._hook)

    # ---- structure -------------------------------------------------------------------------
    def decoder_layers(self) -> nn.ModuleList:
        return self.lm.get_decoder().layers

    def _hook(self, module, inputs, output):
        states = output[0] if isinstance(output, tuple) else output
        self._captured = states
        if self._splice is None:
            return None
        new = self._splice(states)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    @contextlib.contextmanager
    def splice(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        """Within the block, layer L's output x is replaced by fn(x) (shape [B, t, D])."""
        self._splice = fn
        try:
            yield
        finally:
            self._splice = None

    # ---- prompts ---------------------------------------------------------------------------
    def _template_parts(self, n_visual: int) -> tuple[str, str]:
        images = " ".join([IMAGE_TOKEN] * n_visual)
        if not self.chat_template:
            return f"{BOS} {images} {USER_TOKEN}", ASSISTANT_TOKEN
        sentinel = "\x00INSTRUCTION\x00"
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{images}\n{sentinel}"}], tokenize=False, add_generation_prompt=True
        )
        prefix, suffix = text.split(sentinel)
        return prefix, suffix

    def _template_ids(self, n_visual: int) -> tuple[list[int], list[int]]:
        """Token ids of the prompt's fixed prefix (visual placeholders included) and suffix, computed once per
        (n_visual, vocabulary size): rendering the chat template and tokenising 64 placeholders for every example
        was ~33 of the ~58 ms a batch of 128 smol prompts took on one core (`python -m bench.host_batch`)."""
        key = (n_visual, len(self.tokenizer))
        if key not in self._template_cache:
            prefix, suffix = self._template_parts(n_visual)
            self._template_cache[key] = (self._encode(prefix), self._encode(suffix))
        return self._template_cache[key]

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def build_prompt(self, instruction: str, n_visual: int) -> Prompt:
        pre, suf = self._template_ids(n_visual)
        return self.prompt_from_ids(pre, self._encode(instruction), suf)

    def prompt_from_ids(self, pre: list[int], ins: list[int], suf: list[int]) -> Prompt:
        """The prompt of template prefix ids (visual placeholders included), instruction ids and suffix ids."""
        roles = [TokenRole.VISUAL if t == self.image_id else TokenRole.SPECIAL for t in pre]
        roles += [TokenRole.INSTRUCTION] * len(ins) + [TokenRole.SPECIAL] * len(suf)
        return Prompt(ids=pre + ins + suf, roles=[int(r) for r in roles])

    def completion_roles(self, ids: list[int]) -> list[int]:
        return [int(TokenRole.SPECIAL if t in self.special_ids else TokenRole.COT) for t in ids]

    def encode_completion(self, cot: str) -> list[int]:
        """Token ids of the reference completion (ends with the reference token, then EOS)."""
        return self.tokenizer(completion_text(cot), add_special_tokens=False).input_ids + [self.eos_id]

    def pack(self, prompts: list[Prompt], completions: list[list[int]]) -> PackedBatch:
        seqs = [p.ids + list(c) for p, c in zip(prompts, completions)]
        roles = [p.roles + self.completion_roles(list(c)) for p, c in zip(prompts, completions)]
        B, T = len(seqs), max(len(s) for s in seqs)
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        role_t = torch.full((B, T), int(TokenRole.SPECIAL), dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.long)
        for b, (s, r) in enumerate(zip(seqs, roles)):
            ids[b, : len(s)], role_t[b, : len(s)], mask[b, : len(s)] = torch.tensor(s), torch.tensor(r), 1
        return PackedBatch(
            ids=ids, roles=role_t, attention_mask=mask,
            prompt_lengths=torch.tensor([len(p.ids) for p in prompts]), lengths=torch.tensor([len(s) for s in seqs]),
        )

    # ---- forward ---------------------------------------------------------------------------
    def embed(self, ids_BT: torch.Tensor, visual_BND: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the <image> placeholders replaced by projected visual tokens."""
        embeds = self.lm.get_input_embeddings()(ids_BT)
        if visual_BND is None:
            return embeds
        is_image = ids_BT == self.image_id
        proj = self.projector(visual_BND).to(embeds.dtype)  # [B, Nv, D]
        if int(is_image.sum()) != proj.shape[0] * proj.shape[1]:
            raise ValueError("number of <image> placeholders does not match the visual tokens")
        return embeds.masked_scatter(is_image[..., None], proj)

    def step(
        self, embeds_BTD: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
        cache: DynamicCache | None = None, use_cache: bool = False, logits_to_keep: int = 0,
    ) -> StepOutput:
        """`logits_to_keep` > 0: LM-head logits for the last k positions only (0 = all). Training needs
        them only on the completion; the 49k-word head over the whole prompt (64 visual tokens
        included) was a fifth of a smol SFT step."""
        extra = {"logits_to_keep": logits_to_keep} if logits_to_keep > 0 else {}
        out = self.lm(
            inputs_embeds=embeds_BTD, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=cache, use_cache=use_cache, output_hidden_states=True, **extra,
        )
        hook, self._captured = self._captured, None
        return StepOutput(logits=out.logits, hook=hook, last=out.hidden_states[-1], cache=out.past_key_values)

    # ---- generation ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: list[Prompt],
        visual_BND: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
        on_token: Callable[[int, int], None] | None = None,
        on_states: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
        steer: Callable[[int, list[int]], int | None] | None = None,
    ) -> Generation:
        """Sample (temperature > 0) or greedily decode completions with a KV cache.

        A sequence stops after it emits the reference token or EOS; every emitted token is fed
        back in once, so each has its layer states (the reference token's included).
        `on_token(b, token_id)` streams each new token; `on_states(b, hook, last)` receives the layer-L and last-layer states of every input token [t, D] as they are computed
        (the generation pass itself is the source of the SAE codes).
        `steer(b, completion_ids)` may force sequence b's next token (an int) instead of the sampled one
        (`segcompass.grounding`); None leaves the choice to the LM.
        """
        B, P = len(prompts), max(len(p.ids) for p in prompts)
        device = visual_BND.device
        ids = torch.full((B, P), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros(B, P, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            ids[b, P - len(p.ids):] = torch.tensor(p.ids, device=device)
            mask[b, P - len(p.ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache(config=self.lm.config)
        out = self.step(self.embed(ids, visual_BND), mask, positions, cache, use_cache=True)
        if on_states is not None:
            for b, p in enumerate(prompts):
                on_states(b, out.hook[b, P - len(p.ids):], out.last[b, P - len(p.ids):])
        completion = torch.full((B, max_new_tokens), self.pad_id, dtype=torch.long, device=device)
        comp_mask = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        next_pos = positions[:, -1] + 1
        logits = out.logits[:, -1]
        for t in range(max_new_tokens):
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:
                token = logits.argmax(-1)
            if steer is not None:
                for b in (~done).nonzero().flatten().tolist():
                    forced = steer(b, completion[b, :t].tolist())
                    if forced is not None:
                        token[b] = forced
            token = torch.where(done, torch.full_like(token, self.pad_id), token)
            completion[:, t] = token
            comp_mask[:, t] = (~done).long()
            if on_token is not None:
                for b in (~done).nonzero().flatten().tolist():
                    on_token(b, int(token[b]))
            mask = torch.cat([mask, (~done).long()[:, None]], dim=1)
            out = self.step(self.embed(token[:, None], None), mask, next_pos[:, None], out.cache, use_cache=True)
            if on_states is not None:
                for b in (~done).nonzero().flatten().tolist():
                    on_states(b, out.hook[b], out.last[b])
            next_pos = next_pos + 1
            # Every emitted token is fed back once, so the reference token's own state exists.
            done = done | (token == self.eos_id) | (token == self.ref_id)
            if bool(done.all()):
                break
            logits = out.logits[:, -1]
        return Generation(
            prompt_ids=ids, prompt_mask=mask[:, :P], completion_ids=completion[:, : t + 1],
            completion_mask=comp_mask[:, : t + 1],
        )

    def word_logits(self, states_BTD: torch.Tensor, word_ids: list[int]) -> torch.Tensor:
        """Logit lens restricted to some words: the LM's final norm and unembedding applied to
        intermediate states [B, T, D] -> [B, T, len(word_ids)]."""
        head = self.lm.get_output_embeddings()
        norm = self.lm.get_decoder().norm
        ids = torch.as_tensor(word_ids, device=states_BTD.device)
        bias = head.bias[ids] if getattr(head, "bias", None) is not None else None
        return F.linear(norm(states_BTD), head_rows(head, ids), bias)

    def first_token_ids(self, words: Sequence[str]) -> list[int] | None:
        """The first token of each word as written mid-sentence (" hexagon" -> " hex" for a BPE
        tokenizer; "hexagon" for a word-level one): what the LM writes first when it names the word.
        None when a word is unknown to the tokenizer or two words share their first token."""
        out, unk = [], self.tokenizer.unk_token_id
        for word in words:
            firsts = [ids[0] for ids in (self.tokenizer(v, add_special_tokens=False).input_ids
                                         for v in (" " + word, word)) if ids and ids[0] != unk]
            if not firsts:
                return None
            out.append(firsts[0])
        return out if len(set(out)) == len(out) else None

    def token_text(self, token_id: int) -> str:
        if token_id in self.special_ids:
            return self.tokenizer.convert_ids_to_tokens(token_id)
        return self.tokenizer.decode([token_id])
