"""How much of the error is reasoning, how much grounding? Scores a checkpoint two ways on a split:

- generated: encode + decode as a user runs it (the model's own chain of thought);
- teacher-forced: the same heads fed the data set's reference chain of thought (an upper bound
  for the mask path given perfect reasoning), and fed it again with every region phrase made
  "middle centre" (how much the mask path itself reads the place words),
plus the exact-match accuracy of the answer the generated CoT names ("answer : …"), the share of
answers that describe no object in the scene at all (ShapeWorld `objects`: a perception error,
e.g. the right colour with a wrong shape), for attribute queries the share whose region words
("found it in the top left") are right, for relation queries the share whose anchor's region words
("anchor : red circle at top left") are right, and over all families the share of region phrases
that say "middle centre" in the generated and in the reference CoT (a model blind to where things
are falls back to the centre: 80 % against 17 % for the shipped smol of session 16 on the first 60 of
ShapeWorld val). For knowledge queries the CoT is split where the knowledge ends and the looking
begins: the share of the reference's facts ("a carrot is orange .") the generated CoT states, and the
share whose conclusion ("so the orange diamond .") matches: the knowledge step alone, before any
perception; the answer after it needs the image too. `--family knowledge` scores one family only.

    python -m bench.diagnose_cot --checkpoint assets/checkpoints/tiny --data data/shapeworld --split val --limit 60
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict

import numpy as np
import torch


def answer_phrase(cot: str) -> str:
    """What a CoT names after "answer :" ("… answer : large orange star ." -> "large orange star .")."""
    return cot.split("answer :")[-1].strip()


def _names_no_object(answer: str, objects) -> float | None:
    """1 when a single-object answer ("small red circle") fits no object of the scene, else 0;
    None for empty / multi-object answers or without `objects`."""
    words = answer.rstrip(" .").split()
    if not objects or not words or words[0] in ("none", "0", "1", "2", "3", "4", "5", "6") or len(words) > 3:
        return None
    return float(not any(all(w in (o.get("shape"), o.get("color"), o.get("size")) for w in words) for o in objects))


def _region(cot: str) -> str | None:
    match = re.search(r"found it in the (\w+ \w+)", cot)
    return match.group(1) if match else None


_REGION_PHRASE = re.compile(r"(?:\bat|in the) (top|middle|bottom) (left|centre|right)\b")


def _anchor_region(cot: str) -> str | None:
    match = re.search(r"anchor : [^.,]*? at (\w+ \w+)", cot)
    return match.group(1) if match else None


_CONCLUSION = re.compile(r"(?:^|\. )so the ([^.]*?) \.")


def knowledge_split(cot: str) -> tuple[list[str], str | None]:
    """A knowledge CoT ("a carrot is orange . a square on its corner is a diamond . so the orange diamond .
    answer : …") as its facts and its conclusion ("orange diamond"); ([], None) without a conclusion."""
    match = _CONCLUSION.search(cot)
    if not match:
        return [], None
    facts = [f.strip() for f in cot[: match.start()].split(" .") if f.strip()]
    return facts, match.group(1).strip()


def _knowledge_scores(generated: str, reference: str) -> tuple[float | None, float | None]:
    """(share of the reference's facts the generated CoT states, 1 if its conclusion matches the reference's);
    (None, None) where the reference has no knowledge step."""
    facts, conclusion = knowledge_split(reference)
    if conclusion is None:
        return None, None
    got_facts, got_conclusion = knowledge_split(generated)
    fact_share = float(np.mean([f in got_facts for f in facts])) if facts else None
    return fact_share, float(got_conclusion == conclusion)


def _centre_share(cot: str) -> list[float]:
    """One value per region phrase of `cot`: 1 where it is "middle centre"."""
    return [float(p == ("middle", "centre")) for p in _REGION_PHRASE.findall(cot)]


def _centre_regions(cot: str) -> str:
    """`cot` with every region phrase saying "middle centre"."""
    return _REGION_PHRASE.sub(lambda m: m.group(0).rsplit(" ", 2)[0] + " middle centre", cot)


def _teacher_forced_iou(model, prep, vision_out, text: str, cot: str, gt) -> float:
    """IoU of the mask the heads give when the LM is fed `cot`; `vision_out`: `model.vision` of `prep`
    (computed once for every CoT of an image). LM logits are not read: only the last position's."""
    from segcompass.metrics import iou

    lang = model.language
    batch = lang.pack([lang.build_prompt(text, model.num_visual)], [lang.encode_completion(cot)[:-1]])
    with torch.no_grad():
        out = model(prep.pixels[None], [prep.valid_hw], batch.ids, batch.roles, batch.attention_mask,
                    batch.prompt_lengths, vision_out=vision_out, logits_to_keep=1)
    return iou(model.postprocess(out.heatmap_logits[0], out.confidence_logits[0], out.mask_logits[0],
                                 prep.valid_hw, prep.original_size).mask, gt)


def _share(key: str, values) -> dict:
    values = [v for v in values if v is not None]
    return {key: round(float(np.mean(values)), 3)} if values else {}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="assets/checkpoints/tiny")
    parser.add_argument("--data", default="data/shapeworld")
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--family", default=None, help="score only this query family (e.g. knowledge)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from segcompass.metrics import iou
    from segcompass.model import SegCompass
    from training.data.loaders import load_reasonseg

    model = SegCompass.from_pretrained(args.checkpoint)
    samples = [s for s in load_reasonseg(args.data, split=args.split)
               if s.cot and args.family in (None, s.family)][: args.limit]
    if not samples:
        raise SystemExit(f"no examples with a reference CoT{' of family ' + args.family if args.family else ''} "
                         f"in {args.data}/{args.split}")
    rows = defaultdict(list)
    for s in samples:
        image, gt = s.load_image(), s.gt_mask()
        trace = model.encode(image, s.texts[0])
        generated = iou(model.decode(trace).mask, gt)
        prep = model.prepare(image)
        with torch.no_grad():
            vision_out = model.vision(prep.pixels[None])
        forced, centred = (_teacher_forced_iou(model, prep, vision_out, s.texts[0], cot, gt)
                           for cot in (s.cot, _centre_regions(s.cot)))
        region = None
        if s.family == "attribute" and _region(s.cot):
            region = float(_region(trace.cot) == _region(s.cot))
        anchor = None
        if s.family == "relation" and _anchor_region(s.cot):
            anchor = float(_anchor_region(trace.cot) == _anchor_region(s.cot))
        row = (float(answer_phrase(trace.cot) == answer_phrase(s.cot)), generated, forced,
               _names_no_object(answer_phrase(trace.cot), s.objects), region, anchor,
               _centre_share(trace.cot), _centre_share(s.cot), centred, *_knowledge_scores(trace.cot, s.cot))
        rows["all"].append(row)
        rows[s.family or "?"].append(row)
    report = {fam: {"count": len(r), "answer_exact_match": round(float(np.mean([x[0] for x in r])), 3),
                    "gIoU_generated": round(float(np.mean([x[1] for x in r])), 3),
                    "gIoU_teacher_forced": round(float(np.mean([x[2] for x in r])), 3),
                    "gIoU_teacher_forced_regions_centred": round(float(np.mean([x[8] for x in r])), 3),
                    **_share("answer_names_no_object", [x[3] for x in r]),
                    **_share("attribute_region_words_right", [x[4] for x in r]),
                    **_share("relation_anchor_region_right", [x[5] for x in r]),
                    **_share("region_phrases_middle_centre_generated", [v for x in r for v in x[6]]),
                    **_share("region_phrases_middle_centre_reference", [v for x in r for v in x[7]]),
                    **_share("knowledge_facts_stated", [x[9] for x in r]),
                    **_share("knowledge_conclusion_right", [x[10] for x in r])}
              for fam, r in rows.items()}
    print(json.dumps({"checkpoint": args.checkpoint, "split": args.split, **report}, indent=2))


if __name__ == "__main__":
    main()
