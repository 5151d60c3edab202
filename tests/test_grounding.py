"""segcompass.grounding: the CoT's region words follow where the model's own visual tokens see the object."""

import dataclasses

import numpy as np
import pytest

TINY = "assets/checkpoints/tiny"


def _percept_with(objects: dict[int, tuple[str, str, str]]):
    """An 8 x 8 token grid over a 256-pixel image, unsure everywhere but at the given tokens."""
    import torch

    from segcompass.verify import COLOURS, SHAPES, SIZES, Percept

    n, side = 8, 256.0
    def flat(k):
        return torch.full((n * n, k), -float(np.log(k)))
    colour, shape, size = flat(len(COLOURS)), flat(len(SHAPES)), flat(len(SIZES))
    for t, (c, s, z) in objects.items():
        colour[t] = torch.log_softmax(torch.eye(len(COLOURS))[COLOURS.index(c)] * 20, -1)
        shape[t] = torch.log_softmax(torch.eye(len(SHAPES))[SHAPES.index(s)] * 20, -1)
        size[t] = torch.log_softmax(torch.eye(len(SIZES))[SIZES.index(z)] * 20, -1)
    step = side / n
    rows, cols = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    centres = torch.stack([(cols.flatten() + 0.5) * step, (rows.flatten() + 0.5) * step], -1)
    return Percept(colour, shape, size, centres, torch.tensor([side, side]))


def test_target_finds_where_the_cot_states_a_place():
    from segcompass.grounding import target

    assert target("shapes : large blue star at") == ("blue", "star", "large")
    assert target("shapes : large blue star at bottom left , green hexagon at") == ("green", "hexagon", None)
    assert target("anchor : circle at") == (None, "circle", None)
    assert target("looking for the white shape . found it in the") == ("white", None, None)
    assert target("looking for the large purple diamond .found it in the") == ("purple", "diamond", "large")
    # places already written, or the instruction's own place being copied, are not targets
    assert target("shapes : large blue star at bottom") is None
    assert target("looking for the diamond in the") is None
    assert target("looking for the shape . found it in the") is None  # nothing the tokens could name
    assert target("a shape that rolls is a circle . so the circle") is None


def test_region_grounding_forces_the_seen_place_and_leaves_the_rest_to_the_lm():
    from transformers import AutoTokenizer

    from segcompass.grounding import RegionGrounding

    tok = AutoTokenizer.from_pretrained("assets/checkpoints/smol")
    # a small red circle at tokens (6, 0) / (7, 1): bottom left; a large blue star at (1, 6): top right
    p = _percept_with({48: ("red", "circle", "small"), 57: ("red", "circle", "small"), 14: ("blue", "star", "large")})
    steer = RegionGrounding(tok, [p])
    ids = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
    prefix = ids("shapes : small red circle at")
    first = steer(0, prefix)
    second = steer(0, prefix + [first])
    assert tok.decode([first, second]) == " bottom left"
    assert steer(0, prefix + [first, second]) is None  # the LM goes on by itself
    found = ids("looking for the blue shape . found it in the")
    first = steer(0, found)
    assert [first, steer(0, found + [first])] == ids(" top right")
    assert steer(0, ids("shapes : green hexagon at")) is None  # no token sees one: the LM's own words
    assert steer(0, ids("there is no green hexagon .")) is None
    assert steer.forced == [["bottom left", "top right"]]


def test_grounded_generation_writes_the_places_the_tokens_see():
    """On the tiny checkpoint (trained with the naming loss), generation with `ground_regions` writes, wherever
    the CoT states a place, the place its own visual tokens (read back from the trace) see the object in."""
    from PIL import Image

    from segcompass.grounding import RegionGrounding, target
    from segcompass.model import SegCompass
    from segcompass.verify import COLUMNS, ROWS, perceive

    model = SegCompass.from_pretrained(TINY)
    model.config = model.config.replace(lm=dataclasses.replace(model.config.lm, ground_regions=True))
    image = np.asarray(Image.open("assets/examples/shapeworld_01.jpg").convert("RGB"))
    texts = ["find the leftmost object", "segment the red shape", "show me the shape below the large circle"]
    traces = [model.encode(image, text) for text in texts]
    checked = 0
    for trace in traces:
        seen = RegionGrounding(model.language.tokenizer, [perceive(model, trace)])
        cot = trace.cot.split()
        for i in range(len(cot) - 2):
            wanted = target(" ".join(cot[:i + 1]))
            region = None if wanted is None else seen.region(0, *wanted)
            if region is not None:
                assert cot[i + 1:i + 3] == [ROWS[region[0]], COLUMNS[region[1]]], trace.cot
                checked += 1
    assert checked, [t.cot for t in traces]
    batch = model.encode_batch([image] * len(texts), texts)
    assert [t.cot for t in batch] == [t.cot for t in traces]
    assert model.decode(traces[0]).mask.shape == image.shape[:2]
