"""segcompass.verify: a chain of thought's claims checked against the model's own visual tokens."""

import dataclasses
import json

import numpy as np
import pytest

TINY = "assets/checkpoints/tiny"


def test_verify_checks_named_objects_and_places_against_the_visual_tokens():
    import torch

    from segcompass.verify import COLOURS, SHAPES, SIZES, Percept, claims, verify

    n, side = 8, 256.0
    def flat(k):  # every token unsure of everything
        return torch.full((n * n, k), -float(torch.log(torch.tensor(float(k)))))
    colour, shape, size = flat(len(COLOURS)), flat(len(SHAPES)), flat(len(SIZES))
    for t in (0, 1, 8, 9):  # a small red circle covering the top-left 2 x 2 tokens
        colour[t] = torch.log_softmax(torch.eye(len(COLOURS))[COLOURS.index("red")] * 20, -1)
        shape[t] = torch.log_softmax(torch.eye(len(SHAPES))[SHAPES.index("circle")] * 20, -1)
        size[t] = torch.log_softmax(torch.eye(len(SIZES))[SIZES.index("small")] * 20, -1)
    step = side / n
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    centres = torch.stack([(cols.flatten() + 0.5) * step, (rows.flatten() + 0.5) * step], -1)
    p = Percept(colour, shape, size, centres, torch.tensor([side, side]))
    assert verify(p, "anchor : small red circle at top left . answer : small red circle .") > -0.01
    # only unsure tokens lie in the bottom right: log(1/7 * 1/6 * 1/3)
    assert verify(p, "anchor : small red circle at bottom right . answer : small red circle .") < -4.8
    assert verify(p, "answer : large red circle .") < -4.8  # the wrong size: no better than an unsure token
    assert verify(p, "there is no small red circle . answer : none .") < -10
    assert verify(p, "there is no blue star . answer : none .") > -0.1
    assert verify(p, "answer : none .") is None  # names no object
    assert Percept.from_dict(p.to_dict()).centres.tolist() == centres.tolist()
    parsed = claims("yellow shapes : circle , diamond . not a diamond : the yellow circle . found it in the "
                    "bottom right . answer : small yellow circle .")
    assert [(c.colour, c.shape, c.size, c.region, c.present) for c in parsed] == [
        ("yellow", "circle", None, None, True), ("yellow", "circle", "small", (2, 2), True)]


def test_verify_checks_a_directional_relation():
    import torch

    from segcompass.verify import COLOURS, SHAPES, SIZES, Percept, relation_support

    n, side = 8, 256.0
    colour = torch.full((n * n, len(COLOURS)), -30.0)
    shape = torch.full((n * n, len(SHAPES)), -30.0)
    size = torch.zeros(n * n, len(SIZES)) - float(np.log(3))
    # a red circle top left, a blue star bottom right
    for t, (c, s) in {0: ("red", "circle"), 63: ("blue", "star")}.items():
        colour[t, COLOURS.index(c)], shape[t, SHAPES.index(s)] = 0.0, 0.0
    step = side / n
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    centres = torch.stack([(cols.flatten() + 0.5) * step, (rows.flatten() + 0.5) * step], -1)
    p = Percept(colour, shape, size, centres, torch.tensor([side, side]))
    right = "anchor : red circle at top left . below it : blue star . answer : blue star ."
    wrong = "anchor : red circle at top left . above it : blue star . answer : blue star ."
    assert relation_support(p, right) > -0.01 and relation_support(p, wrong) < -20
    assert relation_support(p, "anchor : red circle at top left . closest to it : blue star .") is None


def test_best_of_keeps_a_scored_candidate_and_predict_reports_them(tmp_path):
    import torch
    from PIL import Image

    from segcompass.model import SegCompass
    from segcompass.predict import main
    from segcompass.verify import best_of

    model = SegCompass.from_pretrained(TINY)
    image = np.asarray(Image.open("assets/examples/shapeworld_01.jpg").convert("RGB"))
    kept, cands = best_of(model, image, "segment the red shape", 2, generator=torch.Generator().manual_seed(0),
                          ground_regions=False)
    assert len(cands) == 3 and cands[0]["cot"] == model.encode(image, "segment the red shape").cot
    _, gcands = best_of(model, image, "segment the red shape", 1, generator=torch.Generator().manual_seed(0))
    model.config = model.config.replace(lm=dataclasses.replace(model.config.lm, ground_regions=True))
    assert gcands[0]["cot"] == model.encode(image, "segment the red shape").cot  # best_of grounds by default
    model.config = model.config.replace(lm=dataclasses.replace(model.config.lm, ground_regions=False))
    scored = [c["score"] for c in cands if c["score"] is not None]
    assert scored, "the tiny checkpoint was trained with the naming loss: its CoTs name objects it can check"
    best = max(scored)
    assert [c["kept"] for c in cands].count(True) == 1
    assert next(c for c in cands if c["kept"])["cot"] == kept.cot
    assert kept.cot in [c["cot"] for c in cands if c["score"] == best]
    with pytest.raises(ValueError):
        best_of(model, image, "segment the red shape", -1)
    out = tmp_path / "m.png"
    assert main(["--checkpoint", TINY, "--image", "assets/examples/shapeworld_01.jpg", "--instruction",
                 "segment the red shape", "--out", str(out), "--json", str(tmp_path / "r.json"), "--verify", "2"]) == 0
    record = json.loads((tmp_path / "r.json").read_text())
    cands = record["verified_candidates"]
    assert len(cands) == 3 and record["cot"] == next(c for c in cands if c["kept"])["cot"]


def test_choose_prefers_the_best_score_and_keeps_greedy_on_ties_or_no_claims():
    from segcompass.verify import choose

    assert choose([-3.0, -0.5, -0.5]) == 1
    assert choose([-0.5, -0.5]) == 0
    assert choose([None, -1.0, None]) == 0  # unscored counts as greedy (0.0 here); -1 is worse
    assert choose([-2.0, None, -1.0]) == 2  # unscored counts as greedy's -2.0


def test_best_of_n_rescores_saved_candidates_without_a_model(tmp_path, capsys):
    import torch

    from bench.best_of_n import main
    from segcompass.verify import COLOURS, SHAPES, SIZES, Percept

    n = 8
    colour = torch.full((n * n, len(COLOURS)), -30.0)
    shape = torch.full((n * n, len(SHAPES)), -30.0)
    size = torch.full((n * n, len(SIZES)), -30.0)
    colour[0, COLOURS.index("red")] = shape[0, SHAPES.index("circle")] = size[0, SIZES.index("small")] = 0.0
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    centres = torch.stack([(cols.flatten() + 0.5) * 32, (rows.flatten() + 0.5) * 32], -1)
    percept = Percept(colour, shape, size, centres, torch.tensor([256.0, 256.0])).to_dict()
    cands = [{"cot": "answer : large blue star .", "answer": "large blue star .", "iou": 0.0, "conf": [0.9]},
             {"cot": "answer : small red circle .", "answer": "small red circle .", "iou": 0.8, "conf": [0.2]}]
    saved = {"report": {"checkpoint": "x", "split": "val", "temperature": 0.7},
             "rows": [{"name": "a", "family": "attribute", "cands": cands, "percept": percept}]}
    (tmp_path / "bon.json").write_text(json.dumps(saved))
    report = main(["--from", str(tmp_path / "bon.json")])
    assert report["n=1"]["greedy"] == 0.0 and report["n=1"]["verified"] == 0.8 and report["n=1"]["max_conf"] == 0.0



def _scene_percept(objects):
    """8 x 8 tokens over 256 px, certain of the (colour, shape, size) at the given token indices, else of nothing."""
    import torch

    from segcompass.verify import COLOURS, SHAPES, SIZES, Percept

    n = 8
    colour = torch.full((n * n, len(COLOURS)), -float(np.log(len(COLOURS))))
    shape = torch.full((n * n, len(SHAPES)), -float(np.log(len(SHAPES))))
    size = torch.full((n * n, len(SIZES)), -float(np.log(len(SIZES))))
    for tokens, (c, s, z) in objects:
        for t in tokens:
            for table, vocab, word in ((colour, COLOURS, c), (shape, SHAPES, s), (size, SIZES, z)):
                table[t] = torch.log_softmax(torch.eye(len(vocab))[vocab.index(word)] * 20, -1)
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    centres = torch.stack([(cols.flatten() + 0.5) * 32, (rows.flatten() + 0.5) * 32], -1)
    return Percept(colour, shape, size, centres, torch.tensor([256.0, 256.0]))


def test_seen_objects_and_the_answer_checked_against_every_seen_member_of_its_group():
    from segcompass.verify import extreme_support, relation_support, seen_objects, verify

    # a red star top left (2 tokens), a blue star bottom left, a green circle in the middle; unsure background
    p = _scene_percept([((0, 1), ("red", "star", "small")), ((56,), ("blue", "star", "large")),
                        ((27,), ("green", "circle", "medium"))])
    seen = sorted((o.colour, o.shape, o.size, o.tokens) for o in seen_objects(p))
    assert seen == [("blue", "star", "large", 1), ("green", "circle", "medium", 1), ("red", "star", "small", 2)]
    red = next(o for o in seen_objects(p) if o.colour == "red")
    assert red.xy == (32.0, 16.0)  # between its two tokens' centres
    # the highest star is the red one, whatever the CoT listed (the blue star is the other star seen)
    right = "stars : small red star at top left . highest is the small red star . answer : small red star ."
    wrong = "stars : large blue star at bottom left . highest is the large blue star . answer : large blue star ."
    assert extreme_support(p, right) > -0.01 and extreme_support(p, wrong) < -10
    # "shapes": the circle counts too; "circles": no other circle seen, so nothing to compare
    assert extreme_support(p, "shapes : x . rightmost is the medium green circle .") > -0.01
    assert extreme_support(p, "circles : x . rightmost is the medium green circle .") is None
    assert verify(p, right) > verify(p, wrong)
    # relations: the answer must be the only one of its group so placed, and closest / farthest are checked
    below = "anchor : small red star at top left . below it : large blue star . answer : large blue star ."
    assert relation_support(p, below) < -5  # the green circle is below the red star too
    assert relation_support(p, below.replace("below it", "stars below it")) > -0.01  # only stars: unique
    assert relation_support(p, below, others=False) > -0.01  # session 23's rule: the direction only
    closest = "anchor : small red star at top left . closest to it : {} . answer : x ."
    assert relation_support(p, closest.format("medium green circle")) > -0.01  # 125 px away; the blue star 225
    assert relation_support(p, closest.format("large blue star")) < -3
