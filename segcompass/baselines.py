"""The two baseline heads the paper compares against, on the same backbone and mask decoder.

- `latent_query` (LISA-style, opaque): the last-layer state of the reference ([SEG]) token,
  h(<REF_POS>) [B, D], is projected to K x n sparse prompt tokens of the SAM decoder (one group
  per slot) plus K confidence logits. No SAE, no codebook: the link from words to mask is latent.
- `box_text` (textual readout): the model writes boxes as text inside its reasoning,
  `box : x0 y0 x1 y1` on a GRID x GRID lattice of the padded model-input frame; each parsed box
  (at most K) prompts the SAM decoder through its box embedding. A written box is the only
  confidence: slots with a box get +CONF_LOGIT, the others -CONF_LOGIT.

Both return what the SegCompass head returns: (heatmap logits [B, K, h, w], confidence logits
[B, K], mask logits [B, K, 4h, 4w]); their "heatmap" is the mask logits average-pooled to h x w.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

GRID = 32  # box coordinates are cells of a GRID x GRID lattice over the model-input frame
CONF_LOGIT = 10.0
BOX_WORD = "box"


def _decode_masks(decoder, sparse_BKnD: torch.Tensor | None, feats_BChw: torch.Tensor) -> torch.Tensor:
    """Run the SAM mask decoder once per slot with sparse prompts and the 'no mask' dense prompt."""
    B, C, h, w = feats_BChw.shape
    K = sparse_BKnD.shape[1]
    sparse = sparse_BKnD.reshape(B * K, 1, sparse_BKnD.shape[2], C)
    dense = decoder.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(B * K, -1, h, w)
    feats = feats_BChw.repeat_interleave(K, dim=0)
    pos = decoder.image_positional_embeddings().expand(B * K, -1, -1, -1)
    masks, _ = decoder.mask_decoder(feats, pos, sparse, dense, multimask_output=False)
    return masks.reshape(B, K, masks.shape[-2], masks.shape[-1])


def _outside_image(masks_BKHW: torch.Tensor, valid_hw, image_size: int, value: float) -> torch.Tensor:
    B, K, H, W = masks_BKHW.shape
    outside = torch.ones(B, 1, H, W, dtype=torch.bool, device=masks_BKHW.device)
    for b, (vh, vw) in enumerate(valid_hw):
        outside[b, :, : round(vh * H / image_size), : round(vw * W / image_size)] = False
    return masks_BKHW.masked_fill(outside, value)


class LatentQueryHead(nn.Module):
    """h(<REF_POS>) [B, D] -> K slots x n sparse prompt tokens [B, K, n, Dm] + confidences [B, K]."""

    def __init__(self, ref_dim: int, dim: int, num_slots: int, tokens_per_slot: int = 2):
        super().__init__()
        self.K, self.n, self.dim = num_slots, tokens_per_slot, dim
        self.norm = nn.LayerNorm(ref_dim)
        self.prompt = nn.Sequential(nn.Linear(ref_dim, ref_dim), nn.GELU(), nn.Linear(ref_dim, num_slots * tokens_per_slot * dim))
        self.confidence = nn.Sequential(nn.Linear(ref_dim, ref_dim), nn.GELU(), nn.Linear(ref_dim, num_slots))

    def forward(self, decoder, ref_BD, feats_BChw, valid_hw, **_unused):
        ref = self.norm(ref_BD.float())
        sparse = self.prompt(ref).view(-1, self.K, self.n, self.dim)
        masks = _decode_masks(decoder, sparse, feats_BChw)
        masks = _outside_image(masks, valid_hw, decoder.image_size, decoder.out_of_image_logit)
        heat = F.avg_pool2d(masks, masks.shape[-1] // feats_BChw.shape[-1])
        return heat, self.confidence(ref), masks


def box_words(mask_HW: np.ndarray, valid_hw: tuple[int, int], image_size: int) -> str:
    """`box : x0 y0 x1 y1` of a target mask given at the original size, in GRID cells of the model frame.

    >>> m = np.zeros((128, 128), bool); m[8:16, 4:12] = True
    >>> box_words(m, (128, 128), 128)
    'box : 1 2 2 3'
    """
    ys, xs = np.nonzero(mask_HW)
    if len(xs) == 0:
        return ""
    sy, sx = valid_hw[0] / mask_HW.shape[0], valid_hw[1] / mask_HW.shape[1]
    cell = image_size / GRID
    q = lambda v, s: int(min(GRID - 1, max(0, (v + 0.5) * s // cell)))  # noqa: E731
    return f"{BOX_WORD} : {q(xs.min(), sx)} {q(ys.min(), sy)} {q(xs.max(), sx)} {q(ys.max(), sy)}"


def parse_boxes(words: list[str], max_boxes: int) -> list[tuple[int, int, int, int]]:
    """Every well-formed `box : x0 y0 x1 y1` in a word sequence (first max_boxes), in GRID cells.

    >>> parse_boxes("answer : red circle box : 1 2 3 4 box : 9 x".split(), 4)
    [(1, 2, 3, 4)]
    """
    boxes = []
    for i, word in enumerate(words):
        if word != BOX_WORD or words[i + 1: i + 2] != [":"]:
            continue
        nums = words[i + 2: i + 6]
        if len(nums) == 4 and all(n.isdigit() and int(n) < GRID for n in nums):
            x0, y0, x1, y1 = map(int, nums)
            boxes.append((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
    return boxes[:max_boxes]


class BoxTextHead(nn.Module):
    """Boxes parsed from the generated text -> SAM box prompts; no learned readout of latents."""

    def __init__(self, tokenizer, num_slots: int, image_size: int):
        super().__init__()
        self.K, self.image_size = num_slots, image_size
        # the completion is decoded to text and split on spaces: a byte-level BPE (smol) writes "box : 12" as
        # 'Ġbox', 'Ġ:', 'Ġ', '1', '2', which no vocabulary lookup reads as words
        self.tokenizer = tokenizer

    def words(self, ids: list[int]) -> list[str]:
        """The words of a completion: its text split on spaces, special tokens (`</think>`, which BPE writes
        without a space before it) as separators."""
        special, words, run = set(self.tokenizer.all_special_ids), [], []
        for t in ids + [None]:
            if t is None or t in special:
                words += self.tokenizer.decode(run).split() if run else []
                run = []
            else:
                run.append(t)
        return words

    def boxes(self, ids_BT: torch.Tensor, prompt_lengths_B: torch.Tensor, attention_mask_BT=None):
        """Pixel boxes [B, K, 4] (model-input frame) and which slots have one [B, K] bool."""
        B = ids_BT.shape[0]
        cell = self.image_size / GRID
        boxes = torch.zeros(B, self.K, 4)
        has = torch.zeros(B, self.K, dtype=torch.bool)
        for b in range(B):
            ids = ids_BT[b, int(prompt_lengths_B[b]):]
            if attention_mask_BT is not None:
                ids = ids[attention_mask_BT[b, int(prompt_lengths_B[b]):].bool()]
            words = self.words(ids.tolist())
            for k, (x0, y0, x1, y1) in enumerate(parse_boxes(words, self.K)):
                boxes[b, k] = torch.tensor([x0 * cell, y0 * cell, (x1 + 1) * cell, (y1 + 1) * cell])
                has[b, k] = True
        return boxes, has

    def forward(self, decoder, ref_BD, feats_BChw, valid_hw, ids_BT=None, prompt_lengths_B=None,
                attention_mask_BT=None, **_unused):
        if ids_BT is None:
            raise ValueError("the box_text head needs the token ids")
        boxes, has = self.boxes(ids_BT.cpu(), prompt_lengths_B.cpu(), None if attention_mask_BT is None
                                else attention_mask_BT.cpu())
        device = feats_BChw.device
        B = feats_BChw.shape[0]
        emb = decoder.prompt_encoder._embed_boxes(boxes.to(device).reshape(B * self.K, 1, 4))  # [BK, 1, 2, Dm]
        masks = _decode_masks(decoder, emb.reshape(B, self.K, 2, -1), feats_BChw)
        masks = _outside_image(masks, valid_hw, decoder.image_size, decoder.out_of_image_logit)
        heat = F.avg_pool2d(masks, masks.shape[-1] // feats_BChw.shape[-1])
        conf = torch.where(has.to(device), CONF_LOGIT, -CONF_LOGIT).to(masks.dtype)
        return heat, conf, masks


def build_head(config, tokenizer, ref_dim: int) -> nn.Module | None:
    """The baseline head named by config.head (None for SegCompass's own head)."""
    if config.head == "segcompass":
        return None
    if config.head == "latent_query":
        return LatentQueryHead(ref_dim, config.mask.dim, config.codebook.num_slots)
    if config.head == "box_text":
        return BoxTextHead(tokenizer, config.codebook.num_slots, config.vision.image_size)
    raise ValueError(f"unknown head '{config.head}'; known: segcompass, latent_query, box_text")
