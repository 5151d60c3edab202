"""Automatic concept labels: scan ShapeWorld with a checkpoint, name each concept by what it fires on.

    python -m app.autolabel --checkpoint DIR --data data/shapeworld --split val --limit 200 [--db PATH]

Every token of every scanned example gets properties that are known to be true of it:
- a visual token (image patch): the colour, shape and size of each ShapeWorld object covering at
  least a fifth of the patch ("image: red object", "image: circle", "image: large object"), or
  "image: background"; the third of the image it sits in ("image: top left"); "image: any patch";
- a text token: its word ('text: "red"') and where it is ("text: CoT token", "text: instruction token").
For each concept, the candidate labels are the properties of its top-activating tokens; each is
scored over all scanned tokens by how well "the concept fires" (activation > 0) and "the label is
true" agree: F1 of precision (fires -> label true) and recall (label true -> fires). AUROC of the
graded activation and precision at k (the share of the concept's k strongest tokens with the
property) are stored beside it. (Choosing by AUROC x precision@k instead was tried on a trained
tiny checkpoint: it named most concepts by where they sit, "CoT token" / "background", where F1
finds words like "large", "green", "star".) The best candidate is stored with its F1 as the score
and provenance, keyed by the checkpoint's
fingerprint. Human labels typed in the explorer are kept.

`--source reference` (default) teacher-forces the data set's reference CoT (fast, batched);
`--source generated` lets the model write its own CoT (what the explorer shows; slower).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("app.autolabel")

MIN_PATCH_COVER = 0.2  # an object "is in" a patch when it covers this fraction of the patch
BACKGROUND_COVER = 0.02  # a patch is background when no object covers more than this
MIN_WORD_COUNT = 3  # words seen fewer times are not label candidates
TOP_TOKENS = 25  # candidate labels come from a concept's strongest tokens
ROWS, COLS = ("top", "middle", "bottom"), ("left", "centre", "right")


@dataclass
class Scan:
    """The activations and token properties of a scan. N tokens, F concepts."""

    rows: list[int]  # COO of the non-zero codes
    cols: list[int]
    vals: list[float]
    n_tokens: int
    props: dict[str, list[int]]  # property -> token indices where it holds
    d_sae: int

    def matrix(self):
        import scipy.sparse as sp

        return sp.csc_matrix((self.vals, (self.rows, self.cols)), shape=(self.n_tokens, self.d_sae))


def object_masks(objects, height: int, width: int) -> list[np.ndarray]:
    from skimage.draw import polygon

    masks = []
    for o in objects:
        pts = np.asarray(o["points"], dtype=float)
        m = np.zeros((height, width), bool)
        rr, cc = polygon(pts[:, 1], pts[:, 0], (height, width))
        m[rr, cc] = True
        masks.append(m)
    return masks


def patch_properties(objects, boxes_V4: np.ndarray, size: tuple[int, int]) -> list[set[str]]:
    """The properties of each visual token's patch (boxes in image pixels)."""
    H, W = size
    masks = object_masks(objects or [], H, W)
    out = []
    for x0, y0, x1, y1 in boxes_V4:
        xa, xb = int(max(0, np.floor(x0))), int(min(W, np.ceil(x1)))
        ya, yb = int(max(0, np.floor(y0))), int(min(H, np.ceil(y1)))
        area = max(1, (xb - xa) * (yb - ya))
        props = {"image: any patch"}
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        props.add(f"image: {ROWS[min(2, int(3 * cy / H))]} {COLS[min(2, int(3 * cx / W))]}")
        best = 0.0
        for o, m in zip(objects or [], masks):
            cover = m[ya:yb, xa:xb].sum() / area
            best = max(best, cover)
            if cover >= MIN_PATCH_COVER:
                props |= {f"image: {o['color']} object", f"image: {o['shape']}", f"image: {o['size']} object",
                          "image: any object"}
        if best <= BACKGROUND_COVER:
            props.add("image: background")
        out.append(props)
    return out


def word_of(token: str) -> str:
    return token.strip().lower()


def scan(model, samples, source: str = "reference", batch_size: int = 16) -> Scan:
    """Run the model over the samples; collect non-zero codes and token properties."""
    import torch
    from tqdm import tqdm

    from segcompass.records import TokenRole
    from segcompass.vision import patch_boxes

    lang, cfg = model.language, model.config.vision
    rows, cols, vals = [], [], []
    props: dict[str, list[int]] = defaultdict(list)
    n = 0

    def add(codes_TF, roles_T, tokens, prep, objects):
        nonlocal n
        nz = codes_TF.nonzero()
        rows.extend((nz[:, 0] + n).tolist())
        cols.extend(nz[:, 1].tolist())
        vals.extend(codes_TF[nz[:, 0], nz[:, 1]].tolist())
        boxes = patch_boxes(cfg.token_grid, cfg.image_size, prep.valid_hw, prep.original_size).numpy()
        visual = patch_properties(objects, boxes, prep.original_size)
        v = 0
        for t, role in enumerate(roles_T.tolist()):
            if role == TokenRole.VISUAL:
                here = visual[v] if v < len(visual) else set()
                v += 1
            elif role in (TokenRole.COT, TokenRole.INSTRUCTION):
                here = {f'text: "{word_of(tokens[t])}"',
                        "text: CoT token" if role == TokenRole.COT else "text: instruction token"}
            else:
                here = {f'text: "{word_of(tokens[t])}"'} if tokens[t].strip() else set()
            for p in here:
                props[p].append(n + t)
        n += len(roles_T)

    with torch.no_grad():
        for start in tqdm(range(0, len(samples), batch_size), desc="scanning", unit="batch"):
            chunk = samples[start: start + batch_size]
            images = [s.load_image() for s in chunk]
            preps = [model.prepare(im) for im in images]
            if source == "generated":
                for s, im, prep in zip(chunk, images, preps):
                    trace = model.encode(im, s.texts[0])
                    add(trace.dense_codes(), trace.roles, trace.tokens, prep, s.objects)
                continue
            prompts = [lang.build_prompt(" ".join(s.texts[0].split()), model.num_visual) for s in chunk]
            batch = lang.pack(prompts, [lang.encode_completion(s.cot or "") for s in chunk])
            tokens, _ = model.vision(torch.stack([p.pixels for p in preps]))
            embeds = lang.embed(batch.ids, tokens)
            positions = torch.arange(batch.ids.shape[1]).expand_as(batch.ids)
            step = lang.step(embeds, batch.attention_mask, positions)
            codes = model.codes_from_states(step.hook, batch.attention_mask == 0)
            for b, (s, prep) in enumerate(zip(chunk, preps)):
                L = int(batch.lengths[b])
                ids = batch.ids[b, :L].tolist()
                add(codes[b, :L], batch.roles[b, :L], [lang.token_text(i) for i in ids], prep, s.objects)
    return Scan(rows, cols, vals, n, dict(props), model.config.sae.d_sae)


def label_concepts(result: Scan, min_active: int = 5) -> list[tuple[int, str, float, dict]]:
    """[(concept, label, F1, stats)] for every concept active on at least `min_active` tokens."""
    from scipy.stats import rankdata

    A = result.matrix()
    N = result.n_tokens
    member = {p: np.zeros(N, bool) for p in result.props}
    for p, idx in result.props.items():
        member[p][idx] = True
    counts = {p: int(m.sum()) for p, m in member.items()}
    usable = {p for p, c in counts.items() if 0 < c < N and (not p.startswith('text: "') or c >= MIN_WORD_COUNT)}
    token_props: dict[int, list[str]] = defaultdict(list)
    for p in usable:
        for i in result.props[p]:
            token_props[i].append(p)
    out = []
    for f in range(A.shape[1]):
        start, stop = A.indptr[f], A.indptr[f + 1]
        if stop - start < min_active:
            continue
        idx, val = A.indices[start:stop], A.data[start:stop]
        col = np.zeros(N, np.float64)
        col[idx] = val
        n_active = len(idx)
        strongest = idx[np.argsort(-val, kind="stable")]  # active tokens, strongest first
        candidates = {p for i in strongest[:TOP_TOKENS] for p in token_props.get(int(i), ())}
        if not candidates:
            continue
        ranks = rankdata(col)
        scored = []
        for p in candidates:
            m = member[p]
            n_pos = counts[p]
            auroc = float((ranks[m].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (N - n_pos)))
            k = min(n_pos, n_active)
            p_at_k = float(m[strongest[:k]].mean())
            hits = int(m[idx].sum())
            precision, recall = hits / n_active, hits / n_pos
            f1 = 2 * precision * recall / max(1e-9, precision + recall)
            scored.append({"label": p, "score": round(f1, 6), "auroc": round(auroc, 4),
                           "precision_at_k": round(p_at_k, 4), "precision": round(precision, 4),
                           "recall": round(recall, 4), "f1": round(f1, 4), "label_tokens": n_pos})
        scored.sort(key=lambda s: (s["score"], s["auroc"], s["label"]), reverse=True)
        best = scored[0]
        out.append((f, best["label"], best["score"], {
            **{k: v for k, v in best.items() if k != "label"}, "active_tokens": n_active,
            "runners_up": [{k: s[k] for k in ("label", "score", "auroc", "precision_at_k")} for s in scored[1:4]],
        }))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the best shipped one)")
    parser.add_argument("--data", default="data/shapeworld", help="ShapeWorld folder (ReasonSeg layout)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=200, help="examples to scan")
    parser.add_argument("--db", default=None, help="label database (default: cache/labels.sqlite)")
    parser.add_argument("--source", choices=("reference", "generated"), default="reference",
                        help="teacher-force the reference CoT (fast) or let the model generate its own")
    parser.add_argument("--min-active", type=int, default=5, help="label concepts active on at least this many tokens")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from segcompass.checkpoint import CheckpointError
    from segcompass.defaults import resolve_checkpoint
    from segcompass.model import SegCompass
    from training.data.reasonseg import load_reasonseg

    from .labels import LabelStore, checkpoint_fingerprint, default_labels_db

    torch.set_num_threads(max(1, args.threads))
    try:
        folder = resolve_checkpoint(args.checkpoint)
        model = SegCompass.from_pretrained(folder)
        samples = load_reasonseg(args.data, args.split)[: args.limit]
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        log.error("error: %s", err)
        return 2
    if not samples or samples[0].objects is None:
        log.error("%s/%s has no ShapeWorld objects: auto-labelling needs ShapeWorld data", args.data, args.split)
        return 2
    t0 = time.perf_counter()
    result = scan(model, samples, args.source, args.batch_size)
    labels = label_concepts(result, args.min_active)
    fingerprint = checkpoint_fingerprint(folder)
    provenance = {
        "method": "autolabel-v1: best F1 (fires vs label true) over properties of the top-activating tokens",
        "metric": "f1", "checkpoint": str(folder), "preset": model.config.preset, "data": str(args.data),
        "split": args.split, "examples": len(samples), "tokens": result.n_tokens, "source": args.source,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv),
    }
    store = LabelStore(args.db or default_labels_db())
    store.register_checkpoint(fingerprint, folder, model.config.preset)
    store.set_auto(fingerprint, [(f, label, score, {**provenance, **stats}) for f, label, score, stats in labels])
    scores = np.array([s for _, _, s, _ in labels]) if labels else np.zeros(1)
    log.info("labelled %d of %d concepts from %d tokens of %d examples in %.1f s (median F1 %.3f) -> %s",
             len(labels), model.config.sae.d_sae, result.n_tokens, len(samples), time.perf_counter() - t0,
             float(np.median(scores)), store.path)
    for f, label, score, stats in sorted(labels, key=lambda x: -x[2])[:10]:
        log.info("  concept %5d  %-28s F1 %.3f  AUROC %.3f  precision@k %.2f", f, label, score,
                 stats["auroc"], stats["precision_at_k"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
