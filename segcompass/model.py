"""SegCompass: CoT -> SAE concepts -> query codebook -> slot heatmaps -> SAM-style masks.

Inference is split like SAM's predictor: `encode` (vision encoder + LM generation, expensive, once)
returns a `Trace`; `decode(trace, edits)` reruns only codebook -> slot mapper -> mask decoder and
never touches the language model. `reason(trace, edits)` is the slow path: it splices the edited
SAE reconstruction (plus the error term) into layer L and regenerates the chain of thought.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import SegCompassConfig
from .edits import apply_edits
from .grounding import grounding_steer
from .language import LanguageModel, Prompt, first_of
from .records import ConceptEdit, ForwardOutput, Prediction, TokenRole, Trace
from .repair import REWRITE_MARK, FixSteer
from .repair import repair as find_fix
from .sae import SparseAutoencoder
from .slot_mapper import kept_slots
from .verify import naming_vocab, percept_from_states
from .vision import PreparedImage, patch_boxes, prepare_image

log = logging.getLogger(__name__)

MAX_INSTRUCTION_CHARS = 2000


def check_instruction(instruction: str) -> str:
    """Strip an instruction and reject empty or huge ones with a clear error."""
    if not isinstance(instruction, str):
        raise ValueError("the instruction must be text")
    text = " ".join(instruction.split())
    if not text:
        raise ValueError("the instruction is empty: describe what to segment")
    if len(text) > MAX_INSTRUCTION_CHARS:
        raise ValueError(f"the instruction is too long ({len(text)} characters; at most {MAX_INSTRUCTION_CHARS})")
    return text


class SegCompass(nn.Module):
    def __init__(
        self,
        config: SegCompassConfig,
        vision: nn.Module,
        language: LanguageModel,
        sae: SparseAutoencoder,
        codebook: nn.Module,
        slot_mapper: nn.Module,
        mask_decoder: nn.Module,
        baseline: nn.Module | None = None,
    ):
        super().__init__()
        self.config = config
        self.vision = vision
        self.language = language
        self.sae = sae
        self.codebook = codebook
        self.slot_mapper = slot_mapper
        self.mask_decoder = mask_decoder
        # A baseline head (config.head != "segcompass", see segcompass.baselines) replaces
        # codebook -> slot mapper with its own readout into the same mask decoder.
        self.baseline = baseline

    @property
    def tokenizer(self):
        return self.language.tokenizer

    @property
    def num_visual(self) -> int:
        return self.config.vision.token_grid**2

    # ---- shared pieces ---------------------------------------------------------------------
    def codes_from_states(self, hook_BTD: torch.Tensor, pad_BT: torch.Tensor | None = None) -> torch.Tensor:
        """Thresholded SAE codes [B, T, F]; padding rows are zero."""
        codes = self.sae.encode(hook_BTD.float())
        thr = self.config.sae.code_threshold
        if thr > 0:
            codes = codes * (codes.abs() >= thr)
        if pad_BT is not None:
            codes = codes.masked_fill(pad_BT[..., None], 0.0)
        return codes

    def heads(
        self,
        codes_BTF: torch.Tensor,
        roles_BT: torch.Tensor,
        pad_BT: torch.Tensor,
        ref_BD: torch.Tensor,
        feats_BChw: torch.Tensor,
        valid_hw: list[tuple[int, int]],
        ids_BT: torch.Tensor | None = None,
        prompt_lengths_B: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codebook -> slot mapper -> mask decoder: (heatmap logits [B,K,h,w], conf logits [B,K], mask logits [B,K,4h,4w])."""
        if self.baseline is not None:
            return self.baseline(self.mask_decoder, ref_BD, feats_BChw, valid_hw, ids_BT=ids_BT,
                                 prompt_lengths_B=prompt_lengths_B, attention_mask_BT=None if pad_BT is None else ~pad_BT)
        slots = self.codebook(codes_BTF, roles_BT, pad_BT)
        heat, conf = self.slot_mapper(slots, ref_BD.float(), feats_BChw)
        masks = self.mask_decoder(heat, feats_BChw, valid_hw)
        return heat, conf, masks

    # ---- training: one batched, teacher-forced pass -----------------------------------------
    def forward(
        self,
        pixels_B3SS: torch.Tensor | None,
        valid_hw: list[tuple[int, int]],
        ids_BT: torch.Tensor,
        roles_BT: torch.Tensor,
        attention_mask_BT: torch.Tensor,
        prompt_lengths_B: torch.Tensor,
        vision_out: tuple[torch.Tensor, torch.Tensor] | None = None,
        ref_dropout: float = 0.0,
        ref_shuffle: float = 0.0,
        logits_to_keep: int = 0,
    ) -> ForwardOutput:
        """Right-padded sequences (prompt + completion). The reference token used is the first one
        after the prompt; where there is none, the last real token stands in. `vision_out`, when
        given, is the vision encoder's (tokens, features) for these rows (pixels are then unused and may be None).
        `ref_dropout` (training): the share of rows whose reference state the heads see as zeros,
        so the slots must carry the target through the SAE concepts (what concept edits act on).
        `ref_shuffle` (training): the share of rows whose heads get another row's reference state
        (the batch rolled by one), so that where the concepts and that state disagree, as after a
        concept edit, the heads follow the concepts. `logits_to_keep` > 0: LM logits for the last k
        positions only (training losses need the completion's, not the prompt's)."""
        tokens, feats = vision_out if vision_out is not None else self.vision(pixels_B3SS)
        step, ref_pos, ref = self.language_states(tokens, ids_BT, attention_mask_BT, prompt_lengths_B, logits_to_keep)
        pad = attention_mask_BT == 0
        codes = self.codes_from_states(step.hook, pad)
        if ref_shuffle > 0 and len(ref) > 1:
            ref = torch.where(torch.rand(len(ref), 1, device=ref.device) < ref_shuffle, ref.roll(1, 0), ref)
        if ref_dropout > 0:
            ref = ref * (torch.rand(len(ref), 1, device=ref.device) >= ref_dropout)
        heat, conf, masks = self.heads(codes, roles_BT, pad, ref, feats, valid_hw, ids_BT, prompt_lengths_B)
        return ForwardOutput(
            lm_logits=step.logits, codes=codes, heatmap_logits=heat, mask_logits=masks,
            confidence_logits=conf, ref_positions=ref_pos, hook_states=step.hook,
        )

    def language_states(self, tokens_BND, ids_BT, attention_mask_BT, prompt_lengths_B, logits_to_keep: int = 0):
        """The language model's teacher-forced pass: (StepOutput, reference positions [B] (-1: none),
        the reference state [B, D] the heads read: the last-layer state at the first reference token
        after the prompt, or at the last real token where there is none)."""
        embeds = self.language.embed(ids_BT, tokens_BND)
        positions = torch.arange(ids_BT.shape[1], device=ids_BT.device).expand_as(ids_BT)
        step = self.language.step(embeds, attention_mask_BT, positions, logits_to_keep=logits_to_keep)
        ref_pos = self.reference_positions(ids_BT, attention_mask_BT, prompt_lengths_B)
        stand_in = attention_mask_BT.sum(1) - 1
        used = torch.where(ref_pos >= 0, ref_pos, stand_in)
        ref = step.last[torch.arange(len(used), device=used.device), used]
        return step, ref_pos, ref

    def reference_positions(self, ids_BT, attention_mask_BT, prompt_lengths_B) -> torch.Tensor:
        """[B] position of the first reference token after the prompt, -1 where there is none."""
        T = ids_BT.shape[1]
        after = torch.arange(T, device=ids_BT.device)[None] >= prompt_lengths_B[:, None]
        is_ref = (ids_BT == self.language.ref_id) & after & (attention_mask_BT > 0)
        first = torch.where(is_ref, torch.arange(T, device=ids_BT.device)[None], T).min(1).values
        return torch.where(first < T, first, torch.full_like(first, -1))

    # ---- inference -------------------------------------------------------------------------
    def prepare(self, image) -> PreparedImage:
        return prepare_image(image, self.config.vision.image_size)

    @torch.no_grad()
    def encode(
        self,
        image,
        instruction: str,
        on_token: Callable[[str], None] | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
        repair: bool | None = None,
    ) -> Trace:
        """Run the vision encoder and generate the CoT; keep everything `decode` needs. `repair`: rewrite a greedy
        CoT whose decision the visual tokens contradict (segcompass.repair; None: as the config says)."""
        instruction = check_instruction(instruction)
        prep = self.prepare(image)
        tokens, feats = self.vision(prep.pixels[None].to(self._device()))
        return self._generate_trace(prep, tokens, feats, instruction, on_token, max_new_tokens, temperature, generator,
                                    repair=repair)

    @torch.no_grad()
    def reason(
        self,
        image,
        trace: Trace,
        edits: Sequence[ConceptEdit],
        on_token: Callable[[str], None] | None = None,
        repair: bool | None = None,
    ) -> Trace:
        """Slow path: regenerate the CoT with layer L replaced by SAE(edited codes) + error (`repair` as in
        `encode`; the edited visual tokens then decide what they contradict)."""
        prep = self.prepare(image)
        tokens, feats = self.vision(prep.pixels[None].to(self._device()))
        return self._generate_trace(prep, tokens, feats, trace.instruction, on_token, None, 0.0, None, edits,
                                    repair=repair)

    @torch.no_grad()
    def encode_batch(self, images: Sequence, instructions: Sequence[str], max_new_tokens: int | None = None
                     ) -> list[Trace]:
        """Greedy `encode` of several (image, instruction) pairs in one batched generation (evaluation:
        on CPU a batch of B costs about as much per generated token as one). Same traces as `encode`
        up to float rounding of padded batches."""
        if len(images) != len(instructions):
            raise ValueError(f"{len(images)} images but {len(instructions)} instructions")
        if not images:
            return []
        instructions = [check_instruction(text) for text in instructions]
        preps = [self.prepare(image) for image in images]
        tokens, feats = self.vision(torch.stack([p.pixels for p in preps]).to(self._device()))
        return self._generate_traces(preps, tokens, feats, instructions, None, max_new_tokens, 0.0, None)

    def _generate_trace(
        self, prep, tokens, feats, instruction, on_token, max_new_tokens, temperature, generator, edits=(), repair=None
    ) -> Trace:
        stream = None if on_token is None else (lambda _b, text: on_token(text))
        return self._generate_traces([prep], tokens, feats, [instruction], stream, max_new_tokens, temperature,
                                     generator, edits, repair=repair)[0]

    def _generate_traces(
        self, preps, tokens, feats, instructions, on_token, max_new_tokens, temperature, generator, edits=(),
        ground_regions: bool | None = None, repair: bool | None = None, fixes: list | None = None,
    ) -> list[Trace]:
        """`ground_regions`: steer the CoT's region words (segcompass.grounding); `repair`: write a greedy CoT
        again where its decision contradicts the visual tokens (segcompass.repair); None = the config's choice.
        `fixes` (one `repair.Fix` or None per example) forces those rewrites; `repair` then does nothing."""
        lang = self.language
        B = len(preps)
        if edits and B != 1:
            raise ValueError("concept edits during generation take one example at a time")
        prompts: list[Prompt] = [lang.build_prompt(text, self.num_visual) for text in instructions]
        boxes = [patch_boxes(self.config.vision.token_grid, self.config.vision.image_size, p.valid_hw,
                             p.original_size) for p in preps]
        fed_roles = [list(p.roles) for p in prompts]
        hooks: list[list] = [[] for _ in range(B)]
        lasts: list[list] = [[] for _ in range(B)]

        def stream(b: int, token_id: int) -> None:
            fed_roles[b].extend(lang.completion_roles([token_id]))
            if on_token is not None:
                on_token(b, lang.token_text(token_id))

        def keep(b: int, hook: torch.Tensor, last: torch.Tensor) -> None:
            hooks[b].append(hook.reshape(-1, hook.shape[-1]))
            lasts[b].append(last.reshape(-1, last.shape[-1]))

        def splice(x_BtD: torch.Tensor) -> torch.Tensor:
            # x holds the states of the last t positions fed; edits address absolute positions,
            # so they are applied over the whole sequence so far (earlier positions' codes are 0).
            roles = fed_roles[0]
            start = len(roles) - x_BtD.shape[1]
            z = self.codes_from_states(x_BtD)[0]
            z_full = torch.zeros(len(roles), z.shape[-1], device=z.device)
            z_full[start:] = z
            z_edit = apply_edits(z_full, torch.tensor(roles, device=z.device), edits, boxes[0])[start:]
            error = x_BtD[0].float() - self.sae.decode(z)
            return (self.sae.decode(z_edit) + error).to(x_BtD.dtype)[None]

        budget = max_new_tokens or self.config.lm.max_new_tokens
        gen_kwargs = dict(max_new_tokens=budget, temperature=temperature, generator=generator,
                          on_token=stream, on_states=keep)
        def visual_states(b: int) -> torch.Tensor:  # layer L of the prompt's visual tokens, edited if asked
            states = splice(hooks[b][0][None])[0] if edits else hooks[b][0]
            return states[torch.tensor(prompts[b].roles, device=states.device) == int(TokenRole.VISUAL)]

        grounded = self.config.lm.ground_regions if ground_regions is None else ground_regions
        steers = [FixSteer(lang.tokenizer, fixes)] if fixes is not None else []
        if grounded and (ground := grounding_steer(lang, B, visual_states, boxes, [p.original_size for p in preps])):
            steers.append(ground)
        if steers:
            gen_kwargs["steer"] = first_of(steers)
        if edits:
            with lang.splice(splice):
                gen = lang.generate(prompts, tokens, **gen_kwargs)
        else:
            gen = lang.generate(prompts, tokens, **gen_kwargs)
        traces = []
        for b, (prep, prompt) in enumerate(zip(preps, prompts)):
            comp = gen.completion_ids[b][gen.completion_mask[b].bool()].tolist()
            ids = prompt.ids + comp
            hook = torch.cat(hooks[b]).float()  # [T, D]
            last = torch.cat(lasts[b])
            codes = self.codes_from_states(hook[None])[0]
            error = hook - self.sae.decode(codes)
            ref_at = [i for i in range(len(prompt.ids), len(ids)) if ids[i] == lang.ref_id]
            nz = codes.nonzero()
            text = lang.tokenizer.decode(comp, skip_special_tokens=False)
            traces.append(Trace(
                instruction=instructions[b],
                cot=_cot_of(text),
                completion=text,
                token_ids=torch.tensor(ids),
                tokens=[lang.token_text(t) for t in ids],
                roles=torch.tensor(prompt.roles + lang.completion_roles(comp)),
                prompt_length=len(prompt.ids),
                code_index=nz.cpu(),
                code_value=codes[nz[:, 0], nz[:, 1]].cpu(),
                d_sae=codes.shape[1],
                sae_error=error.cpu(),
                ref_state=last[ref_at[0] if ref_at else len(ids) - 1].float().cpu(),
                ref_found=bool(ref_at),
                image_features=feats[b].cpu(),
                valid_hw=prep.valid_hw,
                original_size=prep.original_size,
                patch_boxes=boxes[b],
            ))
        if fixes is None and temperature == 0 and (self.config.lm.repair if repair is None else repair) \
                and naming_vocab(lang) is not None:
            found = [find_fix(percept_from_states(lang, visual_states(b), boxes[b], preps[b].original_size), t.cot)
                     for b, t in enumerate(traces)]
            redo = [b for b, fix in enumerate(found) if fix is not None]
            if redo:
                if on_token is not None:
                    for b in redo:
                        on_token(b, REWRITE_MARK)
                again = self._generate_traces(
                    [preps[b] for b in redo], tokens[redo], feats[redo], [instructions[b] for b in redo],
                    None if on_token is None else (lambda i, text: on_token(redo[i], text)), max_new_tokens, 0.0,
                    None, edits, grounded, fixes=[found[b] for b in redo])
                for b, trace in zip(redo, again):
                    trace.repair = found[b].why
                    traces[b] = trace
        return traces

    @torch.no_grad()
    def decode(self, trace: Trace, edits: Sequence[ConceptEdit] = ()) -> Prediction:
        """Codebook -> slot mapper -> mask decoder on a trace (never calls the language model)."""
        codes = apply_edits(trace.dense_codes(), trace.roles, edits, trace.patch_boxes)
        device = self._device()
        heat, conf, masks = self.heads(
            codes[None].to(device), trace.roles[None].to(device), torch.zeros(1, len(trace.tokens), dtype=torch.bool,
                                                                              device=device),
            trace.ref_state[None].to(device), trace.image_features[None].to(device), [trace.valid_hw],
            trace.token_ids[None].to(device), torch.tensor([trace.prompt_length], device=device),
        )
        return self.postprocess(heat[0], conf[0], masks[0], trace.valid_hw, trace.original_size)

    def postprocess(self, heat_Khw, conf_logits_K, mask_logits_KHW, valid_hw, original_size) -> Prediction:
        """Crop the padded model-input frame to the image and resize to the original size."""
        S = self.config.vision.image_size
        conf = torch.sigmoid(conf_logits_K.float()).cpu()
        slot_logits = _to_original(mask_logits_KHW.float(), valid_hw, S, original_size)
        slot_heat = torch.sigmoid(_to_original(heat_Khw.float(), valid_hw, S, original_size))
        slot_masks = (slot_logits > 0).cpu().numpy()
        rule = self.config.mask
        kept = kept_slots(conf, rule.confidence_threshold, rule.top_slot_threshold).nonzero().flatten().tolist()
        final = slot_masks[kept].any(axis=0)  # [H, W]; all False when no slot is kept
        return Prediction(
            heatmaps=heat_Khw.detach().float().cpu(), confidences=conf, slot_masks=slot_masks, mask=final,
            slot_heatmaps=slot_heat.cpu().numpy().astype(np.float32), kept_slots=kept,
        )

    def predict(self, image, instruction: str, edits: Sequence[ConceptEdit] = ()) -> tuple[Trace, Prediction]:
        trace = self.encode(image, instruction)
        return trace, self.decode(trace, edits)

    def _device(self) -> torch.device:
        return next(self.codebook.parameters()).device

    # ---- checkpoints -----------------------------------------------------------------------
    def save_pretrained(self, folder, dtype: torch.dtype | None = None) -> None:
        from .checkpoint import save_checkpoint

        save_checkpoint(self, folder, dtype=dtype)

    @classmethod
    def from_pretrained(cls, folder, device: str = "cpu") -> "SegCompass":
        from .checkpoint import load_checkpoint

        return load_checkpoint(folder, device=device)


def _to_original(x_KHW: torch.Tensor, valid_hw, S: int, original_size) -> torch.Tensor:
    """Crop the valid (non-padded) part of a [K, H', W'] map in the S x S frame; resize to original."""
    K, Hp, Wp = x_KHW.shape
    vh, vw = max(1, round(valid_hw[0] * Hp / S)), max(1, round(valid_hw[1] * Wp / S))
    crop = x_KHW[:, :vh, :vw]
    return F.interpolate(crop[None], size=tuple(original_size), mode="bilinear", align_corners=False)[0]


def _cot_of(completion: str) -> str:
    """The reasoning between <think> and </think> (the whole completion if the tags are missing)."""
    from .tokenizer import REF_TOKEN, THINK_END, THINK_START

    text = completion
    if THINK_START in text:
        text = text.split(THINK_START, 1)[1]
    text = text.split(THINK_END, 1)[0]
    return text.replace(REF_TOKEN, "").strip()
