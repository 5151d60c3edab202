"""Grounded regions: the chain of thought puts an object where the model's own visual tokens see it.

The naming loss makes each visual token's layer-L state name the colour, shape and size of the object under
it through the LM's logit lens (`segcompass.verify.perceive`); on the shipped smol the lens names them right
99 % of the time, yet its greedy CoT puts half its objects in the "middle centre". `RegionGrounding` steers
generation where ShapeWorld's CoT grammar states a place the model has to perceive:

    "… large blue star at ▸bottom left◂ , …"        "anchor : purple hexagon at ▸top left◂ . …"
    "looking for the white shape . found it in the ▸bottom right◂ . …"

When the text so far ends with "<object> at" or "looking for the <object> . found it in the", the next two
words are forced to the row and column thirds holding that object where the visual tokens see it best
(`verify.region_of`). Everything else the LM writes itself: which objects to list, which is leftmost, the
answer; places the instruction gives ("the diamond in the middle right") are copied, not forced. An object no
token names with probability at least `min_prob` (a CoT naming something that is not there) is left to the LM.

Inference only, no parameters: `LMConfig.ground_regions` switches it on for a checkpoint (`SegCompass` passes
it to `LanguageModel.generate` as `steer`). The forced words go through the LM like any other, so their
states, SAE codes and everything downstream are those of the text shown.
"""

from __future__ import annotations

import functools
import math
import re

from .verify import (COLOURS, COLUMNS, ROWS, SHAPES, SIZES, Claim, Percept, naming, naming_vocab, percept_from_states,
                     region_of)

_ATTR = "|".join(COLOURS + SIZES)
_SHAPE = "|".join(SHAPES)
# "<up to two attributes> <shape> at" ending the text (a listed object, an anchor).
_AT = re.compile(rf"(?:^| )((?:(?:{_ATTR}) ){{0,2}}(?:{_SHAPE})) at$")
# "looking for the <description> . found it in the" ending the text.
_FOUND = re.compile(r"looking for (?:the |a |an )?([^.]*?) \. found it in the$")

MIN_PROB = 0.1


def described(text: str) -> tuple[str | None, str | None, str | None]:
    """(colour, shape, size) of a description like "large blue star" or "white shape"; None where not said."""
    words = text.split()
    pick = lambda vocab: next((w for w in words if w in vocab), None)  # noqa: E731
    return pick(COLOURS), pick(SHAPES), pick(SIZES)


def spaced(text: str) -> str:
    """The text with ". , :" as words of their own and single spaces: "found it in the top left." ->
    "found it in the top left .", how ShapeWorld's CoT grammar is matched."""
    return " ".join(text.replace(".", " . ").replace(",", " , ").replace(":", " : ").split())


def target(text: str) -> tuple[str | None, str | None, str | None] | None:
    """The (colour, shape, size) whose place the next words state, if `text` (a CoT so far) ends where it
    states one; None otherwise or when the description says nothing the visual tokens name."""
    text = spaced(text)
    match = _AT.search(text) or _FOUND.search(text)
    if match is None:
        return None
    colour, shape, size = described(match.group(1))
    return None if colour is shape is size is None else (colour, shape, size)


class RegionGrounding:
    """`steer(b, completion_ids)` for `LanguageModel.generate`: the token to force next for sequence b, or None.

    `percepts[b]` is what sequence b's visual tokens see (`verify.percept_from_states`); `forced[b]` lists the
    region phrases forced, in order."""

    def __init__(self, tokenizer, percepts: list[Percept], min_prob: float = MIN_PROB):
        self.tokenizer = tokenizer
        self.percepts = percepts
        self.min_logprob = math.log(min_prob)
        self.queue: dict[int, list[int]] = {}
        self.forced: list[list[str]] = [[] for _ in percepts]

    def region(self, b: int, colour: str | None, shape: str | None, size: str | None) -> tuple[int, int] | None:
        """(row, column) third of the best-seen object so described (any shape if none is given); None when
        no visual token names it with probability >= min_prob."""
        p = self.percepts[b]
        shapes = SHAPES if shape is None else (shape,)
        candidates = (Claim(colour, s, size, None, True) for s in shapes)
        score, best = max(((float(naming(p, c).max()), c) for c in candidates), key=lambda pair: pair[0])
        return None if score < self.min_logprob else region_of(p, best)

    def __call__(self, b: int, completion_ids: list[int]) -> int | None:
        queue = self.queue.get(b)
        if queue:
            return queue.pop(0)
        wanted = target(self.tokenizer.decode(completion_ids, skip_special_tokens=True))
        region = None if wanted is None else self.region(b, *wanted)
        if region is None:
            return None
        phrase = f"{ROWS[region[0]]} {COLUMNS[region[1]]}"
        ids = self.tokenizer(" " + phrase, add_special_tokens=False).input_ids
        self.forced[b].append(phrase)
        self.queue[b] = ids[1:]
        return ids[0]


def grounding_steer(lang, batch: int, visual_states, patch_boxes, original_sizes):
    """A `steer` for `LanguageModel.generate` that reads every sequence's percept on its first call, from
    `visual_states(b)` (layer-L states [Nv, D] of sequence b's visual tokens, there once the prompt ran);
    None when the tokenizer cannot write the colour, shape and size words (nothing to read, nothing forced)."""
    if naming_vocab(lang) is None:
        return None

    @functools.cache
    def grounding() -> RegionGrounding:
        return RegionGrounding(lang.tokenizer, [percept_from_states(lang, visual_states(b), patch_boxes[b],
                                                                    original_sizes[b]) for b in range(batch)])

    return lambda b, completion_ids: grounding()(b, completion_ids)
