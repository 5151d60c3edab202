"""ShapeWorld-RS queries: the eight families, their phrasings, the uniqueness rules and the CoT.

`make_query(family, rng, objects)` lists every query of the family whose answer is unique in
the scene (`shared/spec/shapeworld.md`, "Query families"), picks one (a sub-kind uniformly,
then an item uniformly), phrases it from several templates and writes its reference reasoning.
It returns None when the scene admits no such query; the caller then draws a new scene.

Tie rules: two areas within 5 % of the larger one tie; two positions or centre distances
within 8 px tie (also a centre within 8 px of a region border); superlatives, extremes and
relations need at least two candidates. Geometric answers (position, relation, comparison)
must also be nameable: no other object shares the answer's size, colour and shape, so the
CoT's closing "answer : <size> <colour> <shape> ." identifies it from the text alone.

CoT: at most 40 space-separated tokens, lowercase words and " . , :" only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.data.shapeworld_facts import KNOWLEDGE_FACTS, Fact
from training.data.shapeworld_scene import REGION_BORDERS, SceneObject

FAMILIES: dict[str, float] = {
    "attribute": 0.20, "position": 0.15, "relation": 0.15, "comparison": 0.15,
    "negation": 0.05, "knowledge": 0.15, "multi": 0.10, "none": 0.05,
}
AREA_TIE = 0.05  # relative to the larger area
POSITION_TIE = 8.0  # px, for coordinates, centre distances and region borders
MAX_COT_WORDS = 40

Desc = tuple[str | None, str | None, str | None]  # (size, colour, shape); None = unconstrained
Combo = tuple[bool, bool, bool]  # which of (size, colour, shape) a description names

ATTRIBUTE_COMBOS: tuple[Combo, ...] = ((0, 1, 1), (1, 1, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 0))
ANCHOR_COMBOS: tuple[Combo, ...] = ((0, 1, 1), (1, 1, 1), (0, 0, 1), (1, 0, 1))
GROUP_COMBOS: tuple[Combo, ...] = ((0, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1))
POSITION_GROUP_COMBOS: tuple[Combo, ...] = GROUP_COMBOS + ((1, 0, 0),)
MULTI_COMBOS: tuple[Combo, ...] = ((0, 1, 0), (0, 0, 1), (1, 0, 0), (0, 1, 1), (1, 0, 1), (1, 1, 0))

SINGLE_WRAPS = ("{}", "{}", "segment {}", "find {}", "show me {}", "highlight {}", "point to {}", "where is {}?")
MULTI_WRAPS = ("{}", "segment {}", "find {}", "show me {}", "highlight {}", "point to {}")
MULTI_PHRASES = ("all the {pl}", "all {pl}", "every {sg}", "each {sg}", "the {pl}")
# Extremes: axis (0 = x, 1 = y), sign (+1 = smallest coordinate wins), phrasings.
EXTREMES: dict[str, tuple[int, int, tuple[str, ...]]] = {
    "leftmost": (0, 1, ("the leftmost {}", "the {} furthest to the left", "the {} on the far left")),
    "rightmost": (0, -1, ("the rightmost {}", "the {} furthest to the right", "the {} on the far right")),
    "highest": (1, 1, ("the highest {}", "the topmost {}", "the {} nearest the top")),
    "lowest": (1, -1, ("the lowest {}", "the bottommost {}", "the {} nearest the bottom")),
}
REGION_PHRASES = ("the {g} in the {r}", "the {g} at the {r}", "the {g} located in the {r}")
RELATIONS: dict[str, tuple[str, ...]] = {
    "left of": ("the {g} left of the {a}", "the {g} to the left of the {a}", "the {g} on the left of the {a}"),
    "right of": ("the {g} right of the {a}", "the {g} to the right of the {a}", "the {g} on the right of the {a}"),
    "above": ("the {g} above the {a}", "the {g} higher than the {a}"),
    "below": ("the {g} below the {a}", "the {g} under the {a}", "the {g} beneath the {a}"),
    "closest to": ("the {g} closest to the {a}", "the {g} nearest to the {a}", "the {g} nearest the {a}"),
    "farthest from": ("the {g} farthest from the {a}", "the {g} furthest from the {a}", "the {g} most distant from the {a}"),
}
SUPERLATIVES: dict[str, tuple[int, tuple[str, ...]]] = {  # sign: +1 = largest area wins
    "largest": (1, ("the largest {}", "the biggest {}", "the {} with the largest area")),
    "smallest": (-1, ("the smallest {}", "the tiniest {}", "the {} with the smallest area")),
}
NEGATIONS: dict[str, tuple[str, ...]] = {  # group by -> negated attribute
    "color": ("the {g} that is not {v}", "the {g} which is not {v}", "the {g} that isn't {v}", "the non-{v} {g}"),
    "shape": ("the {g} that is not a {v}", "the {g} which is not a {v}", "the {g} that isn't a {v}"),
    "size": ("the {g} that is not {v}", "the {g} which is not {v}", "the {g} that isn't {v}"),
}
KNOWLEDGE_TEMPLATES = (
    "Which shape {}?", "Which object {}?", "Find the shape that {}.", "Point to the thing that {}.",
    "Segment the object that {}.", "Can you find the shape that {}?", "Show me something that {}.",
    "What in this picture {}?",
)


@dataclass(frozen=True)
class Query:
    """One query: its phrasing, family, target object indices (sorted; () = no target) and CoT."""

    family: str
    text: str
    is_sentence: bool
    targets: tuple[int, ...]
    cot: str


# ---------------------------------------------------------------------------- descriptions


def describe(obj: SceneObject, combo: Combo) -> Desc:
    """The description of `obj` that names the attributes selected by `combo`."""
    return tuple(a if keep else None for a, keep in zip(obj.attributes, combo))  # type: ignore[return-value]


def members(objects: Sequence[SceneObject], desc: Desc) -> list[int]:
    """Indices of the objects a description matches."""
    return [i for i, o in enumerate(objects) if all(v is None or v == a for v, a in zip(desc, o.attributes))]


def words(desc: Desc, noun: str = "shape") -> str:
    """Singular phrase: ("small", "blue", None) -> "small blue shape"."""
    size, color, shape = desc
    return " ".join(w for w in (size, color, shape or noun) if w)


def plural(desc: Desc, noun: str = "shape") -> str:
    """Plural phrase: (None, "blue", None) -> "blue shapes" (every shape name pluralises with s)."""
    return words(desc, noun) + "s"


def full(obj: SceneObject) -> str:
    """The answer name: size, colour and shape, e.g. "small blue square"."""
    return " ".join(obj.attributes)


def present(objects: Sequence[SceneObject], combos: Sequence[Combo]) -> list[Desc]:
    """Distinct descriptions of scene objects under `combos`, in first-seen order."""
    return list(dict.fromkeys(describe(o, c) for c in combos for o in objects))


def nameable(objects: Sequence[SceneObject]) -> set[int]:
    """Objects whose (size, colour, shape) no other object shares."""
    names = [o.attributes for o in objects]
    return {i for i, n in enumerate(names) if names.count(n) == 1}


# ---------------------------------------------------------------------------- helpers


def _choice(rng: np.random.Generator, seq: Sequence[Any]) -> Any:
    return seq[int(rng.integers(len(seq)))]


def _pick(rng: np.random.Generator, options: dict[Any, list[Any]]) -> tuple[Any, Any] | None:
    """(kind, candidate): a sub-kind uniformly among those with candidates, then a candidate uniformly."""
    kinds = [k for k, items in options.items() if items]
    if not kinds:
        return None
    kind = _choice(rng, kinds)
    return kind, _choice(rng, options[kind])


def _noun(rng: np.random.Generator) -> str:
    return _choice(rng, ("shape", "object"))


def _single(rng: np.random.Generator, phrase: str) -> str:
    return _choice(rng, SINGLE_WRAPS).format(phrase)


def _ranked_cot(head: str, items: list[str], tail: str) -> str:
    """"head : item , item … . tail", dropping the last-ranked items (keeping 2) to fit 40 words."""
    for k in range(len(items), 1, -1):
        cot = f"{head} : {' , '.join(items[:k])} . {tail}"
        if len(cot.split()) <= MAX_COT_WORDS or k == 2:
            return cot
    raise ValueError("a ranked CoT needs at least two items")


def _clearly_in(value: float, lo: float, hi: float) -> bool:
    return lo + POSITION_TIE < value < hi - POSITION_TIE


def _clearly_out(value: float, lo: float, hi: float) -> bool:
    return value < lo - POSITION_TIE or value > hi + POSITION_TIE


_BANDS = ((-np.inf, REGION_BORDERS[0]), REGION_BORDERS, (REGION_BORDERS[1], np.inf))
_CELLS = [(r, c) for r in range(3) for c in range(3)]  # (row band, column band)


# ---------------------------------------------------------------------------- families


def _attribute(rng: np.random.Generator, objects: Sequence[SceneObject]) -> Query | None:
    options: dict[Combo, list[tuple[Desc, int]]] = {}
    for combo in ATTRIBUTE_COMBOS:
        options[combo] = [(d, m[0]) for d in present(objects, [combo]) if len(m := members(objects, d)) == 1]
    if (pick := _pick(rng, options)) is None:
        return None
    _, (desc, i) = pick
    obj = objects[i]
    cot = f"looking for the {words(desc)} . found it in the {obj.region} . answer : {full(obj)} ."
    return Query("attribute", _single(rng, "the " + words(desc, _noun(rng))), False, (i,), cot)


def _position(rng: np.random.Generator, objects: Sequence[SceneObject]) -> Query | None:
    ok = nameable(objects)
    groups = [(d, m) for d in present(objects, POSITION_GROUP_COMBOS) if len(m := members(objects, d)) >= 2]
    options: dict[str, list[tuple[Desc, list[int]]]] = {}
    for kind, (axis, sign, _) in EXTREMES.items():
        options[kind] = []
        for desc, group in groups:
            ranked = sorted(group, key=lambda j: sign * objects[j].center[axis])
            first, second = (sign * objects[j].center[axis] for j in ranked[:2])
            if second - first > POSITION_TIE and ranked[0] in ok:
                options[kind].append((desc, ranked))
    options["region"] = []
    for desc, group in groups:
        for row, col in _CELLS:
            (ylo, yhi), (xlo, xhi) = _BANDS[row], _BANDS[col]
            inside = [j for j in group if _clearly_in(objects[j].center[1], ylo, yhi)
                      and _clearly_in(objects[j].center[0], xlo, xhi)]
            outside = [j for j in group if _clearly_out(objects[j].center[1], ylo, yhi)
                       or _clearly_out(objects[j].center[0], xlo, xhi)]
            if len(inside) == 1 and len(outside) == len(group) - 1 and inside[0] in ok:
                options["region"].append((desc, inside))
    if (pick := _pick(rng, options)) is None:
        return None
    kind, (desc, ranked) = pick
    obj = objects[ranked[0]]
    noun = _noun(rng)
    if kind == "region":
        region = obj.region
        said = _choice(rng, ("centre", "middle", region)) if region == "middle centre" else region
        phrase = _choice(rng, REGION_PHRASES).format(g=words(desc, noun), r=said)
        cot = (f"looking for the {words(desc)} in the {region} . only the {full(obj)} is there . "
               f"answer : {full(obj)} .")
    else:
        phrase = _choice(rng, EXTREMES[kind][2]).format(words(desc, noun))
        items = [f"{full(objects[j])} at {objects[j].region}" for j in ranked]
        cot = _ranked_cot(plural(desc), items, f"{kind} is the {full(obj)} . answer : {full(obj)} .")
    return Query("position", _single(rng, phrase), False, (ranked[0],), cot)


def _relation_target(kind: str, anchor: SceneObject, cands: list[tuple[int, SceneObject]]) -> int | None:
    """The one candidate standing in relation `kind` to the anchor, or None if not unique."""
    ax, ay = anchor.center
    if kind in ("closest to", "farthest from"):
        sign = 1 if kind == "closest to" else -1
        ranked = sorted(cands, key=lambda c: sign * np.hypot(c[1].center[0] - ax, c[1].center[1] - ay))
        d0, d1 = (sign * np.hypot(o.center[0] - ax, o.center[1] - ay) for _, o in ranked[:2])
        return ranked[0][0] if d1 - d0 > POSITION_TIE else None
    axis, sign = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}[kind]
    offsets = [(j, sign * (o.center[axis] - anchor.center[axis])) for j, o in cands]
    if any(abs(d) <= POSITION_TIE for _, d in offsets):
        return None
    hits = [j for j, d in offsets if d > 0]
    return hits[0] if len(hits) == 1 else None


def _relation(rng: np.random.Generator, objects: Sequence[SceneObject]) -> Query | None:
    ok = nameable(objects)
    options: dict[str, list[tuple[Desc, int, Desc, int]]] = {kind: [] for kind in RELATIONS}
    for adesc in present(objects, ANCHOR_COMBOS):
        if len(anchor := members(objects, adesc)) != 1:
            continue
        for gdesc in present(objects, GROUP_COMBOS):
            cands = [(j, objects[j]) for j in members(objects, gdesc) if j != anchor[0]]
            if len(cands) < 2:
                continue
            for kind in RELATIONS:
                target = _relation_target(kind, objects[anchor[0]], cands)
                if target is not None and target in ok:
                    options[kind].append((adesc, anchor[0], gdesc, target))
    if (pick := _pick(rng, options)) is None:
        return None
    kind, (adesc, a, gdesc, t) = pick
    phrase = _choice(rng, RELATIONS[kind]).format(g=words(gdesc, _noun(rng)), a=words(adesc))
    group = "" if gdesc == (None, None, None) else plural(gdesc) + " "
    cot = (f"anchor : {words(adesc)} at {objects[a].region} . {group}{kind} it : {full(objects[t])} . "
           f"answer : {full(objects[t])} .")
    return Query("relation", _single(rng, phrase), False, (t,), cot)


def _comparison(rng: np.random.Generator, objects: Sequence[SceneObject]) -> Query | None:
    ok = nameable(objects)
    options: dict[str, list[tuple[Desc, list[int]]]] = {kind: [] for kind in SUPERLATIVES}
    for desc in present(objects, GROUP_COMBOS):
        group = members(objects, desc)
        if len(group) < 2:
            continue
        for kind, (sign, _) in SUPERLATIVES.items():
            ranked = sorted(group, key=lambda j: -sign * objects[j].area)
            a0, a1 = objects[ranked[0]].area, objects[ranked[1]].area
            if abs(a0 - a1) > AREA_TIE * max(a0, a1) and ranked[0] in ok:
                options[kind].append((desc, ranked))
    if (pick := _pick(rng, options)) is None:
        return None
    kind, (desc, ranked) = pick
    obj = objects[ranked[0]]
    phrase = _choice(rng, SUPERLATIVES[kind][1]).format(words(desc, _noun(rng)))
    cot = _ranked_cot(plural(desc), [full(objects[j]) for j in ranked],
                      f"{kind} is the {full(obj)} . answer : {full(obj)} .")
    return Query("comparison", _single(rng, phrase), False, (ranked[0],), cot)


def _negation(rng: np.random.Generator, objects: Sequence[SceneObject]) -> Query | None:
    # (group by, negated attribute) as indices into (size, colour, shape).
    kinds = {"color": (2, 1), "shape": (1, 2), "size": (2, 0)}
    options: dict[str, list[tuple[str, str, list[int], int]]] = {kind: [] for kind in kinds}
    for kind, (by, neg) in kinds.items():
        for value in dict.fromkeys(o.attributes[by] for o in objects):
            group = [j for j, o in enumerate(objects) if o.attributes[by] == value]
            for v in dict.fromkeys(objects[j].attributes[neg] for j in group):
                lacking = [j for j in group if objects[j].attributes[neg] != v]
                if len(group) >= 2 and len(lacking) == 1:
                    options[kind].append((value, v, group, lacking[0]))
    if (pick := _pick(rng, options)) is None:
        return None
    kind, (value, v, group, t) = pick
    by, neg = kinds[kind]
    obj = objects[t]
    if kind == "shape":  # group: a colour
        g, head, said = f"{value} {_noun(rng)}", f"{value} shapes", f"the {value} {obj.shape}"
    else:  # group: a shape
        g, head, said = value, f"{value}s", f"the {obj.attributes[neg]} {value}"
    phrase = _choice(rng, NEGATIONS[kind]).format(g=g, v=v)
    article = "a " if kind == "shape" else ""
    values = " , ".join(objects[j].attributes[neg] for j in group)
    cot = f"{head} : {values} . not {article}{v} : {said} . answer : {full(obj)} ."
    return Query("negation", _single(rng, phrase), False, (t,), cot)


def _knowledge(rng: np.random.Generator, objects: Sequence[SceneObject]) -> Query | None:
    options: dict[str, list[Desc]] = {
        "shape": present(objects, [(0, 0, 1)]),
        "color": present(objects, [(0, 1, 0)]),
        "both": present(objects, [(0, 1, 1)]),
    }
    options = {k: [d for d in ds if len(members(objects, d)) == 1] for k, ds in options.items()}
    if (pick := _pick(rng, options)) is None:
        return None
    _, desc = pick
    facts: list[Fact] = [_choice(rng, [f for f in KNOWLEDGE_FACTS if f.attribute == a]) for a in desc[1:] if a]
    if len(facts) == 2 and rng.random() < 0.5:
        facts.reverse()
    clause = " and ".join(_choice(rng, f.clauses) for f in facts)
    t = members(objects, desc)[0]
    reasons = " . ".join(f.reason for f in facts)
    cot = f"{reasons} . so the {words(desc)} . answer : {full(objects[t])} ."
    return Query("knowledge", _choice(rng, KNOWLEDGE_TEMPLATES).format(clause), True, (t,), cot)


def _multi(rng: np.random.Generator, objects: Sequence[SceneObject]) -> Query | None:
    options = {c: [(d, m) for d in present(objects, [c]) if len(m := members(objects, d)) >= 2] for c in MULTI_COMBOS}
    if (pick := _pick(rng, options)) is None:
        return None
    _, (desc, targets) = pick
    noun = _noun(rng)
    phrase = _choice(rng, MULTI_PHRASES).format(pl=plural(desc, noun), sg=words(desc, noun))
    names = " , ".join(full(objects[j]) for j in sorted(targets, key=lambda j: objects[j].center[0]))
    answer = f"answer : {len(targets)} objects : {names} ."
    cot = f"{plural(desc)} : {names} . {answer}"
    if len(cot.split()) > MAX_COT_WORDS:
        cot = f"{plural(desc)} : {len(targets)} found . {answer}"
    return Query("multi", _choice(rng, MULTI_WRAPS).format(phrase), False, tuple(targets), cot)


def _none(rng: np.random.Generator, objects: Sequence[SceneObject]) -> Query | None:
    sizes, colors, shapes = (list(dict.fromkeys(o.attributes[k] for o in objects)) for k in range(3))
    # Hard negatives: every named attribute occurs in the scene, the combination does not.
    options: dict[str, list[Desc]] = {
        "color shape": [(None, c, s) for c in colors for s in shapes],
        "size color shape": [(z, c, s) for z in sizes for c in colors for s in shapes],
        "size shape": [(z, None, s) for z in sizes for s in shapes],
    }
    options = {k: [d for d in ds if not members(objects, d)] for k, ds in options.items()}
    if (pick := _pick(rng, options)) is None:
        return None
    _, desc = pick
    cot = f"there is no {words(desc)} . answer : none ."
    return Query("none", _single(rng, "the " + words(desc, _noun(rng))), False, (), cot)


_FAMILY_BUILDERS: dict[str, Callable[[np.random.Generator, Sequence[SceneObject]], Query | None]] = {
    "attribute": _attribute, "position": _position, "relation": _relation, "comparison": _comparison,
    "negation": _negation, "knowledge": _knowledge, "multi": _multi, "none": _none,
}


def make_query(family: str, rng: np.random.Generator, objects: Sequence[SceneObject]) -> Query | None:
    """A query of `family` with a unique answer in this scene, or None if the scene has none."""
    if family not in _FAMILY_BUILDERS:
        raise ValueError(f"unknown query family {family!r}; expected one of {list(FAMILIES)}")
    return _FAMILY_BUILDERS[family](rng, objects)
