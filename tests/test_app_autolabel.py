"""Automatic concept labels: patch properties from ShapeWorld objects, scoring, the command end to end."""

from __future__ import annotations

import numpy as np
import pytest

from app.autolabel import Scan, label_concepts, main, patch_properties
from app.labels import LabelStore, checkpoint_fingerprint
from tests.test_app import app_checkpoint  # noqa: F401 - shared fixture


def square(color, shape, size, x0, y0, x1, y1):
    return {"color": color, "shape": shape, "size": size, "points": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]}


def test_patch_properties_name_objects_background_and_thirds():
    objects = [square("red", "square", "large", 0, 0, 40, 40)]
    boxes = np.array([[0, 0, 32, 32], [224, 224, 256, 256], [32, 32, 64, 64]], float)
    props = patch_properties(objects, boxes, (256, 256))
    assert {"image: red object", "image: square", "image: large object", "image: top left"} <= props[0]
    assert "image: background" in props[1] and "image: bottom right" in props[1]
    assert "image: red object" not in props[2] and "image: background" not in props[2]  # 8x8 of 32x32 < 1/5


def test_label_concepts_picks_the_property_the_activation_predicts():
    # 10 tokens; concept 0 fires exactly on the "red" tokens, concept 1 on every token, concept 2 twice.
    props = {"image: red object": [0, 1, 2], "image: any patch": list(range(6)), 'text: "red"': [6, 7, 8],
             "text: CoT token": [6, 7, 8, 9]}
    rows = [0, 1, 2] + list(range(10)) + [4, 9]
    cols = [0, 0, 0] + [1] * 10 + [2, 2]
    vals = [1.0, 2.0, 3.0] + [0.5] * 10 + [1.0, 1.0]
    labels = {f: (label, score, stats) for f, label, score, stats in
              label_concepts(Scan(rows, cols, vals, 10, props, 4), min_active=3)}
    assert labels[0][0] == "image: red object" and labels[0][1] == pytest.approx(1.0)
    assert labels[0][2]["precision_at_k"] == 1.0 and labels[0][2]["precision"] == 1.0
    assert labels[1][0] == "image: any patch" and labels[1][1] < 1.0  # the broadest property, not perfect
    assert 2 not in labels  # active on fewer than min_active tokens


def test_autolabel_command_stores_labels_with_provenance(app_checkpoint, tmp_path):  # noqa: F811
    from training.data.shapeworld import generate_split

    generate_split(tmp_path / "sw", "val", 6, seed=0)
    db = tmp_path / "labels.sqlite"
    rc = main(["--checkpoint", str(app_checkpoint), "--data", str(tmp_path / "sw"), "--split", "val",
               "--limit", "6", "--db", str(db), "--batch-size", "3"])
    assert rc == 0
    store = LabelStore(db)
    labels = store.labels(checkpoint_fingerprint(app_checkpoint))
    assert labels
    lab = next(iter(labels.values()))
    assert lab.auto_label and 0.0 <= lab.auto_score <= 1.0 and lab.human_label is None
    assert lab.provenance["examples"] == 6 and lab.provenance["metric"] == "f1" and "precision_at_k" in lab.provenance
    assert store.search(checkpoint_fingerprint(app_checkpoint), lab.auto_label.split()[-1].strip('"'))
    # A human label survives a new automatic run.
    store.rename(checkpoint_fingerprint(app_checkpoint), lab.concept, "kept by hand")
    assert main(["--checkpoint", str(app_checkpoint), "--data", str(tmp_path / "sw"), "--split", "val",
                 "--limit", "3", "--db", str(db)]) == 0
    again = store.get(checkpoint_fingerprint(app_checkpoint), lab.concept)
    assert again.human_label == "kept by hand" and again.auto_label
    assert any(x.provenance["examples"] == 3 for x in store.labels(checkpoint_fingerprint(app_checkpoint)).values())
    assert main(["--checkpoint", str(tmp_path / "missing"), "--data", str(tmp_path / "sw"), "--db", str(db)]) == 2
