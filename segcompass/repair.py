"""Perception repair: when the chain of thought's decision contradicts what the model's own visual tokens see,
the decision is made by what they see and the CoT is written again from there.

The shipped smol reads the instruction well (which group, which anchor, which extreme: its CoTs name them right)
and its visual tokens see the scene well (through the naming loss's logit lens, `verify.seen_objects` finds 210 of
218 val objects, 6.8 px off), but its language model picks the wrong object when the choice is geometric: the
greedy CoT's relation answers are right a third of the time. `repair` reads the decision a greedy CoT states, in
ShapeWorld's CoT grammar, and checks it against the seen objects:

    fix_ranked     "GROUP : A at … , B at … . KIND is the A . answer : A ."   (leftmost … lowest, largest / smallest)
    fix_relation   "anchor : X at … . GROUP KIND it : A . answer : A ."      (left of … below, closest / farthest)
    fix_region     "looking for the X in the R C . only the A is there ."
    fix_absence    "there is no X . answer : none ."   vs   "looking for the X . found it in the … . answer : A ."
    fix_described  "looking for the X . found it … answer : A ."  /  "… so the X . answer : A ."
    fix_negation   "stars : red , blue . not red : the blue star . answer : A ."

When the seen objects settle the decision clearly (8 px, one size class) and it is not the CoT's, a `Fix` says how
to write the CoT again: its start up to the decision as the LM wrote it (with the seen answer in place of the LM's),
then the LM writes on, the seen answer forced wherever the grammar restates it ("is the", "it :", "answer :";
`FixSteer`). The second generation goes through the LM like the first (`SegCompass._generate_traces`), so the
trace's states, SAE codes and masks are those of the CoT shown. What the tokens cannot check stays the LM's: which
facts a knowledge query means, multi lists, which of two shapes of one size class is larger, and any decision the
seen objects leave open (two objects within the margin, fewer than two in the group).

Inference only, no parameters: `LMConfig.repair` switches it on for a checkpoint (on for the shipped smol since
session 26: test gIoU 0.623 -> 0.793 with the same weights, docs/results.md). It reads ShapeWorld's CoT grammar and
needs a checkpoint trained with the naming loss; elsewhere it finds nothing to check and changes nothing.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .grounding import described, spaced
from .tokenizer import THINK_START
from .verify import (AXIS, COLOURS, COLUMNS, EXTREME_AXIS, RELATION, ROWS, SHAPES, SINGLE_PROB, SIZES, Claim, Percept,
                     Seen, claims, in_group, locate, naming, ranked_choice, same_object, seen_objects)

REWRITE_MARK = "\x00rewrite\x00"  # streamed (to `on_token`) before a rewritten CoT's tokens: what came before is void
POSITION_MARGIN = 8.0  # px: a seen extreme / relation needs the runner-up this much behind (the data's tie rule)
ABSENT_PROB = 0.05  # "looking for the X" becomes "there is no X" only when no token names X this likely
NAMED_PROB = 0.5  # an object the CoT names counts as there (if no seen object is it) when a token names it this likely


@dataclass(frozen=True)
class Fix:
    """How to write a CoT again: force `prefix` from its first word, then force `answer` (if any) wherever the
    grammar restates the answer; `why` says what the visual tokens saw."""

    prefix: str
    answer: str | None
    why: str


def name(o: Seen) -> str:
    return f"{o.size} {o.colour} {o.shape}"


def _at(o: Seen) -> str:
    return f"({o.xy[0]:.0f}, {o.xy[1]:.0f})"


def _a(words: str) -> str:
    return ("an " if words[:1] in "aeiou" else "a ") + words


def _fits(o: Seen, colour: str | None, shape: str | None, size: str | None) -> bool:
    return shape in (None, o.shape) and colour in (None, o.colour) and size in (None, o.size)


def _seen_as(p: Percept, seen: list[Seen], claim: Claim) -> Seen | None:
    """The seen object a CoT's named object is, where the tokens see it best (`verify.same_object`)."""
    return same_object(seen, claim, locate(p, claim))


def with_named(p: Percept, seen: list[Seen], named: list[Claim]) -> list[Seen]:
    """The seen objects plus each object the CoT names that none of them is, where the tokens see it best, if some
    token names it with probability >= NAMED_PROB (small objects often have no token at `seen_objects`' 0.9)."""
    out = list(seen)
    for claim in named:
        if claim.colour is None or claim.size is None or not claim.present:
            continue
        lp = naming(p, claim)
        xy = locate(p, claim)
        if float(lp.max().exp()) >= NAMED_PROB and same_object(out, claim, xy) is None:
            out.append(Seen(claim.colour, claim.shape, claim.size, (float(xy[0]), float(xy[1])), 0))
    return out


def fix_ranked(p: Percept, cot: str, seen: list[Seen]) -> Fix | None:
    """"GROUP : … . KIND is the A": the seen member of GROUP that is KIND, if it is clear and not A."""
    choice = ranked_choice(cot)
    if choice is None:
        return None
    group, kind, answer = choice
    seen = with_named(p, seen, claims(cot))
    members = [o for o in seen if in_group(o, group)]
    if len(members) < 2:
        return None
    if kind in EXTREME_AXIS:
        axis, sign = EXTREME_AXIS[kind]
        key, margin = (lambda o: sign * o.xy[axis]), POSITION_MARGIN
    else:  # largest / smallest, by size class: the tokens name small / medium / large, not the area
        sign = 1.0 if kind == "largest" else -1.0
        key, margin = (lambda o: sign * SIZES.index(o.size)), 1.0
    first, second = sorted(members, key=key, reverse=True)[:2]
    if key(first) - key(second) < margin or _seen_as(p, seen, answer) is first:
        return None
    return Fix(f"{group} : {name(first)} at", name(first),
               f"{kind} of the {group} the visual tokens see: the {name(first)} at {_at(first)}")


def fix_relation(p: Percept, cot: str, seen: list[Seen]) -> Fix | None:
    """"anchor : X … GROUP KIND it : A": the one seen member of GROUP so placed from X, if it is clear and not A."""
    match = RELATION.search(cot)
    if match is None:
        return None
    anchor, target = claims(match.group(1)), claims(match.group(4))
    if not anchor:
        return None
    seen = with_named(p, seen, anchor + target)
    a_xy = locate(p, anchor[0])
    a_own = same_object(seen, anchor[0], a_xy)
    group, kind = match.group(2).strip(), match.group(3)
    cands = [o for o in seen if in_group(o, group) and o is not a_own]
    if len(cands) < 2:
        return None
    at = (float(a_xy[0]), float(a_xy[1]))
    if kind in ("closest to", "farthest from"):
        sign = 1.0 if kind == "closest to" else -1.0
        first, second = sorted(cands, key=lambda o: sign * math.dist(o.xy, at))[:2]
        if sign * (math.dist(second.xy, at) - math.dist(first.xy, at)) < POSITION_MARGIN:
            return None
        best = first
    else:
        axis, sign = AXIS[kind]
        offsets = [(o, sign * (o.xy[axis] - at[axis])) for o in cands]
        hits = [o for o, off in offsets if off > 0]
        if len(hits) != 1 or any(abs(off) < POSITION_MARGIN for _, off in offsets):
            return None
        best = hits[0]
    if target and _seen_as(p, seen, target[0]) is best:
        return None
    return Fix(cot[:match.start(4)].rstrip(), name(best),
               f"the {group or 'shape'} {kind} the {match.group(1).split(' at ')[0]} the visual tokens see: "
               f"the {name(best)} at {_at(best)}")


_NONE = re.compile(r"^there is no ([^.]*?) \.")
_LOOKING = re.compile(r"^looking for (?:the |a |an )?([^.]*?) \. found it in the")


def fix_absence(p: Percept, cot: str, seen: list[Seen]) -> Fix | None:
    """"there is no X" while the tokens see an X, or "looking for the X . found it" while no token names an X."""
    text = spaced(cot)
    if (match := _NONE.search(text)) is not None:
        wanted = described(match.group(1))
        if wanted[1] is None or (wanted[0] is None and wanted[2] is None):
            return None  # "there is no shape" / a bare shape: nothing the grammar's attribute CoT could name
        hits = [o for o in seen if _fits(o, *wanted)]
        if not hits:
            return None
        best = max(hits, key=lambda o: o.tokens)
        return Fix(f"looking for the {match.group(1)} . found it in the", name(best),
                   f"the visual tokens see {_a(match.group(1))}: the {name(best)} at {_at(best)}")
    if (match := _LOOKING.search(text)) is not None:
        colour, shape, size = described(match.group(1))
        if shape is None or (colour is None and size is None):
            return None
        if any(_fits(o, colour, shape, size) for o in seen):
            return None
        if float(naming(p, Claim(colour, shape, size, None, True)).max().exp()) >= ABSENT_PROB:
            return None
        return Fix(f"there is no {match.group(1)} . answer : none .", None,
                   f"no visual token names {_a(match.group(1))} (all below p = {ABSENT_PROB})")
    return None


_DESCRIBED = re.compile(r"^(.*?(?:looking for (?:the |a |an )?([^.]*?) \. found it in the [a-z]+ [a-z]+ \.|"
                        r"\bso the ([^.]*?) \.) answer :) ([^.,]*?) \.")


def fix_described(p: Percept, cot: str, seen: list[Seen]) -> Fix | None:
    """"looking for the X . found it … answer : A" / "… so the X . answer : A": the one seen X, if A is not it."""
    match = _DESCRIBED.search(spaced(cot))
    if match is None:
        return None
    wanted = described(match.group(2) or match.group(3))
    answer = claims(match.group(4))
    if not answer or wanted == (None, None, None):
        return None
    seen = with_named(p, seen, answer)
    hits = [o for o in seen if _fits(o, *wanted)]
    if len(hits) != 1 or _seen_as(p, seen, answer[0]) is hits[0]:
        return None
    return Fix(match.group(1), name(hits[0]),
               f"the one {match.group(2) or match.group(3)} the visual tokens see: the {name(hits[0])} at {_at(hits[0])}")


_NEGATION = re.compile(r"^(([^.:]*?) : [^.]*? \. not (?:a |an )?([a-z]+) :) [^.]*? \. answer : ([^.,]*?) \.")


def fix_negation(p: Percept, cot: str, seen: list[Seen]) -> Fix | None:
    """"stars : red , blue . not red : the blue star . answer : A": the one seen member of the group without the
    negated colour / size / shape, if A is not it."""
    match = _NEGATION.search(spaced(cot))
    if match is None:
        return None
    head, value, answer = match.group(2), match.group(3), claims(match.group(4))
    slot = next((k for k, vocab in (("colour", COLOURS), ("size", SIZES), ("shape", SHAPES)) if value in vocab), None)
    if slot is None or not answer:
        return None
    seen = with_named(p, seen, answer)
    members = [o for o in seen if in_group(o, head)]
    lacking = [o for o in members if getattr(o, slot) != value]
    if len(members) < 2 or len(lacking) != 1 or _seen_as(p, seen, answer[0]) is lacking[0]:
        return None
    o = lacking[0]
    said = f"{o.colour} {o.shape}" if slot == "shape" else f"{getattr(o, slot)} {o.shape}"
    return Fix(f"{match.group(1)} the {said} . answer :", name(o),
               f"the one {head[:-1] if head.endswith('s') else head} not {value} the visual tokens see: the {name(o)} "
               f"at {_at(o)}")


_REGION = re.compile(r"^(looking for (?:the |a |an )?([^.]*?) in the (top|middle|bottom) (left|centre|right) \.) "
                     r"only the ([^.]*?) is there \.")


def _inside(p: Percept, xy: tuple[float, float], row: int, col: int, margin: float) -> bool:
    """Is `xy` at least `margin` px inside the (row, col) third of the image (negative: within -margin of it)?"""
    H, W = p.image_hw.tolist()
    (x0, x1), (y0, y1) = ((col * W / 3, (col + 1) * W / 3), (row * H / 3, (row + 1) * H / 3))
    return min(xy[0] - x0, x1 - xy[0], xy[1] - y0, y1 - xy[1]) >= margin


def fix_region(p: Percept, cot: str, seen: list[Seen]) -> Fix | None:
    """"looking for the X in the R C . only the A is there": the one seen X in that third, if A is clearly not in it."""
    match = _REGION.search(spaced(cot))
    if match is None:
        return None
    wanted = described(match.group(2))
    row, col = ROWS.index(match.group(3)), COLUMNS.index(match.group(4))
    answer = claims(match.group(5))
    seen = with_named(p, seen, answer)
    inside = [o for o in seen if _fits(o, *wanted) and _inside(p, o.xy, row, col, 0.0)]
    own = _seen_as(p, seen, answer[0]) if answer else None
    if len(inside) != 1 or own is inside[0] or (own is not None and _inside(p, own.xy, row, col, -POSITION_MARGIN)):
        return None
    return Fix(f"{match.group(1)} only the {name(inside[0])} is there . answer :", name(inside[0]),
               f"the one {match.group(2)} the visual tokens see in the {match.group(3)} {match.group(4)}: "
               f"the {name(inside[0])} at {_at(inside[0])}")


def repair(p: Percept, cot: str) -> Fix | None:
    """The fix for the first decision of `cot` the visual tokens contradict, or None."""
    seen = seen_objects(p, single_prob=SINGLE_PROB)
    for check in (fix_ranked, fix_relation, fix_region, fix_absence, fix_described, fix_negation):
        if (fix := check(p, cot, seen)) is not None:
            return fix
    return None


_RESTATED = re.compile(r"(?: is the| it :| answer :)$")


class FixSteer:
    """`steer(b, completion_ids)` for `LanguageModel.generate`: sequence b writes `fixes[b]` (None: left free). The
    prefix comes first (after the think tag, as the SFT taught the completion to start); then the LM writes on, and
    wherever the text so far ends with " is the", " it :" or " answer :" the fix's answer is forced."""

    def __init__(self, tokenizer, fixes: list[Fix | None]):
        self.tokenizer = tokenizer
        self.fixes = fixes
        self.queue: dict[int, list[int]] = {}

    def _force(self, b: int, text: str) -> int:
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        self.queue[b] = ids[1:]
        return ids[0]

    def __call__(self, b: int, completion_ids: list[int]) -> int | None:
        fix = self.fixes[b]
        if fix is None:
            return None
        if self.queue.get(b):
            return self.queue[b].pop(0)
        if not completion_ids:
            return self._force(b, f"{THINK_START} {fix.prefix}")
        text = spaced(self.tokenizer.decode(completion_ids, skip_special_tokens=True))
        return self._force(b, " " + fix.answer) if fix.answer and _RESTATED.search(text) else None
