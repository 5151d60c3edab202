"""Swap a checkpoint's readout head for a fresh one of another kind, on the same language model,
vision encoder and mask decoder: the baselines of a readout comparison start from one trained model.

- refit (frozen LM): "segcompass" (new codebook and slot mapper) or "latent_query" (a new LISA-style head);
- SFT (`sft --init CKPT --head KIND`): any of the three, "box_text" included, since SFT trains the language
  model that has to learn to write the boxes.

The unused codebook and slot mapper of a baseline stay in the model, frozen (training.parts).
"""

from __future__ import annotations


def swap_head(model, head: str):
    """Give `model` a fresh readout head of kind `head` (in place; returns the model)."""
    from segcompass.baselines import build_head
    from segcompass.codebook import QueryCodebook
    from segcompass.slot_mapper import SlotMapper

    config = model.config.replace(head=head)
    width, device = model.language.lm.config.hidden_size, model._device()
    baseline = build_head(config, model.tokenizer, width)
    model.baseline = None if baseline is None else baseline.to(device)
    if head == "segcompass":
        model.codebook = QueryCodebook(config.sae.d_sae, config.codebook).to(device)
        model.slot_mapper = SlotMapper(config.codebook.dim, width, config.mask.dim, config.mask.heatmap_heads).to(device)
    model.config = config
    return model
