"""Stage configurations: frozen dataclasses that round-trip through JSON, with named presets.

Every stage runs for `steps` optimizer steps or `minutes` of wall time, whichever ends first;
the learning-rate schedule follows progress = max(step / steps, elapsed / minutes), so a stage
given a wall-clock budget still warms up and anneals fully on a busy machine.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SFTConfig:
    preset: str = "tiny"  # model for a fresh model: a preset name (segcompass.presets) or a config.json path
    lm_path: str | None = None  # full scale: local VLM folder (sets lm.path of the model config)
    sam_path: str | None = None  # full scale: local SAM folder in SamModel format (sets mask.sam_path)
    head: str = "segcompass"  # "segcompass" | "latent_query" | "box_text"
    # with an init checkpoint of another head: give it a fresh `head` readout (training.heads) instead of refusing;
    # `sft --init CKPT --head KIND` sets it (a baseline trained on from the same model)
    swap_head: bool = False
    data: str = "data/shapeworld"
    split: str = "train"
    limit: int | None = None  # use only the first N examples
    # False: prepare the examples in RAM without the cache file. A one-shot run with RAM to spare (a GPU lease)
    # skips writing and memory-mapping ~0.24 MB per smol scene (~50 of the 69 s of loading 24,000 in session 24)
    cache_examples: bool = True
    steps: int = 3000
    minutes: float = 14.0
    batch_size: int = 16
    lr: float = 1.5e-3
    lr_adapters: float = 1.0  # scale of lr for a pretrained LM's adapters (LoRA, new token rows); smol: 0.2
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_clip: float = 1.0
    mask_loss: bool = True  # joint mask supervision (the vision encoder's mask path is only trained here)
    lm_weight: float = 1.0
    seg_weight: float = 1.0
    conf_weight: float = 0.5
    conf_target: str = "match"  # slot confidence target: "match" (Hungarian-matched slots 1, others 0) or
    # "iou" (each slot's best mask IoU with any target; training.losses)
    aux_weight: float = 0.0  # > 0: auxiliary perception loss (colour/shape/size of the object under each visual
    # token, from ShapeWorld's `objects`) on the vision encoder's tokens; a training-only linear head
    naming_weight: float = 0.0  # > 0: the same labels read from each visual token's layer-L state through the
    # LM's own norm + unembedding (training.sft.naming_loss); no extra parameters
    naming_regions: bool = False  # also name the row / column third of the object's centre (measured worse:
    # tiny test gIoU 0.513 vs 0.584; smol continuation val 0.376 vs 0.397, docs/results.md "Session 17")
    c_dice: float = 1.0
    c_focal: float = 0.0
    c_mask_bce: float = 1.0
    save_every: int = 200
    mixed_precision: str = "no"  # accelerate's: "no" | "bf16" (CPU autocast too) | "fp16" (GPU)
    prefetch: str = "auto"  # make the next batch in a thread during the step (training.prefetch): "auto" = on a GPU
    seed: int = 0


@dataclass(frozen=True)
class SAEStageConfig:
    data: str = "data/shapeworld"
    split: str = "train"
    limit: int | None = 2000  # examples whose teacher-forced activations are cached
    heldout: float = 0.1  # share of cached examples held out for EV / L0 / dead latents
    # kind / k / l1_coeff: None = the model preset's (`SAEConfig`: tiny topk k=16, smol topk k=32, full scale
    # the paper's ReLU-L1), so the stage trains the SAE the model was configured with unless told otherwise.
    kind: str | None = None  # the SAE kept: "topk" | "relu"
    compare: bool = True  # also train the other kind and report both
    k: int | None = None
    l1_coeff: float | None = None  # ReLU: MSE + l1_coeff * sum_i f_i ||W_dec,i|| on activations scaled to unit mean norm^2/D
    steps: int = 3000
    batch_size: int = 1024
    lr: float = 1e-3
    minutes: float = 1.0  # per SAE trained
    normalize: str = "global"  # activations scaled to mean squared norm D: "global" (one scale) | "dim"
    # (each dimension standardised first); either is folded into the SAE's weights afterwards
    seed: int = 0


@dataclass(frozen=True)
class JointConfig:
    data: str = "data/shapeworld"
    split: str = "train"
    limit: int | None = None
    steps: int = 2000
    minutes: float = 12.0
    batch_size: int = 16  # supervised seg batches (reference CoT, teacher-forced)
    grpo_every: int = 3  # every n-th step is a GRPO step (the others are supervised seg steps); 0 = no GRPO
    prompts: int = 4  # prompts per GRPO step
    group_size: int = 4  # G sampled completions per prompt (paper: 8)
    temperature: float = 1.0
    max_new_tokens: int = 56
    clip_eps: float = 0.2
    kl_coeff: float = 0.2
    seg_weight: float = 0.3
    conf_weight: float = 0.2
    conf_target: str = "match"  # as SFTConfig.conf_target
    c_dice: float = 2.0
    c_focal: float = 5.0
    c_mask_bce: float = 1.0
    lr: float = 2e-5  # base learning rate; the module scales below multiply it
    lr_language: float = 1.0  # the LM's trained layers (the paper's ratio for a pretrained LLM is 1)
    lr_codebook: float = 30.0
    lr_slot_mapper: float = 25.0
    lr_prompt_encoder: float = 10.0
    lr_mask_decoder: float = 5.0
    lr_baseline: float = 25.0  # a baseline's readout head (in place of codebook + slot mapper)
    warmup_steps: int = 20
    grad_clip: float = 1.0
    max_reasoning_words: int = 64
    ref_dropout: float = 0.0  # supervised seg steps: share of rows whose reference state the heads see as 0
    # (segcompass head: the slots must then carry the target via SAE concepts; keep 0 for the baselines,
    # whose only input is that state)
    ref_shuffle: float = 0.0  # supervised seg steps: share of rows given another row's reference state
    # (segcompass head: the concepts then outrank that state where they disagree, as after a concept edit)
    save_every: int = 100
    mixed_precision: str = "no"  # accelerate's: "no" | "bf16" | "fp16"
    seed: int = 0


@dataclass(frozen=True)
class RefitConfig:
    """The heads refit (training.refit): codebook, slot mapper, mask decoder and the vision mask neck on cached
    layer-L states of a frozen language model."""

    data: str = "data/shapeworld"
    split: str = "train"
    limit: int | None = 3000  # examples whose states are cached (~0.15 MB each for smol)
    steps: int = 20000
    minutes: float = 10.0
    batch_size: int = 16
    cache_batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_clip: float = 1.0
    seg_weight: float = 1.0
    conf_weight: float = 1.0
    conf_target: str = "match"  # as SFTConfig.conf_target
    c_dice: float = 1.0
    c_focal: float = 0.0
    c_mask_bce: float = 1.0
    ref_dropout: float = 0.0  # as JointConfig.ref_dropout
    # whose chain of thought the cached states are of: "reference" (the data's, teacher-forced) or "generated"
    # (the checkpoint's own greedy CoT, as eval and users feed the heads; use scenes the LM was not trained on).
    # On smol (session 18) the reference CoT won: val 0.454 vs 0.399 (docs/results.md, "Session 18")
    cot: str = "reference"
    save_every: int = 200
    mixed_precision: str = "no"  # "no" | "bf16" (autocast of the heads' steps; the cached states stay fp32-computed)
    head: str | None = None  # None: the checkpoint's; "latent_query" / "segcompass": a fresh readout of that kind on the
    # same frozen LM, vision encoder and mask decoder (training.refit.swap_head; the baselines keep ref_dropout 0)
    seed: int = 0


STAGE_CONFIGS = {"sft": SFTConfig, "sae": SAEStageConfig, "joint": JointConfig, "refit": RefitConfig}

# Named stage presets (the shipped tiny checkpoint is trained with these).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    # The smol model (SmolLM2-135M + LoRA, frozen EfficientNet-Lite0) on 2 CPU cores: bf16 autocast
    # (the LM's frozen weights stored in bf16), LoRA at 0.2 x the from-scratch parts' lr, the
    # auxiliary perception and naming losses, SAE on per-dimension standardised residuals, frequent
    # checkpoints (runs take hours; they resume).
    "smol": {
        "sft": dict(preset="smol", lr=1.5e-3, lr_adapters=0.2, batch_size=16, steps=20000, minutes=75.0,
                    warmup_steps=50, save_every=50, conf_weight=1.0, aux_weight=1.0, naming_weight=1.0,
                    mixed_precision="bf16"),
        "sae": dict(limit=1000, compare=False, minutes=2.0, normalize="dim"),
        # conf_target="iou": val +0.045 / +0.055 and test -0.011 / +0.029 on runs 6 / 7 (docs/results.md, "smol, run 7")
        "joint": dict(steps=20000, minutes=15.0, batch_size=16, prompts=4, group_size=4, grpo_every=4, lr=1e-4,
                      ref_dropout=0.5, save_every=25, mixed_precision="bf16", conf_target="iou"),
        # 1800 steps: test gIoU 0.447 -> 0.485 on run 7 (628 steps: 0.476); docs/results.md, "The heads refit"
        "refit": dict(limit=4000, steps=1800, minutes=40.0, ref_dropout=0.5, conf_target="iou", mixed_precision="bf16"),
    },
    # The smol model on one GPU (bf16): LoRA at 0.2 x the from-scratch parts' lr, larger batches,
    # the auxiliary perception loss, SAE on per-dimension standardised residuals (SmolLM2's residual
    # stream has a few huge dimensions that otherwise dominate the reconstruction and kill latents).
    "smol-gpu": {
        # batch 128: a smol SFT step dispatches ~16,200 ops at batch 8 and ~17,000 at 32 (`python -m
        # bench.step_ops`), so on a GPU it is launch-bound (H100, batch 32: 0.59 s/step) and a bigger batch
        # costs little more per step
        "sft": dict(preset="smol", lr=1.5e-3, lr_adapters=0.2, batch_size=128, steps=20000, minutes=4.0,
                    warmup_steps=50, save_every=250, conf_weight=1.0, aux_weight=1.0, naming_weight=1.0,
                    mixed_precision="bf16"),
        "sae": dict(limit=2000, compare=False, minutes=0.5, normalize="dim"),
        # ref_dropout and conf_target as the smol preset's (the shipped smol's heads were trained with them;
        # calibrate's threshold reads the IoU-target confidence)
        "joint": dict(steps=20000, minutes=2.0, batch_size=32, prompts=8, group_size=4, grpo_every=4, lr=1e-4,
                      ref_dropout=0.5, save_every=250, mixed_precision="bf16", conf_target="iou"),
        "refit": dict(limit=4000, minutes=3.0, batch_size=32, ref_dropout=0.5, conf_target="iou",
                      mixed_precision="bf16"),
    },
    "smoke": {  # seconds: tests and quick checks
        "sft": dict(steps=3, batch_size=4, minutes=5.0, save_every=2, warmup_steps=1),
        "sae": dict(limit=8, steps=20, batch_size=256, minutes=1.0),
        "joint": dict(steps=3, batch_size=4, prompts=2, group_size=2, grpo_every=2, max_new_tokens=8,
                      minutes=5.0, save_every=2, warmup_steps=1),
        "refit": dict(limit=8, steps=3, batch_size=4, cache_batch_size=4, minutes=5.0, save_every=2, warmup_steps=1),
    },
}


def stage_config(stage: str, preset: str = "tiny", overrides: dict[str, Any] | None = None):
    cls = STAGE_CONFIGS[stage]
    values = dict(PRESETS[preset].get(stage, {}))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown {stage} options: {sorted(unknown)}")
    return cls(**values)


def model_config(cfg: SFTConfig):
    """The SegCompassConfig of a fresh SFT model: preset name or config file, weight folders, head."""
    import dataclasses as dc

    from segcompass.config import SegCompassConfig
    from segcompass.presets import PRESETS, get_preset

    if cfg.preset in PRESETS:
        config = get_preset(cfg.preset)
    elif Path(cfg.preset).is_file():
        config = SegCompassConfig.load(cfg.preset)
    else:
        raise ValueError(f"model preset '{cfg.preset}' is neither a preset ({sorted(PRESETS)}) nor a config file")
    if cfg.lm_path:
        config = config.replace(lm=dc.replace(config.lm, path=str(cfg.lm_path)))
    if cfg.sam_path:
        config = config.replace(mask=dc.replace(config.mask, sam_path=str(cfg.sam_path)))
    if config.lm.kind == "hf" and not (config.lm.path and config.mask.sam_path):
        raise ValueError(f"model '{cfg.preset}' needs local weights: pass --lm-path (VLM folder) and --sam-path "
                         "(SAM folder)")
    return config.replace(head=cfg.head)


def save_config(cfg, path: str | Path) -> None:
    Path(path).write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with value parsed as JSON when possible (numbers, true/false, null)."""
    if "=" not in text:
        raise ValueError(f"expected key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw
