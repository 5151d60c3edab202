"""Full scale on tiny random-weight VLMs (Qwen2.5-VL, LLaVA) and SAM built from configs.

The models are saved to temporary folders with save_pretrained and loaded back through the
local-folder path, exactly as real 7B weights would be. No weights, no network, CPU only.
"""

import numpy as np
import pytest
import torch

from segcompass.config import CodebookConfig, LMConfig, MaskConfig, SAEConfig, SegCompassConfig, VisionConfig
from segcompass.records import ConceptEdit, TokenRole

IMAGE, FEATURE_GRID, DM = 128, 8, 32  # SAM input 128 px, patch 16 -> 8 x 8 image embeddings of width 32
TOKEN_GRID = {"qwen": 4, "llava": 8}  # Qwen: 4 * 28 = 112 px; LLaVA: CLIP 112 px / patch 14 = 8


def base_tokenizer():
    """A stand-in for a pretrained VLM's tokenizer: word-level, and none of SegCompass's tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from segcompass.tokenizer import SHAPEWORLD_WORDS

    words = sorted(set(SHAPEWORLD_WORDS) | {"user", "assistant", "system", ":", "<", ">", "|", "im_start", "im_end"})
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return save_tiny_weights(tmp_path_factory.mktemp("weights"))


def save_tiny_weights(root):
    """Save tiny Qwen2.5-VL, LLaVA and SAM models (random weights) + tokenizers to root/{qwen,llava,sam}."""
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, SamConfig, SamMaskDecoderConfig,
                              SamModel, SamPromptEncoderConfig, SamVisionConfig)

    torch.manual_seed(0)
    tok = base_tokenizer()
    image_id = len(tok)  # where "<image>" lands once SegCompass adds it

    qwen = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        # A padded embedding matrix (as the real Qwen2.5-VL's): the new tokens fit without resizing.
        text_config=dict(vocab_size=len(tok) + 8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, tie_word_embeddings=False),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=image_id, video_token_id=image_id, vision_start_token_id=image_id,
    ))
    qwen.save_pretrained(root / "qwen")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok.save_pretrained(root / "qwen")

    # LLaVA: the tokenizer lacks a chat template (LLaVA-1.5's fallback is used) and the embeddings
    # must grow for the new tokens.
    llava_tok = base_tokenizer()
    llava = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=112, patch_size=14),
        text_config=LlamaConfig(vocab_size=len(llava_tok), hidden_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
                                max_position_embeddings=512),
        image_token_index=image_id, vision_feature_layer=-2, projector_hidden_act="gelu",
    ))
    llava.save_pretrained(root / "llava")
    llava_tok.save_pretrained(root / "llava")

    sam = SamModel(SamConfig(
        vision_config=SamVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_dim=64,
                                      image_size=IMAGE, patch_size=IMAGE // FEATURE_GRID, output_channels=DM,
                                      num_pos_feats=DM // 2, global_attn_indexes=[1], window_size=4),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=DM, image_size=IMAGE,
                                                     patch_size=IMAGE // FEATURE_GRID),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=DM, num_hidden_layers=2, num_attention_heads=4,
                                                 mlp_dim=64, iou_head_hidden_dim=DM),
    ))
    sam.save_pretrained(root / "sam")
    return root


def tiny_config(kind: str, root, lora_rank: int) -> SegCompassConfig:
    return SegCompassConfig(
        preset=f"test-{kind}",
        vision=VisionConfig(kind="hf", image_size=IMAGE, token_grid=TOKEN_GRID[kind], feature_grid=FEATURE_GRID,
                            frozen=True),
        lm=LMConfig(kind="hf", path=str(root / kind), hidden_size=64, num_layers=2, num_heads=4, hook_layer=1,
                    max_new_tokens=5, lora_rank=lora_rank),
        sae=SAEConfig(kind="topk", d_sae=128, k=8),
        codebook=CodebookConfig(num_slots=4, dim=32, num_layers=1, num_heads=4, ffn_dim=64),
        mask=MaskConfig(dim=DM, heatmap_heads=4, decoder_layers=2, decoder_heads=4, decoder_mlp_dim=64,
                        sam_path=str(root / "sam")),
    )


# Qwen with LoRA (adapters + new-token rows train), LLaVA with the paper's split (layers > L train).
CASES = {"qwen": 4, "llava": 0}


@pytest.fixture(scope="module", params=sorted(CASES))
def model(request, folders):
    from segcompass.build import build_model

    torch.manual_seed(0)
    return build_model(tiny_config(request.param, folders, CASES[request.param])).eval()


def test_encode_decode_with_an_edit_and_batch_forward_agree(model, scene):
    from segcompass.concepts import top_concepts

    trace = model.encode(scene, "the red circle")
    n_visual = TOKEN_GRID[model.config.preset.split("-")[1]] ** 2
    assert int((trace.roles == TokenRole.VISUAL).sum()) == n_visual
    assert trace.image_features.shape == (DM, FEATURE_GRID, FEATURE_GRID)
    base = model.decode(trace)
    assert base.heatmaps.shape == (4, FEATURE_GRID, FEATURE_GRID) and base.mask.shape == scene.shape[:2]
    assert torch.equal(model.decode(trace, []).heatmaps, base.heatmaps)
    concept = top_concepts(model, trace, limit=1)[0].concept
    # (random tiny weights give nearly flat heatmaps, so any change counts)
    assert not torch.equal(model.decode(trace, [ConceptEdit(concept)]).heatmaps, base.heatmaps)
    # The teacher-forced batch pass (right padding, 0..T-1 positions) sees the same layer-L states
    # as generation (left padding, KV cache): visual tokens, M-RoPE positions and hook agree.
    lang = model.language
    prep = model.prepare(scene)
    batch = lang.pack([lang.build_prompt(trace.instruction, model.num_visual)],
                      [trace.token_ids[trace.prompt_length:].tolist()])
    with torch.no_grad():
        out = model(prep.pixels[None], [prep.valid_hw], batch.ids, batch.roles, batch.attention_mask,
                    batch.prompt_lengths)
    assert torch.equal(batch.ids[0], trace.token_ids)
    assert torch.allclose(out.codes[0], trace.dense_codes(), atol=1e-4)
    # Re-reasoning with no edit regenerates the same chain of thought.
    assert torch.equal(model.reason(scene, trace, []).token_ids, trace.token_ids)


def test_one_training_step_of_each_stage(model, scene):
    from segcompass.sae import sae_loss

    lang = model.language
    prep = model.prepare(scene)
    batch = lang.pack([lang.build_prompt("the red circle", model.num_visual)] * 2,
                      [lang.encode_completion("a red circle"), lang.encode_completion("red")])
    pixels = prep.pixels[None].expand(2, -1, -1, -1)
    model.train()
    try:
        with torch.enable_grad():  # another test may have left grad mode off
            out = model(pixels, [prep.valid_hw] * 2, batch.ids, batch.roles, batch.attention_mask, batch.prompt_lengths)
            # SFT / joint: LM loss on the completion + a mask loss.
            keep = (torch.arange(batch.ids.shape[1])[None] >= batch.prompt_lengths[:, None]) & (batch.attention_mask > 0)
            labels = batch.ids.masked_fill(~keep, -100)[:, 1:]
            lm_loss = torch.nn.functional.cross_entropy(out.lm_logits[:, :-1].flatten(0, 1).float(), labels.flatten())
            target = torch.zeros_like(out.mask_logits)
            seg_loss = torch.nn.functional.binary_cross_entropy_with_logits(out.mask_logits, target)
            (lm_loss + seg_loss).backward()
            # SAE stage: reconstruction of the layer-L states of real (non-padding) tokens.
            sae_loss(model.sae, out.hook_states.detach()[batch.attention_mask > 0].float())["loss"].backward()
    finally:
        model.eval()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None for n, g in grads.items() if n.startswith("vision."))
    assert grads["mask_decoder.mask_decoder.iou_token.weight"] is not None
    assert grads["codebook.W_cb.weight"].abs().sum() > 0 and grads["sae.W_enc"].abs().sum() > 0
    lm_grads = {n: g for n, g in grads.items() if n.startswith("language.lm.") and g is not None}
    if model.config.lm.lora_rank:  # LoRA + the new tokens' rows of the (untied) embeddings and LM head
        assert lm_grads and all("lora_" in n or "trainable_tokens" in n for n in lm_grads)
        assert sum("trainable_tokens_delta" in n for n in lm_grads) == 2
    else:  # layers <= L and embeddings frozen, layer L+1 onwards trains
        assert lm_grads and all("layers.1." in n or "norm" in n or "lm_head" in n for n in lm_grads)
    model.zero_grad(set_to_none=True)


def test_checkpoint_stores_no_base_weights_and_reloads_exactly(model, scene, tmp_path):
    from safetensors import safe_open

    from segcompass.model import SegCompass

    model.save_pretrained(tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    lm_keys = [k for k in keys if k.startswith("language.lm.")]
    assert not any(k.startswith("vision.") for k in keys) and lm_keys
    if model.config.lm.lora_rank:  # adapters only
        assert all("lora_" in k or "trainable_tokens_delta" in k for k in lm_keys)
    else:  # layers > L, final norm, LM head
        assert not any("embed_tokens" in k or "decoder.layers.0." in k for k in lm_keys)
    assert any(k.startswith("mask_decoder.mask_decoder.") for k in keys)
    loaded = SegCompass.from_pretrained(tmp_path / "ckpt")
    a, b = model.encode(scene, "the red circle"), loaded.encode(scene, "the red circle")
    assert torch.equal(a.token_ids, b.token_ids)
    assert torch.equal(model.decode(a).heatmaps, loaded.decode(b).heatmaps)


def test_mrope_layout_matches_qwen_get_rope_index(folders):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from segcompass.fullscale import MRopeLayout

    qwen = Qwen2_5_VLForConditionalGeneration.from_pretrained(folders / "qwen")
    s, g, T = 5, 4, 30
    types = torch.zeros(1, T, dtype=torch.int)
    types[0, s:s + g * g] = 1
    ids = torch.ones(1, T, dtype=torch.long)
    merge = qwen.config.vision_config.spatial_merge_size
    want, _ = qwen.model.get_rope_index(ids, types, image_grid_thw=torch.tensor([[1, g * merge, g * merge]]))
    got = MRopeLayout(s, g, g).positions(torch.arange(T)[None])
    assert torch.equal(got, want)


def test_sam_weights_drive_our_decoder_exactly_like_sam_model(folders):
    from transformers import SamModel

    from segcompass.fullscale import build_sam_decoder

    sam = SamModel.from_pretrained(folders / "sam").eval()
    decoder = build_sam_decoder(sam, tiny_config("qwen", folders, 0)).eval()
    torch.manual_seed(1)
    heat = torch.randn(1, 2, FEATURE_GRID, FEATURE_GRID)
    feats = torch.randn(1, DM, FEATURE_GRID, FEATURE_GRID)
    with torch.no_grad():
        ours = decoder(heat, feats, [(IMAGE, 96)])
        prompt = decoder.prompt_from_heatmap(heat, [(IMAGE, 96)])
        for k in range(2):
            ref = sam(image_embeddings=feats, input_masks=prompt[:, k:k + 1], multimask_output=False).pred_masks
            assert torch.allclose(ours[0, k], ref[0, 0, 0], atol=1e-5)


def test_bad_full_scale_configs_fail_clearly(folders):
    from segcompass.build import build_model

    with pytest.raises(ValueError, match="local weights"):
        build_model(tiny_config("qwen", folders, 0).replace(mask=MaskConfig(dim=DM)))
    cfg = tiny_config("llava", folders, 0)
    with pytest.raises(ValueError, match="token_grid must be 8"):
        build_model(cfg.replace(vision=VisionConfig(kind="hf", image_size=IMAGE, token_grid=5,
                                                    feature_grid=FEATURE_GRID)))
    with pytest.raises(ValueError, match="does not match the SAM checkpoint"):
        build_model(cfg.replace(vision=VisionConfig(kind="hf", image_size=256, token_grid=8, feature_grid=16)))


def test_fsdp2_sharded_training_step_and_encode(folders, scene):
    """FSDP2 as accelerate's fsdp.yaml applies it (decoder layers, then the root), on one CPU rank:
    the training forward/backward works through the root; encode needs `full_parameters`."""
    import socket

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from segcompass.build import build_model
    from segcompass.checkpoint import freeze_external
    from segcompass.fullscale import full_parameters

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = build_model(tiny_config("llava", folders, 0))
        freeze_external(model)
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.language.decoder_layers():
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        lang = model.language
        prep = model.prepare(scene)
        batch = lang.pack([lang.build_prompt("the red circle", model.num_visual)], [lang.encode_completion("red")])
        with torch.enable_grad():
            out = model(prep.pixels[None], [prep.valid_hw], batch.ids, batch.roles, batch.attention_mask,
                        batch.prompt_lengths)
            (out.lm_logits.float().logsumexp(-1).mean() + out.mask_logits.sigmoid().mean()).backward()
        assert model.codebook.W_cb.weight.grad is not None
        with pytest.raises(RuntimeError, match="DTensor"):
            model.encode(scene, "the red circle", max_new_tokens=2)
        with full_parameters(model):
            trace = model.encode(scene, "the red circle", max_new_tokens=2)
        assert int((trace.roles == TokenRole.VISUAL).sum()) == TOKEN_GRID["llava"] ** 2
    finally:
        dist.destroy_process_group()


def test_accelerate_config_files_parse():
    import json
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    root = Path(__file__).resolve().parent.parent / "configs" / "accelerate"
    fsdp = load_config_from_file(str(root / "fsdp.yaml"))
    assert fsdp.distributed_type == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2
    ds = load_config_from_file(str(root / "deepspeed_zero2.yaml"))
    assert ds.distributed_type == "DEEPSPEED"
    ds_json = json.loads((root / "deepspeed_zero2.json").read_text())
    assert ds_json["zero_optimization"]["stage"] == 2 and ds_json["train_micro_batch_size_per_gpu"] >= 1


def test_training_cli_runs_every_stage_on_local_weights(folders, tmp_path):
    """`python -m training sft --model CONFIG --lm-path VLM --sam-path SAM`, then sae and joint from the
    checkpoints: the same commands accelerate launches, on the tiny random Qwen2.5-VL (LoRA)."""
    import dataclasses

    from training.__main__ import main
    from training.data.shapeworld import generate_split

    data = tmp_path / "data"
    generate_split(data, "train", 4, seed=0)
    cfg = tiny_config("qwen", folders, 4)
    cfg = cfg.replace(lm=dataclasses.replace(cfg.lm, path=None), mask=dataclasses.replace(cfg.mask, sam_path=None))
    cfg.save(tmp_path / "model.json")
    runs = tmp_path / "runs"
    common = ["--preset", "smoke", "--data", str(data)]
    with pytest.raises(ValueError, match="--lm-path"):
        main(["sft", "--run", str(runs / "bad"), "--model", str(tmp_path / "model.json"), *common])
    assert main(["sft", "--run", str(runs / "sft"), "--model", str(tmp_path / "model.json"),
                 "--lm-path", str(folders / "qwen"), "--sam-path", str(folders / "sam"), *common]) == 0
    assert main(["sae", "--run", str(runs / "sae"), "--init", str(runs / "sft" / "model"), *common]) == 0
    assert main(["joint", "--run", str(runs / "joint"), "--init", str(runs / "sae" / "model"), *common,
                 "--set", "grpo_every=2", "--set", "steps=2"]) == 0
    assert "grpo reward" in (runs / "joint" / "joint.log").read_text()
    from segcompass.model import SegCompass

    sft_model = SegCompass.from_pretrained(runs / "sft" / "model")
    joint_model = SegCompass.from_pretrained(runs / "joint" / "model")
    assert joint_model.config.lm.path == str(folders / "qwen")
    assert joint_model.config.mask.sam_path == str(folders / "sam")
    before, after = dict(sft_model.named_parameters()), dict(joint_model.named_parameters())
    lora_top = [n for n in after if "lora_B" in n and ".layers.1." in n]
    assert lora_top and any(not torch.equal(before[n], after[n]) for n in lora_top)
    assert not torch.equal(before["codebook.W_cb.weight"], after["codebook.W_cb.weight"])
