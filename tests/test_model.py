"""The tiny SegCompass end to end: encode/decode equivalence, edits, checkpoints, bad input."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from segcompass.checkpoint import CheckpointError
from segcompass.concepts import concepts_at, top_concepts, visual_token_at
from segcompass.model import SegCompass
from segcompass.records import ConceptEdit, TokenRole


def batch_forward(model, image, trace):
    lang = model.language
    prep = model.prepare(image)
    batch = lang.pack([lang.build_prompt(trace.instruction, model.num_visual)],
                      [trace.token_ids[trace.prompt_length:].tolist()])
    with torch.no_grad():
        out = model(prep.pixels[None], [prep.valid_hw], batch.ids, batch.roles, batch.attention_mask,
                    batch.prompt_lengths)
    return prep, batch, out


def test_decode_of_encode_equals_batch_forward(tiny_model, scene):
    trace = tiny_model.encode(scene, "the red circle")
    pred = tiny_model.decode(trace)
    prep, batch, out = batch_forward(tiny_model, scene, trace)
    assert torch.equal(batch.ids[0], trace.token_ids)
    assert torch.equal(batch.roles[0], trace.roles)
    assert torch.allclose(out.codes[0], trace.dense_codes(), atol=1e-5)
    assert torch.allclose(out.heatmap_logits[0], pred.heatmaps, atol=1e-4)
    ref = tiny_model.postprocess(out.heatmap_logits[0], out.confidence_logits[0], out.mask_logits[0],
                                 prep.valid_hw, prep.original_size)
    assert np.array_equal(ref.slot_masks, pred.slot_masks)
    assert np.array_equal(ref.mask, pred.mask)
    assert torch.allclose(ref.confidences, pred.confidences, atol=1e-5)


def test_decode_never_calls_the_language_model(tiny_model, scene, monkeypatch):
    trace = tiny_model.encode(scene, "the blue square")
    expected = tiny_model.decode(trace)

    def forbidden(*args, **kwargs):
        raise AssertionError("decode called the language model")

    monkeypatch.setattr(tiny_model.language.lm, "forward", forbidden)
    monkeypatch.setattr(tiny_model.language, "step", forbidden)
    again = tiny_model.decode(trace, ())
    assert torch.equal(again.heatmaps, expected.heatmaps)
    assert np.array_equal(again.mask, expected.mask)


def test_empty_edit_list_is_bit_exact_and_zeroing_an_active_concept_changes_heatmaps(tiny_model, scene):
    trace = tiny_model.encode(scene, "the red circle")
    base = tiny_model.decode(trace)
    assert torch.equal(tiny_model.decode(trace, []).heatmaps, base.heatmaps)
    concept = top_concepts(tiny_model, trace, limit=1)[0].concept
    edited = tiny_model.decode(trace, [ConceptEdit(concept=concept, op="zero")])
    assert not torch.allclose(edited.heatmaps, base.heatmaps)
    # An edit of a concept that never fires changes nothing.
    silent = sorted(set(range(trace.d_sae)) - set(trace.code_index[:, 1].tolist()))[0]
    assert torch.equal(tiny_model.decode(trace, [ConceptEdit(concept=silent)]).heatmaps, base.heatmaps)


def test_edit_scopes_select_the_right_tokens(tiny_model, scene):
    from segcompass.edits import apply_edits, edit_token_mask

    trace = tiny_model.encode(scene, "the red circle")
    codes = trace.dense_codes()
    f = int(trace.code_index[0, 1])
    vis = edit_token_mask(ConceptEdit(f, scope="visual"), trace.roles, trace.patch_boxes)
    assert torch.equal(vis, trace.roles == TokenRole.VISUAL)
    region = edit_token_mask(ConceptEdit(f, region=(0, 0, 30, 30)), trace.roles, trace.patch_boxes)
    assert 1 <= int(region.sum()) <= 4 and bool((trace.roles[region] == TokenRole.VISUAL).all())
    ranged = edit_token_mask(ConceptEdit(f, token_range=(3, 7)), trace.roles, trace.patch_boxes)
    assert ranged.nonzero().flatten().tolist() == [3, 4, 5, 6]
    scaled = apply_edits(codes, trace.roles, [ConceptEdit(f, op="scale", value=2.0)])
    assert torch.allclose(scaled[:, f], codes[:, f] * 2)
    setto = apply_edits(codes, trace.roles, [ConceptEdit(f, op="set", value=3.0, scope="cot")])
    assert bool((setto[trace.roles == TokenRole.COT, f] == 3.0).all())
    with pytest.raises(ValueError):
        apply_edits(codes, trace.roles, [ConceptEdit(trace.d_sae + 1)])


def test_reason_without_edits_reproduces_the_trace_and_with_edits_runs(tiny_model, scene):
    trace = tiny_model.encode(scene, "the red circle")
    same = tiny_model.reason(scene, trace, [])
    assert torch.equal(same.token_ids, trace.token_ids)
    concept = top_concepts(tiny_model, trace, limit=1)[0].concept
    # The spliced path with an edit that changes nothing (scale 1) reproduces generation exactly:
    # SAE reconstruction + error term == the original residual stream.
    spliced = tiny_model.reason(scene, trace, [ConceptEdit(concept, op="scale", value=1.0)])
    assert torch.equal(spliced.token_ids, trace.token_ids)
    assert torch.allclose(spliced.sae_error, trace.sae_error, atol=1e-4)


def test_save_load_reproduces_outputs_exactly(tiny_model, scene, tmp_path):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["preset"] == "tiny"
    loaded = SegCompass.from_pretrained(tmp_path / "ckpt")
    a_trace = tiny_model.encode(scene, "the red circle")
    b_trace = loaded.encode(scene, "the red circle")
    assert torch.equal(a_trace.token_ids, b_trace.token_ids)
    a, b = tiny_model.decode(a_trace), loaded.decode(b_trace)
    assert torch.equal(a.heatmaps, b.heatmaps)
    assert np.array_equal(a.mask, b.mask)


def test_corrupt_and_incomplete_checkpoints_give_clear_errors(tiny_model, tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        SegCompass.from_pretrained(tmp_path)
    tiny_model.save_pretrained(tmp_path / "c")
    weights = tmp_path / "c" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt"):
        SegCompass.from_pretrained(tmp_path / "c")


def test_bad_inputs_raise_clear_errors(tiny_model, scene, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        tiny_model.encode(scene, "   ")
    with pytest.raises(ValueError, match="too long"):
        tiny_model.encode(scene, "word " * 1000)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        tiny_model.encode(bad, "the red circle")
    with pytest.raises(ValueError):
        tiny_model.encode(np.zeros((4, 4)), "the red circle")


def test_prediction_shapes_and_concept_lookups(tiny_model, scene):
    trace, pred = tiny_model.predict(scene, "the red circle")
    K = tiny_model.config.codebook.num_slots
    assert pred.mask.shape == scene.shape[:2] and pred.mask.dtype == bool
    assert pred.slot_masks.shape == (K, *scene.shape[:2])
    assert pred.slot_heatmaps.shape == (K, *scene.shape[:2])
    assert pred.confidences.shape == (K,)
    assert len(trace.tokens) == len(trace.roles) == trace.sae_error.shape[0]
    pos = visual_token_at(trace, 70, 60)
    assert pos is not None and trace.roles[pos] == TokenRole.VISUAL
    assert visual_token_at(trace, 10_000, 5) is None
    assert all(v > 0 for _, v in concepts_at(trace, pos))


def test_predict_cli_writes_mask_and_json(tiny_model, scene, tmp_path):
    from PIL import Image

    from segcompass.predict import main

    tiny_model.save_pretrained(tmp_path / "ckpt")
    Image.fromarray(scene).save(tmp_path / "img.png")
    rc = main(["--checkpoint", str(tmp_path / "ckpt"), "--image", str(tmp_path / "img.png"),
               "--instruction", "the red circle", "--out", str(tmp_path / "m.png"), "--json", str(tmp_path / "o.json")])
    assert rc == 0
    mask = np.asarray(Image.open(tmp_path / "m.png"))
    assert mask.shape == scene.shape[:2] and set(np.unique(mask)) <= {0, 255}
    record = json.loads((tmp_path / "o.json").read_text())
    assert record["instruction"] == "the red circle" and len(record["slot_confidences"]) == 4
    assert main(["--checkpoint", str(tmp_path / "nope"), "--image", str(tmp_path / "img.png"),
                 "--instruction", "x", "--out", str(tmp_path / "n.png")]) == 2


def test_without_a_shipped_checkpoint_the_default_is_a_clear_error(tiny_model, tmp_path, monkeypatch):
    from segcompass import defaults
    from segcompass.predict import main

    monkeypatch.setattr(defaults, "CHECKPOINT_DIR", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="pass --checkpoint"):
        defaults.resolve_checkpoint(None)
    assert defaults.resolve_checkpoint("some/dir") == Path("some/dir")
    assert main(["--image", "x.png", "--instruction", "x", "--out", str(tmp_path / "n.png")]) == 2
    (tmp_path / "empty").mkdir()
    tiny_model.save_pretrained(tmp_path / "empty" / "tiny")
    assert defaults.resolve_checkpoint(None) == tmp_path / "empty" / "tiny"


def test_the_default_checkpoint_is_the_best_measured_one(tiny_model, tmp_path, monkeypatch):
    """Shipping a second model makes it the default only if its recorded test gIoU is higher."""
    from segcompass import defaults

    monkeypatch.setattr(defaults, "CHECKPOINT_DIR", tmp_path)
    for name, giou in [("smol", 0.40), ("tiny", 0.58), ("unscored", None)]:
        tiny_model.save_pretrained(tmp_path / name)
        if giou is not None:
            (tmp_path / name / "eval_test.json").write_text(json.dumps({"gIoU": giou}))
    (tmp_path / "half").mkdir()  # no weights: not a checkpoint
    (tmp_path / "half" / "eval_test.json").write_text(json.dumps({"gIoU": 0.99}))
    assert [f.name for f in defaults.shipped_checkpoints()] == ["tiny", "smol", "unscored"]
    assert defaults.default_checkpoint() == tmp_path / "tiny"
    (tmp_path / "smol" / "eval_test.json").write_text(json.dumps({"gIoU": 0.76}))
    assert defaults.default_checkpoint() == tmp_path / "smol"
    (tmp_path / "smol" / "eval_test.json").write_text("{not json")  # unreadable: ranks last
    assert defaults.default_checkpoint() == tmp_path / "tiny"


def test_encode_batch_matches_encode_one_at_a_time(scene):
    """Batched greedy generation (evaluation) gives each example the trace `encode` gives it alone,
    with prompts of different lengths (left padding) and images of different sizes."""
    from segcompass.model import SegCompass

    model = SegCompass.from_pretrained("assets/checkpoints/tiny")
    images = [scene, scene[:120, :200], np.flipud(scene).copy()]
    texts = ["the red circle", "segment the shape nearest the large blue square please", "find the blue square"]
    batch = model.encode_batch(images, texts)
    for image, text, got in zip(images, texts, batch):
        want = model.encode(image, text)
        assert got.cot == want.cot and torch.equal(got.token_ids, want.token_ids)
        assert torch.equal(got.roles, want.roles) and got.ref_found == want.ref_found
        torch.testing.assert_close(got.dense_codes(), want.dense_codes(), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got.ref_state, want.ref_state, atol=1e-4, rtol=1e-4)
        a, b = model.decode(got), model.decode(want)
        assert (a.mask != b.mask).mean() < 1e-3
    with pytest.raises(ValueError, match="2 images but 1"):
        model.encode_batch([scene, scene], ["x"])


def test_ref_dropout_hides_the_reference_state_from_the_heads(tiny_model, scene):
    """ref_dropout=1 feeds the heads a zero reference state (so only the SAE concepts carry the
    target); 0 is the plain forward; the LM's own outputs never change."""
    trace = tiny_model.encode(scene, "the red circle")
    prep, batch, plain = batch_forward(tiny_model, scene, trace)
    args = (prep.pixels[None], [prep.valid_hw], batch.ids, batch.roles, batch.attention_mask, batch.prompt_lengths)
    with torch.no_grad():
        kept = tiny_model(*args, ref_dropout=0.0)
        dropped = tiny_model(*args, ref_dropout=1.0)
        codes_BTF = dropped.codes
        pad = batch.attention_mask == 0
        _, feats = tiny_model.vision(prep.pixels[None])
        zero_ref = tiny_model.heads(codes_BTF, batch.roles, pad, torch.zeros(1, tiny_model.config.lm.hidden_size),
                                    feats, [prep.valid_hw])
    assert torch.equal(kept.heatmap_logits, plain.heatmap_logits)
    assert torch.equal(dropped.lm_logits, plain.lm_logits)
    assert torch.allclose(dropped.heatmap_logits, zero_ref[0], atol=1e-6)
    assert not torch.allclose(dropped.heatmap_logits, plain.heatmap_logits)


def test_ref_shuffle_gives_the_heads_another_rows_reference_state(tiny_model, scene):
    """ref_shuffle=1 hands each row's heads the next row's reference state (the batch rolled by one),
    leaving the codes, the LM's outputs and everything else of the row as they were."""
    lang = tiny_model.language
    traces = [tiny_model.encode(scene, text) for text in ("the red circle", "the small blue square")]
    prep = tiny_model.prepare(scene)
    batch = lang.pack([lang.build_prompt(t.instruction, tiny_model.num_visual) for t in traces],
                      [t.token_ids[t.prompt_length:].tolist() for t in traces])
    args = (prep.pixels[None].expand(2, -1, -1, -1), [prep.valid_hw] * 2, batch.ids, batch.roles,
            batch.attention_mask, batch.prompt_lengths)
    seen = []
    heads = tiny_model.heads

    def spy(codes, roles, pad, ref, *rest):
        seen.append(ref.clone())
        return heads(codes, roles, pad, ref, *rest)

    tiny_model.heads = spy
    try:
        with torch.no_grad():
            plain = tiny_model(*args)
            shuffled = tiny_model(*args, ref_shuffle=1.0)
    finally:
        del tiny_model.heads
    assert not torch.equal(seen[0][0], seen[0][1])
    assert torch.equal(seen[1], seen[0].roll(1, 0))
    assert torch.equal(shuffled.lm_logits, plain.lm_logits) and torch.equal(shuffled.codes, plain.codes)
    assert not torch.allclose(shuffled.heatmap_logits, plain.heatmap_logits)


def test_reason_effects_regenerate_under_each_edit(tiny_model, scene):
    """bench.concept_effect --reason: one slow-path regeneration per concept, scored against the
    unedited mask; the CoT-changed flag is the regenerated CoT's."""
    from segcompass.concepts import reason_effects

    trace = tiny_model.encode(scene, "the red circle")
    concepts = [c.concept for c in top_concepts(tiny_model, trace, limit=2)]
    assert concepts and reason_effects(tiny_model, scene, trace, []) == []
    base = tiny_model.decode(trace).mask
    for c, (px, changed) in zip(concepts, reason_effects(tiny_model, scene, trace, concepts)):
        again = tiny_model.reason(scene, trace, [ConceptEdit(c)])
        assert changed == (again.cot != trace.cot)
        assert px == int(np.logical_xor(base, tiny_model.decode(again, [ConceptEdit(c)]).mask).sum())


def test_kept_slots_rule():
    from segcompass.slot_mapper import kept_slots

    conf = torch.tensor([[0.45, 0.40, 0.02, 0.9], [0.45, 0.40, 0.02, 0.1], [0.1, 0.2, 0.05, 0.0]])
    assert kept_slots(conf, 0.5).tolist() == [[False, False, False, True], [False] * 4, [False] * 4]
    assert kept_slots(conf, 0.5, 0.3).tolist() == [[False, False, False, True], [True, False, False, False],
                                                    [False] * 4]
    assert kept_slots(conf[1], 0.35, 0.3).tolist() == [True, True, False, False]  # 1-D works too


def test_top_slot_threshold_adds_the_most_confident_slot_to_the_mask(tiny_model, scene):
    import dataclasses

    trace = tiny_model.encode(scene, "the red circle")
    conf = tiny_model.decode(trace).confidences
    top = int(conf.argmax())
    mask_cfg = tiny_model.config.mask
    try:
        tiny_model.config = tiny_model.config.replace(mask=dataclasses.replace(
            mask_cfg, confidence_threshold=1.0, top_slot_threshold=float(conf.max()) - 1e-3))
        pred = tiny_model.decode(trace)
        assert pred.kept_slots == [top] and np.array_equal(pred.mask, pred.slot_masks[top])
        tiny_model.config = tiny_model.config.replace(mask=dataclasses.replace(
            mask_cfg, confidence_threshold=1.0, top_slot_threshold=float(conf.max()) + 1e-3))
        assert tiny_model.decode(trace).kept_slots == [] and not tiny_model.decode(trace).mask.any()
    finally:
        tiny_model.config = tiny_model.config.replace(mask=mask_cfg)
