"""Data set loaders on tiny fixture files written in the real formats."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import skimage.draw
from PIL import Image

from training.data.loaders import DatasetFormatError, load_grefcoco, load_reasonseg, load_refcoco
from training.data.sample import Rle

H, W = 40, 60


def _write_image(path: Path, height: int = H, width: int = W) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), 120, dtype=np.uint8)).save(path)


def _polygon_mask(xy: list[tuple[float, float]], height: int = H, width: int = W) -> np.ndarray:
    p = np.asarray(xy, dtype=float)
    out = np.zeros((height, width), dtype=bool)
    out[skimage.draw.polygon(p[:, 1], p[:, 0], shape=(height, width))] = True
    return out


def _runs(mask: np.ndarray) -> list[int]:
    """COCO uncompressed RLE runs (column-major, starting with zeros)."""
    flat = mask.T.reshape(-1)
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    return [0] + runs if flat[0] else runs


def _compress(runs: list[int]) -> str:
    """pycocotools' rleToString, transcribed."""
    out = []
    for i, x in enumerate(runs):
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            out.append(chr(c + 48 + (0x20 if more else 0)))
    return "".join(out)


SQUARE = [(5, 5), (25, 5), (25, 25), (5, 25)]
BIG = [(2, 2), (40, 2), (40, 35), (2, 35)]
FAR = [(45, 10), (55, 10), (55, 20), (45, 20)]
TRIANGLE = [(30, 30), (50, 30), (40, 38)]


# ---------------------------------------------------------------------------- ReasonSeg


def _pair(folder: Path, name: str, record: dict) -> None:
    _write_image(folder / f"{name}.jpg")
    (folder / f"{name}.json").write_text(json.dumps(record))


def _shape(label: str, xy) -> dict:
    return {"label": label, "points": [list(p) for p in xy], "shape_type": "polygon"}


def test_reasonseg_labels_paint_target_ignore_and_skip_flag(tmp_path):
    _pair(tmp_path, "a", {
        "text": ["what would you sit on?", "the chair"], "is_sentence": True,
        "shapes": [_shape("target", SQUARE), _shape("ignore_1", BIG), _shape("flag", FAR)],
    })
    (sample,) = load_reasonseg(tmp_path)
    assert sample.name == "a" and sample.texts == ("what would you sit on?", "the chair") and sample.is_sentence
    assert sample.family is None and sample.cot is None and sample.objects is None
    assert sample.load_image().shape == (H, W, 3) and sample.load_image().dtype == np.uint8
    gt = sample.gt_mask()
    assert gt.shape == (H, W) and gt.dtype == np.uint8
    square, big = _polygon_mask(SQUARE), _polygon_mask(BIG)
    assert (gt[square] == 1).all()  # smaller target painted after the larger ignore region
    assert (gt[big & ~square] == 255).all()
    assert (gt[~big] == 0).all()  # the flag region is not painted
    (instance,) = sample.instance_masks()
    assert instance.dtype == bool and (instance == square).all()


def test_reasonseg_reads_shapeworld_extras_and_empty_targets(tmp_path):
    _pair(tmp_path, "n", {
        "text": ["the purple star"], "is_sentence": False, "shapes": [], "family": "none",
        "objects": [{"shape": "circle"}], "cot": "there is no purple star . answer : none .",
    })
    (sample,) = load_reasonseg(tmp_path)
    assert sample.family == "none" and sample.cot.endswith("none .") and sample.objects == ({"shape": "circle"},)
    assert not sample.gt_mask().any() and sample.instance_masks() == []


def test_reasonseg_split_folders(tmp_path):
    for split in ("train", "val"):
        _pair(tmp_path / split, "x", {"text": [split], "is_sentence": False, "shapes": [_shape("target", SQUARE)]})
    with pytest.raises(ValueError, match=r"\['train', 'val'\]"):
        load_reasonseg(tmp_path)
    assert load_reasonseg(tmp_path, split="val")[0].texts == ("val",)


@pytest.mark.parametrize("content", [
    "{not json",
    json.dumps({"text": ["q"], "is_sentence": False}),  # no shapes
    json.dumps({"text": ["q"], "is_sentence": "no", "shapes": []}),
    json.dumps({"text": [], "is_sentence": False, "shapes": []}),
    json.dumps({"text": ["q"], "is_sentence": False, "shapes": [{"label": "target", "points": [1, 2, 3]}]}),
    json.dumps({"text": ["q"], "is_sentence": False, "shapes": [{"points": [[1, 2], [3, 4], [5, 1]]}]}),
])
def test_reasonseg_malformed_json_names_the_file(tmp_path, content):
    _write_image(tmp_path / "bad.jpg")
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(DatasetFormatError, match="bad.json"):
        load_reasonseg(tmp_path)


def test_reasonseg_missing_or_unreadable_image(tmp_path):
    (tmp_path / "lone.json").write_text(json.dumps({"text": ["q"], "is_sentence": False, "shapes": []}))
    with pytest.raises(DatasetFormatError, match="lone.json"):
        load_reasonseg(tmp_path)
    (tmp_path / "lone.jpg").write_bytes(b"this is not a jpeg")
    (sample,) = load_reasonseg(tmp_path)
    with pytest.raises(DatasetFormatError, match="lone.jpg"):
        sample.load_image()


# ---------------------------------------------------------------------------- COCO RLE


def test_compressed_rle_decodes_a_hand_worked_string():
    # runs 5, 3, 7, 2: the fourth is stored as 2 - 3 = -1, one 5-bit group 31 -> chr(79) "O".
    assert Rle("537O", (17, 1)).decode()[:, 0].tolist() == [False] * 5 + [True] * 3 + [False] * 7 + [True] * 2


def test_rle_round_trips_through_both_encodings():
    rng = np.random.default_rng(0)
    mask = np.zeros((H, W), dtype=bool)
    mask[3:30, 10:50] = rng.random((27, 40)) < 0.6
    runs = _runs(mask)
    assert (Rle(tuple(runs), (H, W)).decode() == mask).all()
    assert (Rle(_compress(runs), (H, W)).decode() == mask).all()


# ---------------------------------------------------------------------------- RefCOCO / gRefCOCO


def _coco_root(tmp_path: Path, dataset: str) -> tuple[Path, dict[int, np.ndarray]]:
    """instances.json with a polygon, an uncompressed-RLE and a compressed-RLE annotation."""
    root = tmp_path / "refer"
    _write_image(root / "images" / "COCO_train2014_000000000001.jpg")
    _write_image(root / "images" / "COCO_train2014_000000000002.jpg", 30, 20)
    rle_mask = _polygon_mask(TRIANGLE)
    small = np.zeros((30, 20), dtype=bool)
    small[5:12, 3:9] = True
    flat = [c for p in SQUARE for c in p]
    instances = {
        "images": [
            {"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": H, "width": W},
            {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "height": 30, "width": 20},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "segmentation": [flat], "iscrowd": 0, "category_id": 1},
            {"id": 11, "image_id": 1, "segmentation": {"counts": _runs(rle_mask), "size": [H, W]}, "iscrowd": 1},
            {"id": 12, "image_id": 2, "segmentation": {"counts": _compress(_runs(small)), "size": [30, 20]}},
        ],
        "categories": [{"id": 1, "name": "person"}],
    }
    (root / dataset).mkdir(parents=True, exist_ok=True)
    (root / dataset / "instances.json").write_text(json.dumps(instances))
    return root, {10: _polygon_mask(SQUARE), 11: rle_mask, 12: small}


def _ref(ref_id: int, image_id: int, ann_id, split: str, *sents: str, **extra) -> dict:
    return {
        "ref_id": ref_id, "image_id": image_id, "ann_id": ann_id, "split": split, "category_id": 1,
        "file_name": f"COCO_train2014_{image_id:012d}_{ref_id}.jpg",
        "sentences": [{"raw": s.upper(), "sent": s, "tokens": s.split(), "sent_id": k} for k, s in enumerate(sents)],
        "sent_ids": list(range(len(sents))), **extra,
    }


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_refcoco_polygon_and_rle_instances(tmp_path, protocol):
    root, masks = _coco_root(tmp_path, "refcoco")
    refs = [
        _ref(0, 1, 10, "val", "left square", "the square"),
        _ref(1, 1, 11, "val", "triangle"),
        _ref(2, 2, 12, "val", "small box"),
        _ref(3, 1, 10, "train", "training only"),
    ]
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=protocol))
    samples = load_refcoco(root, "refcoco", "unc", "val")
    assert [s.texts for s in samples] == [("left square", "the square"), ("triangle",), ("small box",)]
    for sample, ann in zip(samples, (10, 11, 12)):
        (instance,) = sample.instance_masks()
        assert (instance == masks[ann]).all()
        assert (sample.gt_mask() == masks[ann]).all()
        assert sample.load_image().shape[:2] == masks[ann].shape
    assert samples[0].image_path.endswith("images/COCO_train2014_000000000001.jpg")
    with pytest.raises(ValueError, match="available splits"):
        load_refcoco(root, "refcoco", "unc", "testA")


def _python2_pickle(obj) -> bytes:
    """Protocol-2 bytes as Python 2 wrote them: str as SHORT_BINSTRING (REFER's refs files)."""
    out = bytearray(b"\x80\x02")

    def emit(o) -> None:
        if isinstance(o, dict):
            out.extend(b"}")  # EMPTY_DICT
            for k, v in o.items():
                emit(k)
                emit(v)
                out.extend(b"s")  # SETITEM
        elif isinstance(o, list):
            out.extend(b"]")  # EMPTY_LIST
            for v in o:
                emit(v)
                out.extend(b"a")  # APPEND
        elif isinstance(o, str):
            data = o.encode()
            out.extend(b"U" + bytes([len(data)]) + data)  # SHORT_BINSTRING
        else:
            out.extend(b"J" + int(o).to_bytes(4, "little", signed=True))  # BININT

    emit(obj)
    return bytes(out + b".")


def test_refcoco_reads_python2_pickles(tmp_path):
    root, masks = _coco_root(tmp_path, "refcocog")
    (root / "refcocog" / "refs(umd).p").write_bytes(_python2_pickle([_ref(7, 1, 11, "test", "a caf\u00e9 sign")]))
    (sample,) = load_refcoco(root, "refcocog", split="test")
    assert sample.texts == ("a caf\u00e9 sign",) and sample.name == "refcocog_test_7"
    assert (sample.gt_mask() == masks[11]).all()


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {_Exploit.target}",))


def test_refcoco_refuses_a_malicious_pickle(tmp_path):
    root, _ = _coco_root(tmp_path, "refcoco")
    _Exploit.target = tmp_path / "pwned"
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps([_Exploit()]))
    with pytest.raises(DatasetFormatError, match=r"refs\(unc\)\.p.*(posix|nt)\.system"):
        load_refcoco(root)
    assert not (tmp_path / "pwned").exists()


def test_refcoco_refuses_any_class_even_harmless_ones(tmp_path):
    import collections

    root, _ = _coco_root(tmp_path, "refcoco")
    (root / "refcoco" / "refs(unc).p").write_bytes(pickle.dumps(collections.OrderedDict(a=1)))
    with pytest.raises(DatasetFormatError, match="OrderedDict"):
        load_refcoco(root)


def test_refcoco_malformed_files_name_themselves(tmp_path):
    root, _ = _coco_root(tmp_path, "refcoco+")
    (root / "refcoco+" / "refs(unc).p").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DatasetFormatError, match=r"refs\(unc\)\.p"):
        load_refcoco(root, "refcoco+")
    (root / "refcoco+" / "refs(unc).p").write_bytes(pickle.dumps([{"ref_id": 0, "split": "val"}]))
    with pytest.raises(DatasetFormatError, match=r"refs\(unc\)\.p"):
        load_refcoco(root, "refcoco+")
    (root / "refcoco+" / "refs(unc).p").write_bytes(pickle.dumps([_ref(0, 1, 99, "val", "ghost")]))
    with pytest.raises(DatasetFormatError, match="instances.json"):
        load_refcoco(root, "refcoco+")
    (root / "refcoco+" / "instances.json").write_text(json.dumps({"annotations": []}))
    with pytest.raises(DatasetFormatError, match="instances.json"):
        load_refcoco(root, "refcoco+")


def test_grefcoco_multi_single_and_no_target(tmp_path):
    root, masks = _coco_root(tmp_path, "grefcoco")
    grefs = [
        _ref(0, 1, [10, 11], "val", "both shapes"),
        _ref(1, 1, [-1], "val", "the dog", no_target=True),
        _ref(2, 2, [12], "val", "the box", no_target=False),
        _ref(3, 1, [11], "testA", "other split"),
    ]
    (root / "grefcoco" / "grefs(unc).json").write_text(json.dumps(grefs))
    multi, empty, single = load_grefcoco(root, "val")
    assert len(multi.instance_masks()) == 2
    assert (multi.gt_mask() == (masks[10] | masks[11])).all()
    assert empty.regions == () and empty.instance_masks() == [] and not empty.gt_mask().any()
    assert empty.gt_mask().shape == (H, W)
    assert (single.gt_mask() == masks[12]).all()


def test_grefcoco_malformed_json_names_the_file(tmp_path):
    root, _ = _coco_root(tmp_path, "grefcoco")
    (root / "grefcoco" / "grefs(unc).json").write_text("[{")
    with pytest.raises(DatasetFormatError, match=r"grefs\(unc\)\.json"):
        load_grefcoco(root)


def test_reasonseg_reads_shapeworld_output(tmp_path):
    from training.data.shapeworld import generate_split

    generate_split(tmp_path, "val", 4, seed=0)
    samples = load_reasonseg(tmp_path, split="val")
    assert [s.name for s in samples] == [f"val_{i:06d}" for i in range(4)]
    for sample in samples:
        record = json.loads(Path(sample.image_path).with_suffix(".json").read_text())
        expected = np.zeros((256, 256), dtype=bool)
        for shape in record["shapes"]:
            expected |= _polygon_mask([tuple(p) for p in shape["points"]], 256, 256)
        assert (sample.gt_mask() == expected).all()
        assert len(sample.instance_masks()) == len(record["shapes"])
        assert sample.family == record["family"] and sample.cot == record["cot"]
        assert len(sample.objects) == len(record["objects"])
