"""segcompass.repair: a CoT decision the model's own visual tokens contradict is decided by what they see."""

import dataclasses

import numpy as np

from tests.test_verify import _scene_percept

TINY = "assets/checkpoints/tiny"

# 8 x 8 tokens over 256 px (32 px each): a small red star top left (tokens 0, 1: x 32, y 16), a large blue star
# bottom left (56: x 16, y 240), a medium green circle in the middle (27: x 112, y 112)
SCENE = [((0, 1), ("red", "star", "small")), ((56,), ("blue", "star", "large")), ((27,), ("green", "circle", "medium"))]


def test_ranked_choices_follow_the_seen_objects():
    from segcompass.repair import fix_ranked, repair

    p = _scene_percept(SCENE)
    wrong = "stars : large blue star at bottom left , small red star at top left . highest is the large blue star ."
    fix = repair(p, wrong + " answer : large blue star .")
    assert (fix.prefix, fix.answer) == ("stars : small red star at", "small red star")
    assert "(32, 16)" in fix.why
    assert repair(p, wrong.replace("highest", "lowest")) is None  # the CoT's answer is the seen one
    # largest / smallest by size class; "shapes" counts the circle too
    assert fix_ranked(p, "shapes : x . largest is the medium green circle .", []) is None  # needs the seen objects
    assert repair(p, "shapes : x . largest is the medium green circle .").answer == "large blue star"
    assert repair(p, "shapes : x . smallest is the small red star .") is None
    # leftmost star: the blue one (x 16) is only 16 px left of the red one; one column apart still clears 8 px
    assert repair(p, "stars : x . leftmost is the small red star .").answer == "large blue star"
    # two objects in one column: the tokens cannot tell which is leftmost, the LM's choice stands
    same_column = _scene_percept([((0,), ("red", "star", "small")), ((56,), ("blue", "star", "large"))])
    assert repair(same_column, "stars : x . leftmost is the small red star .") is None
    # a group of one seen object: nothing to compare
    assert repair(p, "circles : x . leftmost is the medium green circle .") is None


def test_relations_follow_the_seen_objects():
    from segcompass.repair import repair

    p = _scene_percept(SCENE)
    cot = "anchor : medium green circle at middle centre . stars above it : large blue star . answer : large blue star ."
    fix = repair(p, cot)
    assert fix.prefix == "anchor : medium green circle at middle centre . stars above it :"
    assert fix.answer == "small red star"
    assert repair(p, cot.replace("large blue star", "small red star")) is None
    assert repair(p, cot.replace("above", "below")) is None  # the blue star is the one below
    # "above it" with no group: the red star is still the only shape above the circle
    assert repair(p, cot.replace("stars above", "above")).answer == "small red star"
    # left of the circle: both stars are, so the tokens leave the choice to the LM
    assert repair(p, cot.replace("above", "left of")) is None
    closest = "anchor : small red star at top left . closest to it : large blue star . answer : large blue star ."
    assert repair(p, closest).answer == "medium green circle"  # 125 px from the red star; the blue one 225


def test_absence_follows_the_seen_objects():
    from segcompass.repair import repair

    p = _scene_percept(SCENE)
    fix = repair(p, "there is no green circle . answer : none .")
    assert (fix.prefix, fix.answer) == ("looking for the green circle . found it in the", "medium green circle")
    fix = repair(p, "looking for the purple hexagon . found it in the top left . answer : small purple hexagon .")
    assert (fix.prefix, fix.answer) == ("there is no purple hexagon . answer : none .", None)
    assert repair(p, "there is no purple hexagon . answer : none .") is None
    assert repair(p, "looking for the red star . found it in the top left . answer : small red star .") is None
    assert repair(p, "there is no hexagon . answer : none .") is None  # a bare shape: nothing to name instead
    assert repair(p, "a shape that rolls is a circle . so the circle . answer : medium green circle .") is None


def test_a_place_of_the_instruction_follows_the_seen_objects():
    from segcompass.repair import repair

    p = _scene_percept(SCENE)
    cot = "looking for the star in the top left . only the {} is there . answer : {} ."
    fix = repair(p, cot.format("large blue star", "large blue star"))
    assert fix.prefix == "looking for the star in the top left . only the small red star is there . answer :"
    assert fix.answer == "small red star"
    assert repair(p, cot.format("small red star", "small red star")) is None
    assert repair(p, cot.replace("top left", "bottom right").format("small red star", "small red star")) is None


def test_the_answer_is_the_one_seen_object_the_cot_described():
    from segcompass.repair import repair

    p = _scene_percept(SCENE)
    fix = repair(p, "looking for the green shape . found it in the middle centre . answer : small green star .")
    assert (fix.prefix, fix.answer) == ("looking for the green shape . found it in the middle centre . answer :",
                                        "medium green circle")
    fix = repair(p, "a shape that rolls is a circle . so the circle . answer : large blue circle .")
    assert (fix.prefix, fix.answer) == ("a shape that rolls is a circle . so the circle . answer :", "medium green circle")
    assert repair(p, "a shape that rolls is a circle . so the circle . answer : medium green circle .") is None
    assert repair(p, "looking for the star . found it in the top left . answer : small red star .") is None  # two stars


def test_negations_follow_the_seen_objects():
    from segcompass.repair import repair

    p = _scene_percept(SCENE)
    fix = repair(p, "stars : red , blue . not red : the red star . answer : small red star .")
    assert (fix.prefix, fix.answer) == ("stars : red , blue . not red : the blue star . answer :", "large blue star")
    assert repair(p, "stars : small , large . not small : the large star . answer : large blue star .") is None
    assert repair(p, "stars : small , large . not large : the large star . answer : large blue star .").answer == \
        "small red star"
    assert repair(p, "green shapes : circle . not a circle : the green star . answer : small green star .") is None


def test_a_named_object_no_token_is_sure_of_still_counts():
    """Small objects often have no token at `seen_objects`' 0.9; one the CoT names at >= 0.5 joins the group."""
    import torch

    from segcompass.repair import repair
    from segcompass.verify import COLOURS, SHAPES, seen_objects

    p = _scene_percept(SCENE)
    # token 31 (x 240, y 112) names a small yellow star at ~0.6, below the 0.9 of a seen object
    p.shape[31] = torch.log_softmax(torch.eye(len(SHAPES))[SHAPES.index("star")] * 20, -1)
    p.colour[31] = torch.log_softmax(torch.eye(len(COLOURS))[COLOURS.index("yellow")] * 20, -1)
    p.size[31] = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    assert len(seen_objects(p)) == 3
    cot = "stars : small yellow star at middle right , large blue star at bottom left . rightmost is the large blue star ."
    assert repair(p, cot).answer == "small yellow star"
    # not named, not counted: the rightmost star is then the seen red star at x 32 (the blue one is at 16)
    assert repair(p, cot.replace("small yellow star at middle right , ", "")).answer == "small red star"


def test_fix_steer_writes_the_prefix_then_forces_the_answer_where_it_is_restated():
    from transformers import AutoTokenizer

    from segcompass.repair import Fix, FixSteer

    tok = AutoTokenizer.from_pretrained("assets/checkpoints/smol")
    ids = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    fix = Fix("anchor : circle at top left . above it :", "small red star", "test")
    steer = FixSteer(tok, [fix, None])
    out: list[int] = []
    while (token := steer(0, out)) is not None:
        out.append(token)
    assert out == ids("<think> anchor : circle at top left . above it : small red star")
    assert steer(0, out + ids(" .")) is None  # the LM writes on
    again = out + ids(" . answer :")
    forced = [steer(0, again)]
    while (token := steer(0, again + forced)) is not None:
        forced.append(token)
    assert forced == ids(" small red star")
    assert steer(1, []) is None  # no fix: the LM's own


def test_repaired_generation_on_the_tiny_checkpoint():
    """On the tiny checkpoint, whose greedy CoTs the visual tokens often contradict: with `repair` the kept CoT is the
    rewritten one, it states the seen decision, and the tokens no longer contradict it; other CoTs are untouched."""
    from PIL import Image

    from segcompass.model import SegCompass
    from segcompass.repair import repair
    from segcompass.verify import perceive

    model = SegCompass.from_pretrained(TINY)
    model.config = model.config.replace(lm=dataclasses.replace(model.config.lm, ground_regions=True))
    image = np.asarray(Image.open("assets/examples/shapeworld_01.jpg").convert("RGB"))
    texts = ["find the leftmost object", "the blue circle", "segment the red shape"]
    plain = [model.encode(image, text) for text in texts]
    fixes = [repair(perceive(model, t), t.cot) for t in plain]
    assert fixes[0] is not None and fixes[1] is not None and fixes[2] is None, [t.cot for t in plain]
    assert all(t.repair == "" for t in plain)

    model.config = model.config.replace(lm=dataclasses.replace(model.config.lm, repair=True))
    streamed: list[str] = []
    first = model.encode(image, texts[0], on_token=streamed.append)
    fixed = [first] + [model.encode(image, text) for text in texts[1:]]
    for trace, fix, old in zip(fixed, fixes, plain):
        if fix is None:
            assert trace.cot == old.cot and trace.repair == ""
            continue
        assert trace.repair == fix.why and trace.cot != old.cot
        assert " ".join(trace.cot.split()).startswith(fix.prefix)
        assert trace.cot.endswith(f"answer : {fix.answer or 'none'} .")
        assert repair(perceive(model, trace), trace.cot) is None
    from segcompass.repair import REWRITE_MARK

    assert streamed.count(REWRITE_MARK) == 1  # the explorer clears the first CoT there
    batch = model.encode_batch([image] * len(texts), texts)
    assert [t.cot for t in batch] == [t.cot for t in fixed] and [t.repair for t in batch] == [t.repair for t in fixed]
    assert model.decode(fixed[0]).mask.shape == image.shape[:2]
