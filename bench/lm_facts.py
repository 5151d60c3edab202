"""Does the language model know the facts, as plain text, with and without what training added?

`bench.knowledge_unseen` shows smol reasoning about facts outside ShapeWorld's table, often wrongly ("a cloud
is purple"). Is that the pretrained model not knowing, or the fine-tuning overwriting what it knew? This asks the
checkpoint's language model each fact as a cloze, text only (no image, no chat template): "a cloud is" followed by
each of the 7 colours, or "a kite is a" by each of the 6 shapes, and takes the candidate with the highest
log-likelihood (summed over its tokens), once with the LoRA adapters on (the trained model) and once with them off
(the pretrained model as installed). A cloze, not a question, because a 135M model's free replies to a
multiple-choice question mostly repeat the options. Scored for

- `table`: the clauses of ShapeWorld's fact table (training.data.shapeworld_facts), which SFT trained on;
- `unseen`: bench.knowledge_unseen's facts, which no stage trained on.

Only for checkpoints whose language model carries LoRA adapters (smol, full scale); seconds for smol on CPU.

    python -m bench.lm_facts --checkpoint assets/checkpoints/smol
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re

from training.data.shapeworld_scene import COLORS, SHAPES

COLOUR_WORDS = tuple(COLORS)  # ShapeWorld's 7 colours and 6 shapes: the candidates of every cloze
SHAPE_WORDS = SHAPES

_COLOUR_OF = re.compile(r"^(?:is|has) the colou?r of (.+)$|^is the same colou?r as (.+)$")
_SHAPE_OF = re.compile(r"^(?:is shaped like|has the shape of) (.+)$")


def cloze(clause: str, attribute: str) -> tuple[str, tuple[str, ...]]:
    """(prefix, candidate words) for a fact clause: "is the colour of a cloud" -> ("a cloud is", colours);
    "is shaped like a kite" -> ("a kite is a", shapes); any other clause -> ("a shape that CLAUSE is a", shapes)
    (or "the thing that CLAUSE is" for a colour)."""
    if attribute in COLOUR_WORDS:
        m = _COLOUR_OF.match(clause)
        return (f"{m.group(1) or m.group(2)} is" if m else f"the thing that {clause} is"), COLOUR_WORDS
    m = _SHAPE_OF.match(clause)
    return (f"{m.group(1)} is a" if m else f"a shape that {clause} is a"), SHAPE_WORDS


def facts() -> dict[str, list[tuple[str, str]]]:
    """{"table": [(clause, attribute)], "unseen": [...]}: one entry per clause."""
    from bench.knowledge_unseen import UNSEEN_FACTS
    from training.data.shapeworld_facts import KNOWLEDGE_FACTS

    return {"table": [(c, f.attribute) for f in KNOWLEDGE_FACTS for c in f.clauses],
            "unseen": [(c, a) for a, clauses in UNSEEN_FACTS.items() for c in clauses]}


def best_candidate(lm, tokenizer, prefix: str, candidates: tuple[str, ...]) -> str:
    """The candidate whose tokens are likeliest after `prefix` (log-probabilities summed over its tokens)."""
    import torch

    head = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    tails = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in candidates]
    width = len(head) + max(len(t) for t in tails)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(tails), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, tail in enumerate(tails):
        ids[i, : len(head) + len(tail)] = torch.tensor(head + tail)
        mask[i, : len(head) + len(tail)] = 1
    with torch.no_grad():
        logp = torch.log_softmax(lm(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    scores = [sum(float(logp[i, len(head) + j - 1, tok]) for j, tok in enumerate(tail)) for i, tail in enumerate(tails)]
    return candidates[max(range(len(candidates)), key=scores.__getitem__)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="assets/checkpoints/smol")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", action="store_true", help="also print every cloze and the word picked")
    parser.add_argument("--limit", type=int, default=None, help="only the first N facts of each set")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from segcompass.model import SegCompass

    model = SegCompass.from_pretrained(args.checkpoint)
    lm, tokenizer = model.language.lm, model.language.tokenizer
    if not hasattr(lm, "disable_adapter"):
        raise SystemExit(f"{args.checkpoint}: its language model has no LoRA adapters to switch off")
    report: dict = {"checkpoint": args.checkpoint}
    rows = []
    for name, items in facts().items():
        items = items[: args.limit]
        for adapters in ("on", "off"):
            with contextlib.nullcontext() if adapters == "on" else lm.disable_adapter():
                picks = [best_candidate(lm, tokenizer, *cloze(c, a)) for c, a in items]
            report[f"{name}_adapters_{adapters}"] = round(sum(p == a for p, (_, a) in zip(picks, items)) / len(items), 3)
            rows += [{"facts": name, "adapters": adapters, "cloze": cloze(c, a)[0], "picked": p, "right": p == a}
                     for (c, a), p in zip(items, picks)]
        report[f"{name}_count"] = len(items)
    report["chance"] = {"colour": round(1 / len(COLOUR_WORDS), 3), "shape": round(1 / len(SHAPE_WORDS), 3)}
    if args.rows:
        report["rows"] = rows
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
