"""Training stages on tiny data: every trainable parameter changes, every frozen one does not;
resuming continues from the saved step; the eval command scores a generated folder."""

import json

import pytest
import torch

from segcompass.model import SegCompass
from training.configs import stage_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from training.data.shapeworld import generate_split

    root = tmp_path_factory.mktemp("shapeworld")
    generate_split(root, "train", 6, seed=0)
    generate_split(root, "test", 3, seed=0)
    return root


def tiny_model_and_examples(data):
    """The train examples of `data` (uncached, tiny preset) and a tiny model seeded 0 on their words."""
    from segcompass.build import build_model
    from segcompass.presets import get_preset
    from segcompass.tokenizer import build_word_tokenizer
    from training.examples import corpus, load_examples

    config = get_preset("tiny")
    examples = load_examples(data, "train", config, cache=False)
    torch.manual_seed(0)
    return examples, build_model(config, build_word_tokenizer(corpus(examples)))


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_trained_exactly(before, model, trainable):
    after = dict(model.named_parameters())
    assert trainable, "nothing was trained"
    for name, old in before.items():
        changed = not torch.equal(old, after[name].detach())
        if name in trainable:
            assert changed, f"trainable parameter {name} did not change"
        else:
            assert not changed, f"frozen parameter {name} changed"


def sft(data, run, head="segcompass", **kw):
    from segcompass.build import build_model
    from segcompass.presets import get_preset
    from segcompass.tokenizer import build_word_tokenizer
    from training.examples import corpus, load_examples
    from training.sft import run_sft

    cfg = stage_config("sft", "smoke", dict(data=str(data), head=head, **kw))
    examples = load_examples(cfg.data, "train", get_preset("tiny"), cache=False)
    torch.manual_seed(0)
    model = build_model(get_preset("tiny").replace(head=head), build_word_tokenizer(corpus(examples)))
    before = snapshot(model)
    run_sft(cfg, run, resume=False, examples=examples, model=model)
    return before, model


@pytest.fixture(scope="module")
def sft_run(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "sft"
    before, model = sft(data, run)
    return run, before, model


def test_sft_trains_everything_but_the_sae(sft_run):
    run, before, model = sft_run
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith("sae.") for n in trainable)
    for part in ("vision.stem", "language.lm.model.layers.0", "language.projector", "codebook.W_cb", "slot_mapper",
                 "mask_decoder.mask_decoder", "mask_decoder.prompt_encoder.mask_embed"):
        assert any(n.startswith(part) for n in trainable), part
    assert_trained_exactly(before, model, trainable)
    saved = SegCompass.from_pretrained(run / "model")
    assert torch.equal(saved.codebook.W_cb.weight, model.codebook.W_cb.weight.detach())
    assert torch.load(run / "trainer_state.pt", weights_only=True)["step"] == 3


def test_sft_resumes_from_the_saved_step(data, sft_run, tmp_path):
    from training.sft import run_sft

    run, _, _ = sft_run
    import shutil

    shutil.copytree(run, tmp_path / "sft")
    cfg = stage_config("sft", "smoke", dict(data=str(data), steps=5))
    run_sft(cfg, tmp_path / "sft")
    assert torch.load(tmp_path / "sft" / "trainer_state.pt", weights_only=True)["step"] == 5
    assert "resuming SFT from step 3" in (tmp_path / "sft" / "sft.log").read_text()


def test_sft_with_prefetched_batches_trains_the_same_weights(data, sft_run, tmp_path):
    """`prefetch=on` (the default on a GPU: the next batch made in a thread during the step) changes when batches
    are made, not what is trained: the same weights as the in-place run of the `sft_run` fixture."""
    _, _, reference = sft_run
    _, model = sft(data, tmp_path / "sft", prefetch="on")
    for (name, a), (_, b) in zip(sorted(reference.state_dict().items()), sorted(model.state_dict().items())):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="prefetch"):
        sft(data, tmp_path / "bad", prefetch="sometimes")


def test_bf16_falls_back_to_fp32_on_a_cpu_without_native_bf16(data, sft_run, tmp_path, monkeypatch):
    """Every smol stage preset asks for bf16, which an AVX2-only CPU emulates ~70x slower than fp32: on such a
    CPU a stage runs in fp32, says so in its log and records what it ran with; a GPU or a bf16 CPU keep it."""
    import json
    import shutil

    import training.parts as parts
    from training.sft import run_sft

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(parts, "cpu_has_fast_bf16", lambda: True)
    assert parts.resolve_mixed_precision("bf16", cpu) == "bf16"
    monkeypatch.setattr(parts, "cpu_has_fast_bf16", lambda: False)
    assert parts.resolve_mixed_precision("bf16", cpu) == "no"
    assert parts.resolve_mixed_precision("bf16", gpu) == "bf16" and parts.resolve_mixed_precision("no", cpu) == "no"
    run, _, _ = sft_run
    shutil.copytree(run, tmp_path / "sft")
    run_sft(stage_config("sft", "smoke", dict(data=str(data), steps=4, mixed_precision="bf16")), tmp_path / "sft")
    assert json.loads((tmp_path / "sft" / "sft_config.json").read_text())["mixed_precision"] == "no"
    assert "mixed_precision bf16 -> no" in (tmp_path / "sft" / "sft.log").read_text()


def test_sft_without_the_example_cache_writes_no_cache_file(data, sft_run, tmp_path, monkeypatch):
    """cache_examples=false (what scripts/offline_gpu/sft.sh sets): the examples are prepared in RAM, the stage trains,
    and nothing lands in the example cache; the default writes the cache file."""
    import shutil

    from training import examples as ex
    from training.configs import stage_config
    from training.sft import run_sft

    cache = tmp_path / "cache"
    monkeypatch.setattr(ex, "CACHE_DIR", cache)
    run, _, _ = sft_run
    shutil.copytree(run, tmp_path / "sft")
    run_sft(stage_config("sft", "smoke", dict(data=str(data), steps=4, cache_examples=False)), tmp_path / "sft")
    assert json.loads((tmp_path / "sft" / "sft_config.json").read_text())["cache_examples"] is False
    assert "sft done: 4 steps" in (tmp_path / "sft" / "sft.log").read_text()
    assert not cache.exists()
    ex.load_examples(str(data), "train", sft_run[2].config)
    assert len(list(cache.glob("*.pt"))) == 1


def test_sft_init_trains_a_checkpoint_further_and_checks_the_head(data, sft_run, tmp_path):
    """`sft --init CKPT`: the checkpoint's weights and tokenizer, a fresh schedule; a head mismatch is refused."""
    from training.__main__ import main

    run, _, _ = sft_run
    start = SegCompass.from_pretrained(run / "model")
    base = ["sft", "--preset", "smoke", "--data", str(data), "--init", str(run / "model")]
    assert main(base + ["--run", str(tmp_path / "more"), "--set", "steps=2"]) == 0
    more = SegCompass.from_pretrained(tmp_path / "more" / "model")
    assert torch.load(tmp_path / "more" / "trainer_state.pt", weights_only=True)["step"] == 2
    assert more.tokenizer.get_vocab() == start.tokenizer.get_vocab()
    assert not torch.equal(more.codebook.W_cb.weight, start.codebook.W_cb.weight)
    assert torch.equal(more.sae.W_enc, start.sae.W_enc)  # SFT never trains the SAE
    assert "SFT from the weights of" in (tmp_path / "more" / "sft.log").read_text()
    # an explicit --head swaps in a fresh readout of that kind (a baseline trained on from the same model) ...
    assert main(base + ["--run", str(tmp_path / "box"), "--set", "steps=2", "--head", "box_text"]) == 0
    box = SegCompass.from_pretrained(tmp_path / "box" / "model")
    assert box.config.head == "box_text" and type(box.baseline).__name__ == "BoxTextHead"
    assert torch.equal(box.codebook.W_cb.weight, start.codebook.W_cb.weight)  # unused by the baseline: frozen
    assert not torch.equal(box.language.lm.get_input_embeddings().weight,  # the language model learns to write boxes
                           start.language.lm.get_input_embeddings().weight)
    assert "head swapped" in (tmp_path / "box" / "sft.log").read_text()
    # ... while a checkpoint of another head, without --head, is refused rather than silently re-headed
    with pytest.raises(ValueError, match="pass --head box_text"):
        main(["sft", "--preset", "smoke", "--data", str(data), "--init", str(tmp_path / "box" / "model"),
              "--run", str(tmp_path / "bad")])


@pytest.fixture(scope="module")
def sae_run(data, sft_run):
    from training.sae_stage import run_sae

    run, _, _ = sft_run
    out = run.parent / "sae"
    run_sae(stage_config("sae", "smoke", dict(data=str(data))), run / "model", out, resume=False)
    return out


def test_sae_stage_trains_only_the_sae_and_reports(sft_run, sae_run):
    run, _, _ = sft_run
    before = SegCompass.from_pretrained(run / "model")
    after = SegCompass.from_pretrained(sae_run / "model")
    trainable = {n for n, _ in after.named_parameters() if n.startswith("sae.")}
    assert_trained_exactly(snapshot(before), after, trainable)
    report = json.loads((sae_run / "sae_report.json").read_text())
    assert set(report["runs"]) == {"topk", "relu"}
    for stats in report["runs"].values():
        assert {"explained_variance", "l0", "dead_fraction"} <= set(stats)
    assert report["runs"]["topk"]["l0"] <= 16.0


def test_joint_stage_trains_the_right_parts(data, sae_run):
    from training.joint import run_joint

    init = sae_run / "model"
    before = snapshot(SegCompass.from_pretrained(init))
    cfg = stage_config("joint", "smoke", dict(data=str(data), steps=2, grpo_every=2))
    out = run_joint(cfg, init, sae_run.parent / "joint", resume=False)
    model = SegCompass.from_pretrained(out)
    log = (sae_run.parent / "joint" / "joint.log").read_text()
    assert "grpo reward" in log  # a GRPO step on the policy's own rollouts ran
    L = model.config.lm.hook_layer
    trainable = set()
    for name, _ in model.named_parameters():
        top = name.startswith(tuple(f"language.lm.model.layers.{i}." for i in range(L, model.config.lm.num_layers)))
        if top or name.startswith(("codebook.", "slot_mapper.", "language.lm.lm_head", "language.lm.model.norm",
                                   "mask_decoder.")):
            trainable.add(name)
    # never reached with heatmap prompts and single-mask output: SAM's point/box/no-mask embeddings, IoU head
    unused = ("iou_prediction_head", "point_embed", "not_a_point_embed", "no_mask_embed",
              *(f"output_hypernetworks_mlps.{i}." for i in range(1, 8)))
    trainable -= {n for n in trainable if any(u in n for u in unused)}
    assert_trained_exactly(before, model, trainable)


@pytest.mark.parametrize("head", ["latent_query", "box_text"])
def test_baselines_train_through_sft_and_joint(data, tmp_path, head):
    from training.joint import run_joint

    before, model = sft(data, tmp_path / "sft", head=head)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.startswith(("codebook.", "slot_mapper.", "sae.")) for n in trainable)
    if head == "latent_query":
        assert any(n.startswith("baseline.prompt") for n in trainable)
    assert_trained_exactly(before, model, trainable)
    cfg = stage_config("joint", "smoke", dict(data=str(data), steps=2, grpo_every=2))
    out = run_joint(cfg, tmp_path / "sft" / "model", tmp_path / "joint", resume=False)
    loaded = SegCompass.from_pretrained(out)
    assert loaded.config.head == head


def test_box_text_reads_the_boxes_it_writes(data):
    from segcompass.build import build_model
    from segcompass.presets import get_preset
    from segcompass.tokenizer import build_word_tokenizer
    from training.examples import completion_cot, corpus, load_examples

    examples = load_examples(str(data), "train", get_preset("tiny"), cache=False)
    model = build_model(get_preset("tiny").replace(head="box_text"), build_word_tokenizer(corpus(examples)))
    lang = model.language
    ex = next(e for e in examples if e.boxes)
    packed = lang.pack([lang.build_prompt(ex.instruction, model.num_visual)],
                       [lang.encode_completion(completion_cot(ex, "box_text"))])
    boxes, has = model.baseline.boxes(packed.ids, packed.prompt_lengths)
    assert int(has.sum()) == ex.target_mask.shape[0] or int(has.sum()) == model.config.codebook.num_slots
    cell = model.config.vision.image_size / 32
    x0, y0, x1, y1 = boxes[0, 0].tolist()
    # the target's mass lies inside its box (mask-logit grid is 4 pixels per cell at this size)
    ys, xs = torch.nonzero(ex.target_mask[0] > 0.5, as_tuple=True)
    scale = model.config.vision.image_size / ex.target_mask.shape[-1]
    assert x0 - cell <= float(xs.min()) * scale and float(xs.max() + 1) * scale <= x1 + cell
    assert y0 - cell <= float(ys.min()) * scale and float(ys.max() + 1) * scale <= y1 + cell


def test_eval_command_scores_a_generated_folder(data, sft_run, tmp_path, capsys):
    from training.__main__ import main

    run, _, _ = sft_run
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run / "model"), "--data", str(data), "--split", "test",
                 "--out", str(out), "--save-masks", str(tmp_path / "masks")]) == 0
    result = json.loads(out.read_text())
    assert result["count"] == 3 and 0.0 <= result["gIoU"] <= 1.0 and 0.0 <= result["cIoU"] <= 1.0
    assert {"N-acc", "T-acc", "per_family_gIoU"} <= set(result)
    assert len(list((tmp_path / "masks").glob("*.png"))) == 3
    assert json.loads(capsys.readouterr().out)["count"] == 3
    # DIR may also be the split folder itself
    assert main(["eval", "--checkpoint", str(run / "model"), "--data", str(data / "test"), "--limit", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 2
    # a slice of the split, with grounded regions (recorded in the result)
    assert main(["eval", "--checkpoint", str(run / "model"), "--data", str(data / "test"), "--offset", "2",
                 "--ground-regions"]) == 0
    sliced = json.loads(capsys.readouterr().out)
    assert sliced["count"] == 1 and sliced["offset"] == 2 and sliced["ground_regions"] is True
    # repair on, and one JSON line per example for paired comparisons (bench.paired)
    rows = tmp_path / "rows.jsonl"
    assert main(["eval", "--checkpoint", str(run / "model"), "--data", str(data / "test"), "--repair",
                 "--no-ground-regions", "--rows", str(rows)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["repair"] is True and result["ground_regions"] is False
    lines = [json.loads(line) for line in rows.read_text().splitlines()]
    assert len(lines) == result["count"] == 3
    assert {"name", "family", "iou", "cot", "repair"} <= set(lines[0])
    assert abs(sum(r["iou"] for r in lines) / 3 - result["gIoU"]) < 1e-9


def test_calibrate_picks_a_threshold_on_a_held_out_split_and_writes_it(data, sft_run, tmp_path, capsys):
    from training.__main__ import main

    run, _, _ = sft_run
    assert main(["calibrate", "--checkpoint", str(run / "model"), "--data", str(data), "--split", "test",
                 "--out-checkpoint", str(tmp_path / "final"), "--top-slot"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.0 < result["threshold"] < 1.0 and len(result["sweep_gIoU"]) >= 10
    top = result["top_slot_threshold"]
    assert top == 1.0 or top < result["threshold"]
    # the chosen pair scores at least as well as the best single threshold (the rule it extends)
    assert result["gIoU"] >= max(result["sweep_gIoU"].values())
    assert result["best_gIoU_by_top_slot_threshold"]["1.0"] == max(result["sweep_gIoU"].values())
    calibrated = SegCompass.from_pretrained(tmp_path / "final")
    assert calibrated.config.mask.confidence_threshold == result["threshold"]
    assert calibrated.config.mask.top_slot_threshold == top

    from safetensors.torch import load_file

    assert main(["calibrate", "--checkpoint", str(run / "model"), "--data", str(data), "--split", "test",
                 "--out-checkpoint", str(tmp_path / "half"), "--dtype", "fp16"]) == 0
    stored = load_file(str(tmp_path / "half" / "model.safetensors"))
    floats = [v for v in stored.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    half = SegCompass.from_pretrained(tmp_path / "half")
    assert json.loads(capsys.readouterr().out)["top_slot_threshold"] == 1.0  # off without --top-slot
    for (name, a), b in zip(calibrated.state_dict().items(), half.state_dict().values()):
        assert b.dtype == a.dtype and torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-3), name


@pytest.mark.parametrize("normalize", ["global", "dim"])
@pytest.mark.parametrize("kind", ["topk", "relu"])
def test_sae_normalisation_folds_back_exactly(normalize, kind):
    """An SAE trained on normalised activations, folded, gives the same codes from raw activations
    and reconstructions in raw units (a residual stream with one huge dimension, as SmolLM2's)."""
    from segcompass.sae import SparseAutoencoder
    from training.sae_stage import fold_affine, normalisation

    torch.manual_seed(0)
    x = torch.randn(400, 24, dtype=torch.float64) * torch.rand(24, dtype=torch.float64) * 3 + 2
    x[:, 5] *= 100
    shift, scale = normalisation(x, normalize)
    u = (x - shift) * scale
    assert abs(float(u.pow(2).sum(-1).mean()) - 24) < 1e-6
    if normalize == "dim":
        assert torch.allclose(u.std(0) / u.std(0).mean(), torch.ones(24, dtype=torch.float64), atol=1e-6)
    sae = SparseAutoencoder(24, 64, kind, k=4).double()
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    z_u, u_hat = sae(u)
    z_x, x_hat = fold_affine(sae, scale, shift)(x)
    assert torch.allclose(z_u, z_x, atol=1e-9)
    assert torch.allclose(u_hat / scale + shift, x_hat, atol=1e-9)


def test_sft_gives_pretrained_adapters_their_own_learning_rate():
    from segcompass.build import build_model
    from segcompass.presets import get_preset
    from segcompass.tokenizer import build_word_tokenizer
    from training.parts import param_groups, set_trainable

    model = build_model(get_preset("tiny"), build_word_tokenizer(["a b"]))
    set_trainable(model, "sft")
    cfg = stage_config("sft", "smol-gpu")
    groups = param_groups(model, "sft", cfg.lr, cfg)
    assert [g["name"] for g in groups] == ["all"]  # a from-scratch LM has no adapters
    # A parameter named like a LoRA matrix lands in the adapter group at lr_adapters x lr.
    model.register_parameter("lora_A_probe", torch.nn.Parameter(torch.zeros(2)))
    groups = {g["name"]: g for g in param_groups(model, "sft", cfg.lr, cfg)}
    assert groups["adapters"]["lr"] == pytest.approx(cfg.lr * cfg.lr_adapters)
    assert [p.shape for p in groups["adapters"]["params"]] == [torch.Size([2])]
    assert groups["all"]["lr"] == cfg.lr


def test_examples_prepared_in_parallel_equal_sequential(data):
    from segcompass.presets import get_preset
    from training.data.loaders import load_reasonseg
    from training.examples import _prepare_all, prepare_example

    config = get_preset("tiny")
    samples = load_reasonseg(data, "train")
    parallel = _prepare_all(samples, config, "prepare", min_parallel=1)
    for a, s in zip(parallel, samples):
        b = prepare_example(s, config)
        for key, value in a.__dict__.items():
            other = getattr(b, key)
            if isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype and torch.equal(value, other), key
            else:
                assert value == other, key


def test_cached_examples_load_memory_mapped_and_equal_fresh_ones(data, tmp_path, monkeypatch):
    import training.examples as ex
    from segcompass.presets import get_preset

    monkeypatch.setattr(ex, "CACHE_DIR", tmp_path)
    config = get_preset("tiny")
    fresh = ex.load_examples(data, "train", config, cache=False)
    first = ex.load_examples(data, "train", config)  # prepares, saves, reloads from the file
    again = ex.load_examples(data, "train", config)
    assert len(list(tmp_path.glob("*.pt"))) == 1 and not list(tmp_path.glob("*.tmp"))
    for a, b, c in zip(fresh, first, again):
        for key, value in a.__dict__.items():
            for other in (getattr(b, key), getattr(c, key)):
                if isinstance(value, torch.Tensor):
                    assert value.dtype == other.dtype and torch.equal(value, other), key
                else:
                    assert value == other, key


def test_naming_loss_reads_visual_tokens_through_the_lm_unembedding(data):
    """The naming loss is the logit lens of layer L at the visual tokens, restricted to the attribute
    words: it reaches the layers up to L, the projector and the vision trunk, not the layers above L."""
    from segcompass.build import build_model
    from segcompass.presets import get_preset
    from segcompass.tokenizer import build_word_tokenizer
    from training.examples import COLOURS, COLUMNS, ROWS, SHAPES, SIZES, collate, corpus, load_examples
    from training.sft import naming_loss, naming_vocab, teacher_forced

    config = get_preset("tiny")
    examples = load_examples(data, "train", config, cache=False)
    torch.manual_seed(0)
    words = " ".join(COLOURS + SHAPES + SIZES + ROWS + COLUMNS)  # 6 scenes may lack some
    model = build_model(config, build_word_tokenizer(corpus(examples) + [words]))
    lang = model.language
    ids = lang.first_token_ids(SHAPES)
    assert ids is not None and len(set(ids)) == len(SHAPES)
    states = torch.randn(2, 3, config.lm.hidden_size)
    full = lang.lm.get_output_embeddings()(lang.lm.get_decoder().norm(states))
    assert torch.allclose(lang.word_logits(states, ids), full[..., ids], atol=1e-6)
    assert lang.first_token_ids(["not-a-known-word-xyz"]) is None
    assert lang.first_token_ids(["red", "red"]) is None  # two words, one first token: ambiguous

    batch = collate(examples[:4])
    for e in examples:  # colour, shape, size, row, column of each labelled token's object
        named = e.token_labels[e.token_labels[:, 0] >= 0]
        assert e.token_labels.shape[1] == 5 and len(named) and (named >= 0).all()
        assert (named.max(0).values < torch.tensor([len(COLOURS), len(SHAPES), len(SIZES), 3, 3])).all()
    out, packed = teacher_forced(model, batch, torch.device("cpu"), "segcompass")
    loss = naming_loss(model, out.hook_states, packed.ids, batch, naming_vocab(lang))
    assert loss is not None and torch.isfinite(loss) and loss > 0
    with_regions = naming_loss(model, out.hook_states, packed.ids, batch, naming_vocab(lang, regions=True))
    assert with_regions is not None and not torch.isclose(with_regions, loss)
    model.zero_grad()
    loss.backward()
    L = config.lm.hook_layer
    for name, p in model.named_parameters():
        touched = p.grad is not None and bool(p.grad.abs().sum() > 0)
        if name.startswith(("vision.stem", "language.projector")) or any(
                name.startswith(f"language.lm.model.layers.{i}.") for i in range(L)):
            assert touched, name
        if any(name.startswith(f"language.lm.model.layers.{i}.") for i in range(L, config.lm.num_layers)):
            assert not touched, name
    # Without ShapeWorld objects there is nothing to name.
    no_labels = collate([e.__class__(**{**e.__dict__, "token_labels": None}) for e in examples[:2]])
    out, packed = teacher_forced(model, no_labels, torch.device("cpu"), "segcompass")
    assert naming_loss(model, out.hook_states, packed.ids, no_labels, naming_vocab(lang)) is None


def test_completion_logits_only_give_the_same_loss_and_heads(data):
    """Training computes LM logits only from the last prompt position on: the completion loss, the
    hook states and the mask path equal those of the full pass."""
    from training.examples import collate
    from training.sft import completion_ce, teacher_forced

    examples, model = tiny_model_and_examples(data)
    model.eval()
    batch = collate(examples[:4])
    cpu = torch.device("cpu")
    with torch.no_grad():
        full, packed = teacher_forced(model, batch, cpu, "segcompass", logits="all")
        kept, _ = teacher_forced(model, batch, cpu, "segcompass", logits="completion")
        last, _ = teacher_forced(model, batch, cpu, "segcompass", logits="none")
    T = packed.ids.shape[1]
    assert full.lm_logits.shape[1] == T and kept.lm_logits.shape[1] == T - int(packed.prompt_lengths.min()) + 1
    assert last.lm_logits.shape[1] == 1
    assert torch.allclose(kept.lm_logits, full.lm_logits[:, -kept.lm_logits.shape[1]:], atol=1e-5)
    assert torch.allclose(completion_ce(kept.lm_logits, packed, cpu), completion_ce(full.lm_logits, packed, cpu),
                          atol=1e-5)
    for a, b in ((full.mask_logits, last.mask_logits), (full.hook_states, kept.hook_states)):
        assert torch.allclose(a, b, atol=1e-5)


def test_batches_convert_pixels_on_the_device_and_prompts_reuse_the_template(data):
    """A batch keeps its images uint8 until `pixels_on` (the conversion then runs on the model's device, not the
    host), giving the floats the host made before; teacher forcing from the batch alone equals teacher forcing
    from the vision encoder's output on those floats; the cached prompt layout gives the ids and roles of
    rendering and tokenising the template afresh, per number of visual tokens."""
    from segcompass.records import TokenRole
    from training.examples import collate, stack_pixels
    from training.sft import teacher_forced

    examples, model = tiny_model_and_examples(data)
    model.eval()
    batch = collate(examples[:3])
    cpu = torch.device("cpu")
    assert batch.pixels_uint8.dtype == torch.uint8
    assert torch.equal(batch.pixels_on(cpu), stack_pixels(examples[:3])) and torch.equal(batch.pixels, batch.pixels_on(cpu))
    assert 0.0 <= float(batch.pixels.min()) and float(batch.pixels.max()) <= 1.0
    with torch.no_grad():
        own, _ = teacher_forced(model, batch, cpu, "segcompass")
        given, _ = teacher_forced(model, batch, cpu, "segcompass", vision_out=model.vision(stack_pixels(examples[:3])))
    assert torch.equal(own.mask_logits, given.mask_logits) and torch.equal(own.lm_logits, given.lm_logits)

    lang = model.language
    for n_visual in (model.num_visual, 4, model.num_visual):
        prefix, suffix = lang._template_parts(n_visual)
        pre, ins, suf = (lang.tokenizer(t, add_special_tokens=False).input_ids
                         for t in (prefix, examples[0].instruction, suffix))
        prompt = lang.build_prompt(examples[0].instruction, n_visual)
        assert prompt.ids == pre + ins + suf
        assert prompt.roles.count(int(TokenRole.VISUAL)) == n_visual
        assert prompt.roles.count(int(TokenRole.INSTRUCTION)) == len(ins)
    first = lang.build_prompt("the red circle", 4)
    first.ids.append(-1)  # callers own the lists they get: the cached layout is not shared
    assert lang.build_prompt("the red circle", 4).ids == first.ids[:-1]


def test_prefetched_sft_batches_equal_the_batches_made_in_place(data):
    from training.common import Batches
    from training.examples import collate, pack_reference, packed_reference
    from training.prefetch import Prefetcher

    examples, model = tiny_model_and_examples(data)
    batches = Batches(len(examples), 3, seed=0)

    def make_batch(step):
        batch = collate([examples[i] for i in batches.at(step)])
        packed_reference(model, batch, "segcompass")
        return batch

    with Prefetcher(make_batch) as get:
        for step in range(4):
            got = get(step)
            chosen = [examples[i] for i in batches.at(step)]
            direct = pack_reference(model, chosen, "segcompass")
            assert [e.name for e in got.examples] == [e.name for e in chosen]
            assert torch.equal(got.pixels_uint8, collate(chosen).pixels_uint8)
            assert torch.equal(packed_reference(model, got, "segcompass").ids, direct.ids)
            assert torch.equal(got.packed["segcompass"].roles, direct.roles)


def test_grow_tensor_pads_input_channels_only():
    from training.grow import grow_tensor, parse_changes

    w = torch.randn(4, 3, 1, 1)
    g = grow_tensor(w, torch.Size([4, 5, 1, 1]))
    assert torch.equal(g[:, :3], w) and not g[:, 3:].any()
    with pytest.raises(ValueError, match="only dim 1"):
        grow_tensor(w, torch.Size([5, 3, 1, 1]))
    with pytest.raises(ValueError, match="only dim 1"):
        grow_tensor(w, torch.Size([4, 2, 1, 1]))
    assert parse_changes(["vision.mask_pixels=true"]) == {"vision": {"mask_pixels": True}}
    with pytest.raises(ValueError, match="SECTION.FIELD"):
        parse_changes(["mask_pixels=true"])


def test_refit_trains_only_the_heads_and_the_mask_neck(data, sae_run, tmp_path):
    from training.refit import run_refit

    init = sae_run / "model"
    before = snapshot(SegCompass.from_pretrained(init))
    out = run_refit(stage_config("refit", "smoke", dict(data=str(data), limit=6)), init, tmp_path / "refit",
                    resume=False)
    model = SegCompass.from_pretrained(out)
    # never reached (no gradient): SAM's point/box/no-mask embeddings, IoU head; the other masks' hypernetworks
    # get zero gradients and move by weight decay (AdamW), unlike the joint stage (no weight decay)
    unused = ("iou_prediction_head", "point_embed", "not_a_point_embed", "no_mask_embed")
    trainable = {n for n, _ in model.named_parameters()
                 if n.startswith(("codebook.", "slot_mapper.", "mask_decoder.", "vision.neck."))
                 and not any(u in n for u in unused)}
    assert_trained_exactly(before, model, trainable)
    assert "refit done: 3 steps" in (tmp_path / "refit" / "refit.log").read_text()
    # a second refit in the same folder reads the cached states instead of running the language model again
    run_refit(stage_config("refit", "smoke", dict(data=str(data), limit=6, mixed_precision="bf16")), init,
              tmp_path / "refit", resume=False)
    assert "states of 6 examples loaded" in (tmp_path / "refit" / "refit.log").read_text()
    (tmp_path / "refit" / "states.pt").write_bytes(b"not a torch file")  # a corrupt cache is rebuilt, not fatal
    run_refit(stage_config("refit", "smoke", dict(data=str(data), limit=6)), init, tmp_path / "refit", resume=False)
    assert "is unreadable" in (tmp_path / "refit" / "refit.log").read_text()
    with pytest.raises(ValueError, match="ref_dropout=0"):
        run_refit(stage_config("refit", "smoke", dict(data=str(data), limit=6, head="latent_query", ref_dropout=0.5)),
                  init, tmp_path / "lq", resume=False)


def test_refit_cache_holds_the_training_forward_states(data, sae_run):
    from training.examples import collate, load_examples
    from training.refit import cache_states, stack_states
    from training.sft import teacher_forced

    model = SegCompass.from_pretrained(sae_run / "model").eval()
    examples = load_examples(str(data), "train", model.config, limit=5, cache=False)
    states = cache_states(model, examples, batch_size=2)  # other padding than the batch of 5 below
    with torch.no_grad():
        out, packed = teacher_forced(model, collate(examples), model._device(), "segcompass", logits="none")
    hook, ids, roles, pad, ref, lengths = stack_states(states, model.language.pad_id, 0, "cpu")
    real = packed.attention_mask.bool()
    assert torch.equal(~pad, real) and torch.equal(ids[real], packed.ids[real])
    assert torch.equal(roles[real], packed.roles[real]) and torch.equal(lengths, packed.prompt_lengths)
    torch.testing.assert_close(hook[real], out.hook_states[real].float(), rtol=2e-3, atol=2e-3)
    with torch.no_grad():
        tokens, _ = model.vision(collate(examples).pixels)
        _, _, want = model.language_states(tokens, packed.ids, packed.attention_mask, packed.prompt_lengths)
    torch.testing.assert_close(ref, want, rtol=2e-3, atol=2e-3)


def test_refit_cache_of_generated_cot_holds_what_decode_reads(data, sae_run, tmp_path):
    from training.examples import load_examples
    from training.refit import cache_states, example_image, run_refit

    model = SegCompass.from_pretrained(sae_run / "model").eval()
    examples = load_examples(str(data), "train", model.config, limit=3, cache=False)
    states = cache_states(model, examples, batch_size=2, cot="generated")
    for example, state in zip(examples, states):
        trace = model.encode(example_image(example), example.instruction)  # what a user's encode gives
        assert torch.equal(state.ids, trace.token_ids) and torch.equal(state.roles, trace.roles)
        assert state.prompt_length == trace.prompt_length
        torch.testing.assert_close(state.ref, trace.ref_state, rtol=2e-3, atol=2e-3)
        with torch.no_grad():
            codes = model.codes_from_states(state.hook.float()[None])[0]
        # the same codes, but for TopK near-ties flipped by fp16 storage and batch padding (4 of 151,552 here)
        differ = ~torch.isclose(codes, trace.dense_codes(), rtol=1e-2, atol=1e-2)
        assert differ.float().mean() < 1e-3 and differ.any(1).float().mean() < 0.1
    with pytest.raises(ValueError, match="cot must be one of"):
        run_refit(stage_config("refit", "smoke", dict(data=str(data), limit=3, cot="own")), sae_run / "model",
                  tmp_path / "bad", resume=False)


def test_refit_swaps_in_a_fresh_latent_query_head_on_the_frozen_model(data, sae_run, tmp_path):
    from training.refit import run_refit

    init = sae_run / "model"
    before = snapshot(SegCompass.from_pretrained(init))
    out = run_refit(stage_config("refit", "smoke", dict(data=str(data), limit=6, head="latent_query")), init,
                    tmp_path / "lq", resume=False)
    model = SegCompass.from_pretrained(out)
    assert model.config.head == "latent_query" and model.baseline is not None
    unused = ("iou_prediction_head", "point_embed", "not_a_point_embed", "prompt_encoder.mask_embed.")
    trainable = {n for n, _ in model.named_parameters() if n.startswith(("mask_decoder.", "vision.neck."))
                 and not any(u in n for u in unused)}
    assert_trained_exactly({n: p for n, p in before.items() if n in dict(model.named_parameters())}, model,
                           trainable | {n for n, _ in model.named_parameters() if n.startswith("baseline.")})
    with pytest.raises(ValueError, match="box_text"):
        run_refit(stage_config("refit", "smoke", dict(data=str(data), limit=6, head="box_text")), init,
                  tmp_path / "bt", resume=False)
