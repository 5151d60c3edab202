"""One interface for every segmentation data set: each loader returns a list of `Sample`s.

    load_reasonseg(folder, split=None)       ReasonSeg pairs (ShapeWorld-RS, the public ReasonSeg)
    load_refcoco(root, dataset, split_by, split)   RefCOCO / RefCOCO+ / RefCOCOg
    load_grefcoco(root, split)               gRefCOCO (multi-target and no-target refs)

A Sample gives `load_image()` (H, W, 3) uint8, `gt_mask()` (H, W) uint8 in {0, 1, 255} and
`instance_masks()` [(H, W) bool per target]. Malformed files raise `DatasetFormatError`.
"""

from training.data.reasonseg import load_reasonseg
from training.data.refcoco import load_grefcoco, load_refcoco
from training.data.sample import DatasetFormatError, Region, Rle, Sample

__all__ = ["DatasetFormatError", "Region", "Rle", "Sample", "load_grefcoco", "load_reasonseg", "load_refcoco"]
