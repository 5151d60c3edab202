"""ShapeWorld-RS generator against the contract in shared/spec/shapeworld.md.

Answers are re-checked from the JSON alone with an independent reading of the query text.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import numpy as np
import pytest
import scipy.ndimage
import skimage.draw
import skimage.morphology
from PIL import Image, JpegImagePlugin

from training.data.shapeworld import (
    COLORS, FAMILIES, KNOWLEDGE_FACTS, SHAPES, SIZES, generate_example, main, split_seed,
)
from training.data.shapeworld_queries import make_query
from training.data.shapeworld_scene import place_objects

N_SAMPLES = 400
N_IMAGES = 40  # examples whose rendered image is kept for pixel checks


@pytest.fixture(scope="module")
def examples() -> list[tuple[np.ndarray | None, dict]]:
    stream = split_seed(0, "val")
    out = []
    for i in range(N_SAMPLES):
        image, record = generate_example(stream, i)
        out.append((image if i < N_IMAGES else None, record))
    return out


def _mask(points: list[list[float]]) -> np.ndarray:
    p = np.asarray(points)
    out = np.zeros((256, 256), dtype=bool)
    out[skimage.draw.polygon(p[:, 1], p[:, 0], shape=(256, 256))] = True
    return out


def _target_indices(record: dict) -> list[int]:
    return [next(i for i, o in enumerate(record["objects"]) if o["points"] == s["points"]) for s in record["shapes"]]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _description(text: str) -> tuple[str | None, str | None, str | None]:
    """(size, colour, shape) named in a query, read independently of the generator."""
    w = [x[:-1] if x.endswith("s") and x[:-1] in SHAPES else x for x in _words(text)]  # plurals
    size = next((x for x in w if x in SIZES), None)
    color = next((x for x in w if x in COLORS), None)
    shape = next((x for x in w if x in SHAPES), None)
    return size, color, shape


def _matching(record: dict, desc) -> list[int]:
    return [i for i, o in enumerate(record["objects"])
            if all(v is None or v == o[k] for v, k in zip(desc, ("size", "color", "shape")))]


# ---------------------------------------------------------------------------- determinism and splits


def test_cli_is_deterministic_and_prefix_stable(tmp_path):
    main(["--out", str(tmp_path / "a"), "--split", "train", "--n", "6", "--seed", "3"])
    main(["--out", str(tmp_path / "b"), "--split", "train", "--n", "6", "--seed", "3"])
    main(["--out", str(tmp_path / "c"), "--split", "train", "--n", "3", "--seed", "3"])
    files_a = sorted(p.name for p in (tmp_path / "a" / "train").iterdir())
    assert len(files_a) == 12 and files_a[0] == "train_000000.jpg"
    for name in files_a:
        assert (tmp_path / "a" / "train" / name).read_bytes() == (tmp_path / "b" / "train" / name).read_bytes()
    for name in sorted(p.name for p in (tmp_path / "c" / "train").iterdir()):
        assert (tmp_path / "a" / "train" / name).read_bytes() == (tmp_path / "c" / "train" / name).read_bytes()
    # --start writes a range: two ranges make the same split as one run (parallel generation).
    main(["--out", str(tmp_path / "c"), "--split", "train", "--n", "6", "--seed", "3", "--start", "3"])
    assert sorted(p.name for p in (tmp_path / "c" / "train").iterdir()) == files_a
    for name in files_a:
        assert (tmp_path / "a" / "train" / name).read_bytes() == (tmp_path / "c" / "train" / name).read_bytes()
    # --jobs: processes writing ranges of one split make the same files.
    main(["--out", str(tmp_path / "d"), "--split", "train", "--n", "6", "--seed", "3", "--jobs", "4"])
    assert sorted(p.name for p in (tmp_path / "d" / "train").iterdir()) == files_a
    for name in files_a:
        assert (tmp_path / "a" / "train" / name).read_bytes() == (tmp_path / "d" / "train" / name).read_bytes()


def test_splits_with_the_same_seed_are_disjoint():
    seeds = {split: split_seed(0, split) for split in ("train", "val", "test")}
    assert len(set(seeds.values())) == 3
    scenes = {split: {json.dumps(generate_example(s, i)[1]["objects"]) for i in range(15)} for split, s in seeds.items()}
    assert not scenes["train"] & scenes["test"] and not scenes["train"] & scenes["val"]


def test_jpeg_file_is_256_rgb_quality95_420(tmp_path):
    main(["--out", str(tmp_path), "--split", "test", "--n", "1", "--seed", "0"])
    with Image.open(tmp_path / "test" / "test_000000.jpg") as im:
        assert im.format == "JPEG" and im.size == (256, 256) and im.mode == "RGB"
        assert JpegImagePlugin.get_sampling(im) == 2  # 4:2:0
        # Pillow's quality-95 luminance table has a DC step of 2.
        assert im.quantization[0][0] == 2
    record = json.loads((tmp_path / "test" / "test_000000.json").read_text())
    assert list(record) == ["text", "is_sentence", "shapes", "family", "objects", "cot"]


# ---------------------------------------------------------------------------- scene numbers


def test_object_colours_radii_and_counts():
    rng = np.random.default_rng(7)
    for _ in range(60):
        objects = place_objects(rng)
        assert 2 <= len(objects) <= 6
        for o in objects:
            assert np.abs(np.array(o.rgb) - np.array(COLORS[o.color])).max() <= 15
            lo, hi = SIZES[o.size]
            assert lo <= o.radius <= hi
            assert o.radius + 4 - 0.01 <= min(o.center) and max(o.center) <= 255 - o.radius - 4 + 0.01


@pytest.mark.parametrize("shape,count,offset", [
    ("circle", 64, 0.0), ("triangle", 3, 0.0), ("square", 4, math.pi / 4),
    ("diamond", 4, 0.0), ("hexagon", 6, 0.0), ("star", 10, 0.0),
])
def test_vertex_angles_and_radii(examples, shape, count, offset):
    seen = 0
    for _, record in examples:
        for o in record["objects"]:
            if o["shape"] != shape:
                continue
            seen += 1
            (cx, cy), r, p = o["center"], o["radius"], np.asarray(o["points"])
            assert len(p) == count
            assert np.allclose(p, np.round(p, 2))
            dx, dy = p[:, 0] - cx, p[:, 1] - cy
            theta = np.arctan2(dx, -dy) % (2 * np.pi)  # from straight up, clockwise
            expected = (offset + 2 * np.pi * np.arange(count) / count) % (2 * np.pi)
            assert np.allclose(np.angle(np.exp(1j * (theta - expected))), 0, atol=0.005)
            radii = np.hypot(dx, dy)
            want = np.where(np.arange(count) % 2 == 1, 0.45 * r, r) if shape == "star" else np.full(count, r)
            assert np.allclose(radii, want, atol=0.01)
    assert seen > 0


def test_objects_never_touch_and_pixels_match_polygons(examples):
    disk = skimage.morphology.disk(4)
    for image, record in examples[:N_IMAGES]:
        masks = [_mask(o["points"]) for o in record["objects"]]
        for i, m in enumerate(masks):
            grown = scipy.ndimage.binary_dilation(m, structure=disk)
            assert not any((grown & other).any() for j, other in enumerate(masks) if j != i)
            colours = image[m]
            assert (colours == colours[0]).all()  # one flat colour fills exactly the polygon's mask
            assert np.abs(colours[0].astype(int) - COLORS[record["objects"][i]["color"]]).max() <= 15


def test_jpeg_pixels_inside_masks_keep_the_object_colour(tmp_path):
    main(["--out", str(tmp_path), "--split", "val", "--n", "5", "--seed", "9"])
    for k in range(5):
        image = np.asarray(Image.open(tmp_path / "val" / f"val_{k:06d}.jpg").convert("RGB")).astype(int)
        record = json.loads((tmp_path / "val" / f"val_{k:06d}.json").read_text())
        for o in record["objects"]:
            inner = scipy.ndimage.binary_erosion(_mask(o["points"]), iterations=2)
            if inner.sum() > 20:
                assert np.abs(np.median(image[inner], axis=0) - COLORS[o["color"]]).max() <= 15 + 6


# ---------------------------------------------------------------------------- families


def test_family_shares_match_the_spec(examples):
    counts = Counter(record["family"] for _, record in examples)
    assert set(counts) == set(FAMILIES)
    for family, p in FAMILIES.items():
        assert abs(counts[family] / N_SAMPLES - p) <= 3.5 * math.sqrt(p * (1 - p) / N_SAMPLES), (family, counts)


def test_targets_per_family(examples):
    for _, record in examples:
        n_targets = len(record["shapes"])
        assert record["is_sentence"] == (record["family"] == "knowledge")
        assert len(record["text"]) == 1 and record["text"][0]
        assert all(s["label"] == "target" and s["shape_type"] == "polygon" for s in record["shapes"])
        if record["family"] == "none":
            assert n_targets == 0
            assert not _matching(record, _description(record["text"][0]))
        elif record["family"] == "multi":
            assert n_targets >= 2
            assert sorted(_target_indices(record)) == _matching(record, _description(record["text"][0]))
        else:
            assert n_targets == 1


def test_attribute_answers_are_unique(examples):
    checked = 0
    for _, record in examples:
        if record["family"] == "attribute":
            assert _matching(record, _description(record["text"][0])) == _target_indices(record)
            checked += 1
    assert checked > 30


def test_comparison_answers_are_unique_by_area(examples):
    checked = 0
    for _, record in examples:
        if record["family"] != "comparison":
            continue
        words = _words(record["text"][0])
        sign = 1 if {"largest", "biggest"} & set(words) else -1
        assert sign == 1 or {"smallest", "tiniest"} & set(words)
        group = _matching(record, _description(record["text"][0]))
        assert len(group) >= 2
        areas = {i: int(_mask(record["objects"][i]["points"]).sum()) for i in group}
        ranked = sorted(group, key=lambda i: -sign * areas[i])
        assert [ranked[0]] == _target_indices(record)
        assert abs(areas[ranked[0]] - areas[ranked[1]]) > 0.05 * max(areas[ranked[0]], areas[ranked[1]])
        checked += 1
    assert checked > 20


_EXTREME_WORDS = {
    "leftmost": (0, 1), "far left": (0, 1), "furthest to the left": (0, 1),
    "rightmost": (0, -1), "far right": (0, -1), "furthest to the right": (0, -1),
    "highest": (1, 1), "topmost": (1, 1), "nearest the top": (1, 1),
    "lowest": (1, -1), "bottommost": (1, -1), "nearest the bottom": (1, -1),
}
_REGION_RE = re.compile(r"\b(?:in|at) the (top|middle|bottom|centre)(?: (left|centre|right))?\b")


def _third(value: float) -> int:
    return int(value >= 256 / 3) + int(value >= 512 / 3)


def test_position_answers_are_unique(examples):
    checked = 0
    for _, record in examples:
        if record["family"] != "position":
            continue
        text = record["text"][0]
        objects = record["objects"]
        region = _REGION_RE.search(text)
        if region:
            group_text = text[: region.start()]
        else:
            group_text = text
        group = _matching(record, _description(group_text))
        assert len(group) >= 2
        (target,) = _target_indices(record)
        if region:
            row_word, col_word = region.group(1), region.group(2)
            if col_word is None:  # "in the centre" / "in the middle"
                row_word, col_word = "middle", "centre"
            cell = (("top", "middle", "bottom").index(row_word), ("left", "centre", "right").index(col_word))
            inside = [i for i in group if (_third(objects[i]["center"][1]), _third(objects[i]["center"][0])) == cell]
            assert inside == [target]
        else:
            axis, sign = next(v for k, v in _EXTREME_WORDS.items() if k in text)
            ranked = sorted(group, key=lambda i: sign * objects[i]["center"][axis])
            assert ranked[0] == target
            assert sign * (objects[ranked[1]]["center"][axis] - objects[ranked[0]]["center"][axis]) > 8
        checked += 1
    assert checked > 20


_RELATION_RE = re.compile(
    r"\b(?:to the |on the )?(left of|right of|above|higher than|below|under|beneath|closest to|nearest to|nearest"
    r"|farthest from|furthest from|most distant from) the "
)
_SIDES = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "higher than": (1, -1),
          "below": (1, 1), "under": (1, 1), "beneath": (1, 1)}


def test_relation_answers_are_unique(examples):
    checked = 0
    for _, record in examples:
        if record["family"] != "relation":
            continue
        text, objects = record["text"][0], record["objects"]
        match = _RELATION_RE.search(text)
        (anchor,) = _matching(record, _description(text[match.end():]))
        candidates = [i for i in _matching(record, _description(text[: match.start()])) if i != anchor]
        assert len(candidates) >= 2
        (target,) = _target_indices(record)
        ax, ay = objects[anchor]["center"]
        if match.group(1) in _SIDES:
            axis, sign = _SIDES[match.group(1)]
            offsets = {i: sign * (objects[i]["center"][axis] - objects[anchor]["center"][axis]) for i in candidates}
            assert [i for i in candidates if offsets[i] > 0] == [target]
            assert all(abs(v) > 8 for v in offsets.values())
        else:
            sign = 1 if match.group(1).startswith(("closest", "nearest")) else -1
            dist = {i: sign * math.hypot(objects[i]["center"][0] - ax, objects[i]["center"][1] - ay) for i in candidates}
            ranked = sorted(candidates, key=dist.get)
            assert ranked[0] == target and dist[ranked[1]] - dist[ranked[0]] > 8
        checked += 1
    assert checked > 20


# ---------------------------------------------------------------------------- reasoning text


def test_cot_is_short_tokenised_and_names_the_answer(examples):
    for _, record in examples:
        cot = record["cot"]
        tokens = cot.split()
        assert len(tokens) <= 40, cot
        assert all(re.fullmatch(r"[a-z0-9]+|[.,:]", t) for t in tokens), cot
        answer = cot[cot.rindex("answer : ") + len("answer : "):]
        assert answer.endswith(" .")
        answer = answer[:-2]
        objects = record["objects"]
        targets = _target_indices(record)
        if record["family"] == "none":
            assert answer == "none"
            continue
        if record["family"] == "multi":
            count, names = answer.split(" objects : ")
            names = names.split(" , ")
            assert int(count) == len(targets) == len(names)
        else:
            names = [answer]
        full = [" ".join((o["size"], o["color"], o["shape"])) for o in objects]
        assert sorted(names) == sorted(full[i] for i in targets)
        # Recoverable from the text: the named objects are exactly the targets.
        assert sorted(i for i, f in enumerate(full) if f in names) == sorted(targets)


def test_cot_templates(examples):
    starts = {
        "attribute": "looking for the ", "none": "there is no ", "relation": "anchor : ",
    }
    for _, record in examples:
        if record["family"] in starts:
            assert record["cot"].startswith(starts[record["family"]]), record["cot"]
        if record["family"] in ("comparison", "position") and " in the " not in record["cot"]:
            assert re.search(r" \. (largest|smallest|leftmost|rightmost|highest|lowest) is the ", record["cot"])


# ---------------------------------------------------------------------------- knowledge


def test_fact_table_is_complete():
    per_attribute = Counter(f.attribute for f in KNOWLEDGE_FACTS)
    assert per_attribute == {
        "circle": 3, "triangle": 3, "square": 2, "diamond": 2, "hexagon": 2, "star": 2,
        **{colour: 2 for colour in COLORS},
    }


def test_every_fact_and_combinations_are_used():
    rng = np.random.default_rng(11)
    used: set[str] = set()
    combined = 0
    for _ in range(700):
        query = make_query("knowledge", rng, place_objects(rng))
        if query is None:
            continue
        hits = [f for f in KNOWLEDGE_FACTS if any(c in query.text for c in f.clauses)]
        assert 1 <= len(hits) <= 2 and query.is_sentence
        combined += len(hits) == 2
        used.update(f.reason for f in hits)
    assert used == {f.reason for f in KNOWLEDGE_FACTS}
    assert combined > 50
