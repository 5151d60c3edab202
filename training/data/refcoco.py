"""Readers for RefCOCO / RefCOCO+ / RefCOCOg (REFER's refs pickles) and gRefCOCO (grefs JSON).

Layout (that of REFER / LISA's `refer_seg` folder):

    root/<dataset>/refs(<split_by>).p + root/<dataset>/instances.json   (refcoco, refcoco+, refcocog)
    root/grefcoco/grefs(unc).json + root/grefcoco/instances.json
    root/images/<COCO file_name>                                         (e.g. COCO_train2014_….jpg)

One Sample per referring expression (ref): `texts` holds all its sentences, which describe
the same target. The usual RefCOCO metric counts every sentence as an example, so an
evaluator should predict and score once per entry of `texts`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from training.data.coco import CocoInstances, load_instances, load_plain_pickle
from training.data.sample import Sample, fail, load_json

log = logging.getLogger(__name__)

REFCOCO_DATASETS = ("refcoco", "refcoco+", "refcocog")


def _sentences(path: Path, ref: dict[str, Any]) -> tuple[str, ...]:
    try:
        texts = tuple(str(s["sent"] if "sent" in s else s["raw"]) for s in ref["sentences"])
    except (KeyError, TypeError) as err:
        fail(path, f"ref {ref.get('ref_id')} has malformed sentences ({err!r})")
    if not texts:
        fail(path, f"ref {ref.get('ref_id')} has no sentences")
    return texts


def _build_samples(
    refs: Any,
    refs_path: Path,
    instances: CocoInstances,
    image_dir: Path,
    split: str,
    prefix: str,
    target_ids: Callable[[dict[str, Any]], list[int]],
) -> list[Sample]:
    """Samples of the refs in `split`; `target_ids(ref)` lists its target annotation ids."""
    if not isinstance(refs, list) or not all(isinstance(r, dict) for r in refs):
        fail(refs_path, "expected a list of refs (dicts)")
    try:
        chosen = [r for r in refs if r["split"] == split]
    except KeyError as err:
        fail(refs_path, f"a ref lacks the key {err}")
    if not chosen:
        splits = sorted({str(r["split"]) for r in refs})
        raise ValueError(f"{refs_path}: no refs in split {split!r}; available splits: {splits}")
    samples = []
    for ref in chosen:
        try:
            ref_id, image_id, ann_ids = ref["ref_id"], ref["image_id"], target_ids(ref)
        except (KeyError, TypeError, ValueError) as err:
            fail(refs_path, f"ref {ref.get('ref_id')} is malformed ({err!r})")
        image = instances.images.get(image_id)
        if image is None:
            fail(instances.path, f"no image with id {image_id} (needed by ref {ref_id} of {refs_path.name})")
        samples.append(Sample(
            name=f"{prefix}_{split}_{ref_id}",
            image_path=str(image_dir / image.file_name),
            texts=_sentences(refs_path, ref),
            is_sentence=False,
            regions=tuple(instances.region(a) for a in ann_ids),
            image_size=image.size,
        ))
    log.info("loaded %d %s %s refs", len(samples), prefix, split)
    return samples


def load_refcoco(
    root: str | Path,
    dataset: str = "refcoco",
    split_by: str | None = None,
    split: str = "val",
    image_dir: str | Path | None = None,
) -> list[Sample]:
    """RefCOCO-family refs of one split, one target each.

    `split_by` names the refs file: "unc" (refcoco, refcoco+) or "umd"/"google" (refcocog);
    None picks "umd" for refcocog, else "unc". `split`: "train", "val", "testA", "testB", "test".
    `image_dir` defaults to root/images.
    """
    if dataset not in REFCOCO_DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {REFCOCO_DATASETS}")
    split_by = split_by or ("umd" if dataset == "refcocog" else "unc")
    root = Path(root)
    refs_path = root / dataset / f"refs({split_by}).p"
    if not refs_path.exists():
        raise FileNotFoundError(f"refs file not found: {refs_path}")
    refs = load_plain_pickle(refs_path)
    instances = load_instances(root / dataset / "instances.json")
    return _build_samples(refs, refs_path, instances, Path(image_dir or root / "images"), split, dataset,
                          lambda ref: [int(ref["ann_id"])])


def _gref_targets(ref: dict[str, Any]) -> list[int]:
    """gRefCOCO target ids: `ann_id` is a list (or one id); [-1] or `no_target` means none."""
    if ref.get("no_target", False):
        return []
    ids = ref["ann_id"] if isinstance(ref["ann_id"], list) else [ref["ann_id"]]
    return [int(a) for a in ids if int(a) >= 0]


def load_grefcoco(root: str | Path, split: str = "val", image_dir: str | Path | None = None) -> list[Sample]:
    """gRefCOCO refs of one split: several targets, one, or none (an empty `regions`)."""
    root = Path(root)
    refs_path = root / "grefcoco" / "grefs(unc).json"
    refs = load_json(refs_path)
    instances = load_instances(root / "grefcoco" / "instances.json")
    return _build_samples(refs, refs_path, instances, Path(image_dir or root / "images"), split, "grefcoco",
                          _gref_targets)
