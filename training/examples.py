"""Training examples: ReasonSeg-layout samples prepared once into model-frame tensors, and batches.

An `Example` holds the padded model-input image (uint8 [3, S, S]) and each target instance as a
soft (area-downsampled) mask on the mask-logit grid [N, 4h, 4w] and the heatmap grid [N, h, w],
both in the padded S x S frame, so losses need no resizing. Prepared splits are cached under
`cache/examples/` keyed by folder, file count and model geometry.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from segcompass.config import SegCompassConfig
from segcompass.verify import COLOURS, COLUMNS, ROWS, SHAPES, SIZES  # noqa: F401  (the naming loss's words)
from segcompass.vision import to_rgb_array

log = logging.getLogger(__name__)

CACHE_DIR = Path("cache/examples")


@dataclass
class Example:
    name: str
    pixels: torch.Tensor  # [3, S, S] uint8, image top-left, zero padding
    valid_hw: tuple[int, int]
    instruction: str
    cot: str
    family: str | None
    target_mask: torch.Tensor  # [N, 4h, 4w] float16 soft targets in the padded frame
    target_heat: torch.Tensor  # [N, h, w] float16
    boxes: str  # "box : x0 y0 x1 y1 ..." words for the box_text baseline ("" when no target)
    token_labels: torch.Tensor | None = None  # [Nv, 5] long (colour, shape, size, row, column) of the object
    # under each visual token, -100 where none (ShapeWorld only: the perception and naming losses of the SFT)


@dataclass
class Batch:
    pixels_uint8: torch.Tensor  # [B, 3, S, S] uint8, as stored
    valid_hw: list[tuple[int, int]]
    examples: list[Example]
    packed: dict = field(default_factory=dict)  # head -> the reference completions packed (`packed_reference`)

    @property
    def pixels(self) -> torch.Tensor:
        """[B, 3, S, S] float in [0, 1] on the host."""
        return unit_pixels(self.pixels_uint8)

    def pixels_on(self, device) -> torch.Tensor:
        """`pixels` made on `device`: the uint8 batch is copied and converted there (on a GPU the host never
        writes the float batch, 100 MB at 128 smol scenes and most of a batch's host time; `bench.host_batch`)."""
        return unit_pixels(self.pixels_uint8.to(device))

    @property
    def target_mask(self) -> list[torch.Tensor]:
        return [e.target_mask.float() for e in self.examples]

    @property
    def target_heat(self) -> list[torch.Tensor]:
        return [e.target_heat.float() for e in self.examples]


def fallback_cot(sample) -> str:
    """Data sets without reference reasoning get a minimal one (the query restated)."""
    return f"looking for {sample.texts[0].lower().rstrip('?.!')} ."


def _area(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-average resize of a 2-D float array (reshape-mean when the factor is an integer)."""
    H, W = m.shape
    if H % size[0] == 0 and W % size[1] == 0:
        return m.reshape(size[0], H // size[0], size[1], W // size[1]).mean(axis=(1, 3))
    t = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode="area")[0, 0].numpy()


def _to_frame(mask_HW: np.ndarray, valid_hw: tuple[int, int], S: int, grid: int) -> np.ndarray:
    """A full-resolution bool mask -> soft mask on a grid x grid lattice of the padded S x S frame."""
    vh, vw = max(1, round(valid_hw[0] * grid / S)), max(1, round(valid_hw[1] * grid / S))
    out = np.zeros((grid, grid), np.float32)
    out[:vh, :vw] = _area(mask_HW.astype(np.float32), (vh, vw))
    return out


def _prepare_pixels(image: np.ndarray, S: int) -> tuple[np.ndarray, tuple[int, int]]:
    """segcompass.vision.prepare_image in uint8: resize the longest side to S (bilinear), pad."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = S / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = image if (nh, nw) == (h, w) else np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    out = np.zeros((3, S, S), np.uint8)
    out[:, :nh, :nw] = np.asarray(resized).transpose(2, 0, 1)
    return out, (nh, nw)


def token_labels(sample, valid_hw: tuple[int, int], S: int, grid: int) -> torch.Tensor | None:
    """(colour, shape, size, row, column) class of the object covering each visual token's patch,
    [grid*grid, 5] (row / column: the third of the image its centre lies in);
    a patch is labelled with the object of largest overlap when it covers >= 20% of the patch or
    >= 40% of the object; -100 elsewhere. None without ShapeWorld `objects`."""
    import skimage.draw

    if not sample.objects:
        return None
    H, W = sample.size()
    labels = torch.full((grid * grid, 5), -100, dtype=torch.long)
    best = np.zeros((grid, grid), np.float32)
    for obj in sample.objects:
        try:
            cx, cy = (float(v) for v in obj["center"])
            cls = (COLOURS.index(obj["color"]), SHAPES.index(obj["shape"]), SIZES.index(obj["size"]),
                   min(2, max(0, int(3 * cy / H))), min(2, max(0, int(3 * cx / W))))
        except (KeyError, ValueError, TypeError):
            continue
        pts = np.asarray(obj["points"], dtype=np.float64)
        m = np.zeros((H, W), np.float32)
        rr, cc = skimage.draw.polygon(pts[:, 1], pts[:, 0], shape=(H, W))
        m[rr, cc] = 1
        frame = _to_frame(m > 0, valid_hw, S, grid)  # share of each patch covered
        share_of_object = frame / max(frame.sum(), 1e-6)
        ok = ((frame >= 0.2) | (share_of_object >= 0.4)) & (frame > best)
        best = np.where(ok, frame, best)
        labels[torch.from_numpy(ok.flatten())] = torch.tensor(cls)
    return labels


def prepare_example(sample, config: SegCompassConfig) -> Example:
    from segcompass.baselines import box_words

    S, h = config.vision.image_size, config.vision.feature_grid
    pixels, valid_hw = _prepare_pixels(to_rgb_array(sample.load_image()), S)
    inst = sample.instance_masks()
    masks = np.stack([_to_frame(m, valid_hw, S, 4 * h) for m in inst]) if inst else np.zeros((0, 4 * h, 4 * h))
    heats = np.stack([_to_frame(m, valid_hw, S, h) for m in inst]) if inst else np.zeros((0, h, h))
    boxes = " ".join(w for w in (box_words(m, valid_hw, S) for m in inst[: config.codebook.num_slots]) if w)
    return Example(
        name=sample.name, pixels=torch.from_numpy(pixels), valid_hw=valid_hw,
        instruction=" ".join(sample.texts[0].split()), cot=sample.cot or fallback_cot(sample), family=sample.family,
        target_mask=torch.from_numpy(masks.astype(np.float16)), target_heat=torch.from_numpy(heats.astype(np.float16)),
        boxes=boxes, token_labels=token_labels(sample, valid_hw, S, config.vision.token_grid),
    )


def load_examples(folder: str | Path, split: str | None, config: SegCompassConfig, limit: int | None = None,
                  cache: bool = True) -> list[Example]:
    """Load (and cache) the prepared examples of a ReasonSeg split."""
    from training.data.loaders import load_reasonseg

    samples = load_reasonseg(folder, split)
    if limit is not None:
        samples = samples[:limit]
    key = hashlib.sha1(
        f"{Path(folder).resolve()}|{split}|{len(samples)}|{samples[-1].name if samples else ''}|"
        f"{config.vision.image_size}|{config.vision.feature_grid}|{config.codebook.num_slots}|v3".encode()
    ).hexdigest()[:16]
    path = CACHE_DIR / f"{key}.pt"
    if cache and not path.is_file():
        examples = _prepare_all(samples, config, f"prepare {split or folder}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save([e.__dict__ for e in examples], tmp)
        tmp.replace(path)
        del examples  # reloaded below, memory-mapped
    if cache:
        # Memory-mapped: tensors are read from the file when used and their pages can be dropped again, so
        # 30,000 smol scenes (7.1 GB) no longer sit in RAM (a 10,000-scene cache: RSS 0.31 GB after loading).
        data = torch.load(path, weights_only=True, mmap=True)
        return [Example(**{**d, "valid_hw": tuple(d["valid_hw"])}) for d in data]
    return _prepare_all(samples, config, f"prepare {split or folder}")


_TENSOR_FIELDS = ("pixels", "target_mask", "target_heat", "token_labels")


def _prepare_numpy(args) -> dict:
    """prepare_example in a worker process; tensors travel back as numpy arrays (plain pickling,
    no shared-memory file descriptors)."""
    sample, config = args
    d = dict(prepare_example(sample, config).__dict__)
    for k in _TENSOR_FIELDS:
        if d[k] is not None:
            d[k] = d[k].numpy()
    return d


def _prepare_all(samples, config: SegCompassConfig, desc: str, min_parallel: int = 512) -> list[Example]:
    """Prepare every sample, on all CPU cores when there are many (one process per core, forked)."""
    import multiprocessing as mp
    import os

    from tqdm import tqdm

    workers = min(len(os.sched_getaffinity(0)), 32)
    if workers < 2 or len(samples) < min_parallel:
        return [prepare_example(s, config) for s in tqdm(samples, desc=desc, unit="ex")]
    with mp.get_context("fork").Pool(workers) as pool:
        out = []
        for d in tqdm(pool.imap(_prepare_numpy, ((s, config) for s in samples), chunksize=64),
                      total=len(samples), desc=desc, unit="ex"):
            for k in _TENSOR_FIELDS:
                if d[k] is not None:
                    d[k] = torch.from_numpy(d[k])
            out.append(Example(**d))
    return out


def unit_pixels(pixels_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [0, 1], what the vision encoder takes."""
    return pixels_uint8.float() / 255.0


def stack_pixels(examples) -> torch.Tensor:
    """[B, 3, S, S] float in [0, 1] from the examples' uint8 pixels."""
    return unit_pixels(torch.stack([e.pixels for e in examples]))


def collate(examples: list[Example]) -> Batch:
    return Batch(
        pixels_uint8=torch.stack([e.pixels for e in examples]),
        valid_hw=[e.valid_hw for e in examples], examples=list(examples),
    )


def completion_cot(example: Example, head: str) -> str:
    """The reference reasoning a head is taught: box_text appends its boxes before </think>."""
    if head == "box_text" and example.boxes:
        return f"{example.cot} {example.boxes}"
    return example.cot


def pack_reference(model, examples: list[Example], head: str):
    """The language model's packed prompts + reference completions (`completion_cot`) of `examples`:
    what teacher forcing, the refit's state cache and the step benchmark feed it."""
    lang = model.language
    return lang.pack([lang.build_prompt(e.instruction, model.num_visual) for e in examples],
                     [lang.encode_completion(completion_cot(e, head)) for e in examples])


def packed_reference(model, batch: Batch, head: str):
    """`pack_reference` of a batch's examples, made once per batch and head (a prefetching thread may have made it)."""
    if head not in batch.packed:
        batch.packed[head] = pack_reference(model, batch.examples, head)
    return batch.packed[head]


def corpus(examples: list[Example]) -> list[str]:
    """Texts the tiny word-level tokenizer is built from."""
    return [e.instruction for e in examples] + [e.cot for e in examples]
