"""Check a chain of thought's claims against what the model itself sees, and keep the best-supported of several.

The naming loss of the SFT makes each visual token's layer-L state name the colour, shape and size of
the object under it through the language model's own final norm and unembedding (a logit lens). So the
model can be asked, without new parameters, which objects its visual tokens show, and every object a
CoT names ("anchor : purple hexagon at top left", "answer : small orange star", "there is no orange
circle") can be checked against that: a named object is supported as much as the best visual token
(in the named region, when the CoT gives one) names its colour, shape and size; an object the CoT says
is absent, as much as no token names it. A CoT scores the log-probability that all its claims hold.

`best_of` samples CoTs besides the greedy one and keeps the best-supported (`python -m segcompass.predict
--verify N`; `bench.best_of_n` measures the rule, `verified`). The claims are read in ShapeWorld's CoT
grammar ("[size] [colour] shape [at row column]", "there is no …", "anchor : A … above it : B"): a CoT that
names no object this way is unscored (None) and the greedy CoT is kept; on a model trained without the naming
loss the lens readings, and so the scores, mean little.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .records import TokenRole

# The attribute words the naming loss teaches the visual tokens (training.sft.naming_loss), in label order.
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white")
SHAPES = ("circle", "triangle", "square", "diamond", "hexagon", "star")
SIZES = ("small", "medium", "large")
ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "centre", "right")  # thirds holding the object's centre

_ROW = {w: i for i, w in enumerate(ROWS)}
_COL = {w: i for i, w in enumerate(COLUMNS)}


def naming_vocab(lang, regions: bool = False) -> list[list[int]] | None:
    """Token ids of the colour, shape and size words (and, with `regions`, the row and column words);
    the first token of each word (None if a word is unknown or two words of a group share it)."""
    groups = (COLOURS, SHAPES, SIZES) + ((ROWS, COLUMNS) if regions else ())
    vocab = [lang.first_token_ids(words) for words in groups]
    return None if any(v is None for v in vocab) else vocab


@dataclass(frozen=True)
class Claim:
    colour: str | None
    shape: str
    size: str | None
    region: tuple[int, int] | None  # (row third, column third)
    present: bool  # False: the CoT says there is no such object


@dataclass
class Percept:
    """Per visual token (row-major on a square grid) log-probabilities of each colour / shape / size word,
    the token's patch centre (x, y) in original-image pixels, and the image's (height, width)."""

    colour: torch.Tensor  # [Nv, 7]
    shape: torch.Tensor  # [Nv, 6]
    size: torch.Tensor  # [Nv, 3]
    centres: torch.Tensor  # [Nv, 2]
    image_hw: torch.Tensor  # [2]

    def to_dict(self) -> dict:
        return {k: getattr(self, k).tolist() for k in ("colour", "shape", "size", "centres", "image_hw")}

    @classmethod
    def from_dict(cls, d: dict) -> "Percept":
        return cls(**{k: torch.tensor(v) for k, v in d.items()})


@torch.no_grad()
def percept_from_states(lang, states_ND: torch.Tensor, patch_boxes: torch.Tensor, original_size) -> Percept:
    """What visual tokens name, from their layer-L states [Nv, D] (row-major) and patch boxes [Nv, 4]."""
    vocab = naming_vocab(lang)
    if vocab is None:
        raise ValueError("the tokenizer cannot name the colour, shape and size words")
    states = states_ND.float()
    groups = [torch.log_softmax(lang.word_logits(states[None], ids)[0].float(), -1) for ids in vocab]
    boxes = patch_boxes.float()
    centres = torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], -1)
    return Percept(*groups, centres=centres, image_hw=torch.tensor(original_size, dtype=torch.float32))


@torch.no_grad()
def perceive(model, trace) -> Percept:
    """What the visual tokens of `trace` name, read from their layer-L states (SAE reconstruction + error)."""
    visual = trace.roles == int(TokenRole.VISUAL)
    states = (model.sae.decode(trace.dense_codes()) + trace.sae_error)[visual]
    return percept_from_states(model.language, states, trace.patch_boxes, trace.original_size)


def _centroids(p: Percept, lp: torch.Tensor) -> torch.Tensor:
    """[Nv, 2] where the object a token sees lies: the centroid (x, y) of its 3 x 3 neighbourhood's patch centres
    weighted by how much each names the object (`lp`: [Nv] log-probabilities). An object covers several
    tokens; its centroid, not any one patch, says which third holds its centre."""
    n = int(round(len(lp) ** 0.5))
    w = lp.exp().view(1, 1, n, n)
    xy = p.centres.T.reshape(2, 1, n, n)
    box = torch.ones(1, 1, 3, 3)
    mass = F.conv2d(w, box, padding=1).clamp_min(1e-12)
    return torch.stack([(F.conv2d(w * xy[i:i + 1], box, padding=1) / mass).flatten() for i in range(2)], -1)


def thirds(p: Percept, xy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    H, W = p.image_hw.tolist()
    row = torch.bucketize(xy[:, 1].contiguous(), torch.tensor([H / 3, 2 * H / 3]), right=True)
    col = torch.bucketize(xy[:, 0].contiguous(), torch.tensor([W / 3, 2 * W / 3]), right=True)
    return row, col


FLOOR = -30.0  # log-probability of a claim no token supports (none in the named region)
_FOUND = re.compile(r"(?:found it|looking for [^.]*?) in the (top|middle|bottom) (left|centre|right)\b")
_ATTR = set(COLOURS) | set(SIZES)
_SHAPE_SET = set(SHAPES)


def claims(cot: str) -> list[Claim]:
    """The objects a CoT names with at least a colour or a size ("small orange star", "purple hexagon at top
    left"; bare shape words are skipped: "yellow shapes : circle , diamond" lists kinds, and "a square on its
    corner" is knowledge, not a scene claim). "there is no X" claims X absent; "not a X" claims nothing.
    The region of "found it in the R C" or "looking for … in the R C" goes to every object named after it
    ("only the small white diamond is there", the answer)."""
    words = cot.replace(".", " . ").replace(",", " , ").split()
    text = " ".join(words)
    found = _FOUND.search(text)
    found_region = (_ROW[found.group(1)], _COL[found.group(2)]) if found else None
    found_word = len(text[:found.end()].split()) if found else len(words)
    out: list[Claim] = []
    for i, w in enumerate(words):
        if w not in _SHAPE_SET:
            continue
        j = i
        while j > 0 and words[j - 1] in _ATTR and i - j < 2:
            j -= 1
        attrs = words[j:i]
        located = words[i + 1:i + 2] == ["at"]
        if not attrs and not located:
            continue
        before = words[max(0, j - 3):j]
        if before[-2:] == ["not", "a"] or before[-1:] == ["not"]:
            continue
        present = not (before[-1:] == ["no"])
        region = None
        if located and len(words) > i + 3 and words[i + 2] in _ROW and words[i + 3] in _COL:
            region = (_ROW[words[i + 2]], _COL[words[i + 3]])
        elif found_region is not None and i >= found_word:
            region = found_region
        colour = next((a for a in attrs if a in COLOURS), None)
        size = next((a for a in attrs if a in SIZES), None)
        out.append(Claim(colour, w, size, region, present))
    return out


def naming(p: Percept, claim: Claim) -> torch.Tensor:
    """[Nv] log-probability that each token names the claimed object's colour, shape and size (those given)."""
    lp = p.shape[:, SHAPES.index(claim.shape)].clone()
    if claim.colour is not None:
        lp += p.colour[:, COLOURS.index(claim.colour)]
    if claim.size is not None:
        lp += p.size[:, SIZES.index(claim.size)]
    return lp


def region_of(p: Percept, claim: Claim) -> tuple[int, int]:
    """(row, column) third of the image holding the claimed object where the tokens see it best."""
    row, col = thirds(p, locate(p, claim)[None])
    return int(row), int(col)


def locate(p: Percept, claim: Claim) -> torch.Tensor:
    """(x, y) of the claimed object where the tokens see it best (its named region ignored)."""
    lp = naming(p, claim)
    return _centroids(p, lp)[int(lp.argmax())]


def support(p: Percept, claim: Claim) -> float:
    """log P(the claim holds): the best token's log-probability of naming the object (in its region), or for an
    absent object the log of 1 minus the best token's probability."""
    lp = naming(p, claim)
    if claim.region is not None:
        row, col = thirds(p, _centroids(p, lp))
        lp = lp.masked_fill((row != claim.region[0]) | (col != claim.region[1]), float("-inf"))
    best = max(float(lp.max()), FLOOR)
    if claim.present:
        return best
    return float(torch.log1p(-torch.tensor(best).exp().clamp(max=1 - 1e-6)))


RELATION = re.compile(r"anchor : ([^.]*?) \. ([^.:]*?)\b(left of|right of|above|below|closest to|farthest from) it : "
                       r"([^.,]*?) \.")
AXIS = {"left of": (0, -1.0), "right of": (0, 1.0), "above": (1, -1.0), "below": (1, 1.0)}
RELATION_SCALE = 8.0  # pixels: an offset this far the right way is log sigmoid(1) = -0.31, as far the wrong way -1.31


def relation_support(p: Percept, cot: str, others: bool = True) -> float | None:
    """log P("anchor : A … [group] above it : B" holds), where the tokens see each object: a sigmoid of B's offset
    from A along the named axis and, with `others`, for every other object of the group the tokens see
    (`seen_objects`), a sigmoid of its offset the other way (the answer is the only one so placed); for "closest to"
    / "farthest from" (checked only with `others`), a sigmoid of how much nearer / farther B is than each.
    None when the CoT states no relation. `others=False` is session 23's rule (directions only, B against A)."""
    match = RELATION.search(cot)
    if match is None:
        return None
    anchor, target = claims(match.group(1)), claims(match.group(4))
    kind = match.group(3)
    if not anchor or not target or (kind not in AXIS and not others):
        return None
    a, b = locate(p, anchor[0]), locate(p, target[0])
    seen = seen_objects(p) if others else []
    named = (same_object(seen, anchor[0], a), same_object(seen, target[0], b))
    rest = [torch.tensor(o.xy) for o in seen if in_group(o, match.group(2)) and o not in named]
    if kind in AXIS:
        axis, sign = AXIS[kind]
        beyond = [sign * float(b[axis] - a[axis])] + [-sign * float(o[axis] - a[axis]) for o in rest]
    else:
        sign = 1.0 if kind == "closest to" else -1.0
        beyond = [sign * (float((o - a).norm()) - float((b - a).norm())) for o in rest]
    return float(F.logsigmoid(torch.tensor(beyond) / RELATION_SCALE).sum()) if beyond else None


@dataclass(frozen=True)
class Seen:
    """An object the visual tokens see: a connected group of tokens naming the same colour, shape and size."""

    colour: str
    shape: str
    size: str
    xy: tuple[float, float]  # centroid of its tokens' patch centres, weighted by their naming probability
    tokens: int


SEEN_PROB = 0.9  # a token counts when it names its colour, shape and size with at least this joint probability
SINGLE_PROB = 0.98  # ... and an object seen by one token only when that token is this sure (`seen_objects`)


def seen_objects(p: Percept, min_prob: float = SEEN_PROB, single_prob: float | None = None) -> list[Seen]:
    """Every object the tokens see (shipped smol, val 0-59, at 0.9: 210 of 218 objects found, 38 extra, median
    centre error 6.8 px; `python -m bench.lens_naming`). Background tokens name some object weakly; `min_prob` keeps
    them out. Most extras are one token on an object's edge naming it wrong; `single_prob` (when given) is the
    probability a lone token needs (segcompass.repair uses SINGLE_PROB: on val 0-299 it drops 141 of 156 one-token
    extras and 22 of 180 one-token real objects)."""
    n = int(round(len(p.colour) ** 0.5))
    best = [g.max(-1) for g in (p.colour, p.shape, p.size)]
    joint = best[0].values + best[1].values + best[2].values
    ident = [(int(c), int(sh), int(z)) for c, sh, z in zip(*(b.indices for b in best))]
    keep = (joint >= math.log(min_prob)).tolist()
    done = [False] * (n * n)
    out = []
    for t in range(n * n):
        if not keep[t] or done[t]:
            continue
        group, stack, done[t] = [t], [t], True
        while stack:  # 8-connected tokens naming the same object
            r, c = divmod(stack.pop(), n)
            near = (rr * n + cc for rr in (r - 1, r, r + 1) for cc in (c - 1, c, c + 1) if 0 <= rr < n and 0 <= cc < n)
            for v in near:
                if keep[v] and not done[v] and ident[v] == ident[t]:
                    done[v] = True
                    group.append(v)
                    stack.append(v)
        if single_prob is not None and len(group) == 1 and float(joint[t]) < math.log(single_prob):
            continue
        w = joint[group].exp()
        xy = (p.centres[group] * w[:, None]).sum(0) / w.sum()
        c, sh, z = ident[t]
        out.append(Seen(COLOURS[c], SHAPES[sh], SIZES[z], (float(xy[0]), float(xy[1])), len(group)))
    return out


EXTREME_AXIS = {"leftmost": (0, -1.0), "rightmost": (0, 1.0), "highest": (1, -1.0), "lowest": (1, 1.0)}
SAME_OBJECT = 32.0  # pixels (a token): the seen object nearest a named one, at most this far, is that object


def same_object(seen: list[Seen], claim: Claim, xy: torch.Tensor) -> Seen | None:
    """The seen object a CoT's named object is: of those with the named colour / shape / size (else of all), the
    nearest to where the tokens see the named object best, if within SAME_OBJECT."""
    def fits(o: Seen) -> bool:
        return o.shape == claim.shape and claim.colour in (None, o.colour) and claim.size in (None, o.size)
    pool = [o for o in seen if fits(o)] or seen
    near = min(pool, key=lambda o: math.dist(o.xy, xy.tolist()), default=None)
    return near if near is not None and math.dist(near.xy, xy.tolist()) <= SAME_OBJECT else None


def in_group(obj: Seen, head: str) -> bool:
    """Does a seen object belong to a plural group like "shapes", "red shapes", "small stars"?"""
    words = head.split()
    shape = next((w[:-1] for w in words if w[:-1] in SHAPES), None)
    return all(w not in COLOURS or w == obj.colour for w in words) and \
        all(w not in SIZES or w == obj.size for w in words) and shape in (None, obj.shape)


_RANKED = re.compile(r"(?:^|\. )([^.:]*?) : [^.]*? \. (leftmost|rightmost|highest|lowest|largest|smallest) is the "
                     r"([^.,]*?) \.")


def ranked_choice(cot: str) -> tuple[str, str, Claim] | None:
    """(group, kind, answer) of "stars : A at … , B at … . leftmost is the B ." (or largest / smallest); None when
    the CoT states no such choice or its answer names no object."""
    match = _RANKED.search(cot)
    answer = claims(match.group(3)) if match else []
    return (match.group(1), match.group(2), answer[0]) if answer else None


def _rivals(p: Percept, answer: Claim, group: str) -> tuple[torch.Tensor, Seen | None, list[Seen]]:
    """Where the tokens see the answer best, the seen object it is (if any), and every other seen member of `group`."""
    at = locate(p, answer)
    seen = seen_objects(p)
    own = same_object(seen, answer, at)
    return at, own, [o for o in seen if in_group(o, group) and o is not own]


def extreme_support(p: Percept, cot: str) -> float | None:
    """log P("stars : A at …, B at … . leftmost is the B" holds): for every other object of the group ("stars") the
    tokens see (`seen_objects`), a sigmoid of how far the answer lies beyond it along the named axis
    (RELATION_SCALE), the answer where the tokens see it best. None when the CoT states no extreme."""
    ranked = ranked_choice(cot)
    if ranked is None or ranked[1] not in EXTREME_AXIS:
        return None
    group, kind, answer = ranked
    axis, sign = EXTREME_AXIS[kind]
    at, _, others = _rivals(p, answer, group)
    if not others:
        return None
    offsets = torch.tensor([sign * (float(at[axis]) - o.xy[axis]) for o in others])
    return float(F.logsigmoid(offsets / RELATION_SCALE).sum())


SIZE_STEP = 3.0  # one size class the right way: log sigmoid(3) = -0.05; the same class -0.69; one the wrong way -3.05


def superlative_support(p: Percept, cot: str) -> float | None:
    """log P("circles : … . smallest is the B" holds): for every other object of the group the tokens see, a sigmoid
    of how many size classes (small < medium < large) B is beyond it, B's class read where the tokens see B (the
    CoT's word if no object is seen there). Area is judged by class only: two of one class are a coin toss."""
    ranked = ranked_choice(cot)
    if ranked is None or ranked[1] not in ("largest", "smallest"):
        return None
    group, kind, answer = ranked
    sign = 1.0 if kind == "largest" else -1.0
    _, own, others = _rivals(p, answer, group)
    size = answer.size if own is None else own.size
    if size is None or not others:
        return None
    steps = torch.tensor([sign * (SIZES.index(size) - SIZES.index(o.size)) for o in others], dtype=torch.float32)
    return float(F.logsigmoid(steps * SIZE_STEP).sum())


def verify(p: Percept, cot: str, seen: bool = True) -> float | None:
    """log P(every claim holds), the claims taken as independent: the sum of their log-probabilities; None when the
    CoT names no object. Claims: each named object (and its place), a relation, and with `seen` the answer against
    every other object of its group the tokens see (relations, extremes, largest / smallest). `seen=False` is
    session 23's rule."""
    scores = [support(p, c) for c in claims(cot)]
    extra = (extreme_support(p, cot), superlative_support(p, cot)) if seen else ()
    for score in (relation_support(p, cot, others=seen), *extra):
        if score is not None:
            scores.append(score)
    return sum(scores) if scores else None


@torch.no_grad()
def sample_traces(model, image, instruction: str, samples: int, temperature: float = 0.7,
                  generator: torch.Generator | None = None, ground_regions: bool | None = None) -> list:
    """The greedy Trace (what `encode` gives) and `samples` sampled ones for one image, the samples batched;
    `ground_regions` as in `SegCompass._generate_traces` (None: the checkpoint's choice)."""
    from .model import check_instruction

    if samples < 0:
        raise ValueError(f"samples must be >= 0, got {samples}")
    instruction = check_instruction(instruction)
    prep = model.prepare(image)
    tokens, feats = model.vision(prep.pixels[None].to(model._device()))
    traces = model._generate_traces([prep], tokens, feats, [instruction], None, None, 0.0, None,
                                    ground_regions=ground_regions)
    if samples:
        traces += model._generate_traces([prep] * samples, tokens.expand(samples, -1, -1),
                                         feats.expand(samples, *feats.shape[1:]), [instruction] * samples, None, None,
                                         temperature, generator, ground_regions=ground_regions)
    return traces


def choose(scores: list[float | None]) -> int:
    """Index of the best score; an unscored candidate (None) counts as the first one, ties keep the earlier."""
    base = 0.0 if scores[0] is None else scores[0]
    return max(range(len(scores)), key=lambda i: base if scores[i] is None else scores[i])


def best_of(model, image, instruction: str, samples: int, temperature: float = 0.7,
            generator: torch.Generator | None = None, ground_regions: bool | None = True) -> tuple:
    """The greedy CoT and `samples` sampled ones, each scored by `verify`; returns (the kept Trace, every
    candidate as {"cot", "score", "kept"} with the greedy one first). The kept one has the highest score
    (`choose`), so with no scores nothing changes. Costs about samples + 1 generations. The candidates are
    generated with grounded regions (segcompass.grounding) unless `ground_regions` is False (None: the
    checkpoint's choice): a CoT's places then hold by construction, and the score turns on what it chose."""
    traces = sample_traces(model, image, instruction, samples, temperature, generator, ground_regions)
    try:
        percept = perceive(model, traces[0])
        scores = [verify(percept, t.cot) for t in traces]
    except ValueError:  # the tokenizer cannot name the attribute words: nothing to check
        scores = [None] * len(traces)
    keep = choose(scores)
    cands = [{"cot": t.cot, "score": sc, "kept": i == keep} for i, (t, sc) in enumerate(zip(traces, scores))]
    return traces[keep], cands
