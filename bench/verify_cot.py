"""Check a chain of thought's object claims against what the model itself sees (ShapeWorld).

The naming loss of the SFT makes each visual token's layer-L state name the colour, shape and size of
the object under it through the language model's own final norm and unembedding (a logit lens). So the
model can be asked, without new parameters, which objects its visual tokens show, and every object a
CoT names ("anchor : purple hexagon at top left", "answer : small orange star", "there is no orange
circle") can be checked against that: a named object is supported as much as the best visual token
(in the named region, when the CoT gives one) names its colour, shape and size; an object the CoT says
is absent, as much as no token names it. A CoT scores its least supported claim (log-probability).

`bench.best_of_n` uses this as a selection rule (`verified`): among the greedy CoT and the samples,
keep the best-supported one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.examples import COLOURS, SHAPES, SIZES
from segcompass.records import TokenRole

_ROW = {"top": 0, "middle": 1, "bottom": 2}
_COL = {"left": 0, "centre": 1, "right": 2}


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
def perceive(model, trace) -> Percept:
    """What the visual tokens of `trace` name, read from their layer-L states (SAE reconstruction + error)."""
    lang = model.language
    visual = trace.roles == int(TokenRole.VISUAL)
    states = (model.sae.decode(trace.dense_codes()) + trace.sae_error)[visual].float()
    groups = []
    for words in (COLOURS, SHAPES, SIZES):
        ids = lang.first_token_ids(words)
        if ids is None:
            raise ValueError(f"the tokenizer cannot name {words}")
        groups.append(torch.log_softmax(lang.word_logits(states[None], ids)[0].float(), -1))
    boxes = trace.patch_boxes.float()
    centres = torch.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], -1)
    return Percept(*groups, centres=centres, image_hw=torch.tensor(trace.original_size, dtype=torch.float32))


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


def _thirds(p: Percept, xy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    H, W = p.image_hw.tolist()
    row = torch.bucketize(xy[:, 1].contiguous(), torch.tensor([H / 3, 2 * H / 3]), right=True)
    col = torch.bucketize(xy[:, 0].contiguous(), torch.tensor([W / 3, 2 * W / 3]), right=True)
    return row, col


FLOOR = -30.0  # log-probability of a claim no token supports (none in the named region)
_ATTR = set(COLOURS) | set(SIZES)
_SHAPE_SET = set(SHAPES)


def claims(cot: str) -> list[Claim]:
    """The objects a CoT names with at least a colour or a size ("small orange star", "purple hexagon at top
    left"; bare shape words are skipped: "yellow shapes : circle , diamond" lists kinds, and "a square on its
    corner" is knowledge, not a scene claim). "there is no X" claims X absent; "not a X" claims nothing.
    The region of "found it in the R C" goes to the answer's object."""
    words = cot.replace(".", " . ").replace(",", " , ").split()
    found = re.search(r"found it in the (top|middle|bottom) (left|centre|right)", cot)
    found_region = (_ROW[found.group(1)], _COL[found.group(2)]) if found else None
    answer_at = cot.rfind("answer :")
    answer_word = len(cot[:answer_at].split()) if answer_at >= 0 else len(words)
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
        if words[i + 1:i + 2] == ["at"] and len(words) > i + 3 and words[i + 2] in _ROW and words[i + 3] in _COL:
            region = (_ROW[words[i + 2]], _COL[words[i + 3]])
        elif found_region is not None and i >= answer_word:
            region = found_region
        colour = next((a for a in attrs if a in COLOURS), None)
        size = next((a for a in attrs if a in SIZES), None)
        out.append(Claim(colour, w, size, region, present))
    return out


def _naming(p: Percept, claim: Claim) -> torch.Tensor:
    """[Nv] log-probability that each token names the claimed object's colour, shape and size (those given)."""
    lp = p.shape[:, SHAPES.index(claim.shape)].clone()
    if claim.colour is not None:
        lp += p.colour[:, COLOURS.index(claim.colour)]
    if claim.size is not None:
        lp += p.size[:, SIZES.index(claim.size)]
    return lp


def locate(p: Percept, claim: Claim) -> torch.Tensor:
    """(x, y) of the claimed object where the tokens see it best (its named region ignored)."""
    lp = _naming(p, claim)
    return _centroids(p, lp)[int(lp.argmax())]


def support(p: Percept, claim: Claim) -> float:
    """log P(the claim holds): the best token's log-probability of naming the object (in its region), or for an
    absent object the log of 1 minus the best token's probability."""
    lp = _naming(p, claim)
    if claim.region is not None:
        row, col = _thirds(p, _centroids(p, lp))
        lp = lp.masked_fill((row != claim.region[0]) | (col != claim.region[1]), float("-inf"))
    best = max(float(lp.max()), FLOOR)
    if claim.present:
        return best
    return float(torch.log1p(-torch.tensor(best).exp().clamp(max=1 - 1e-6)))


_RELATION = re.compile(r"anchor : ([^.]*?) \. [^.:]*?\b(left of|right of|above|below) it : ([^.,]*?) \.")
_AXIS = {"left of": (0, -1.0), "right of": (0, 1.0), "above": (1, -1.0), "below": (1, 1.0)}
RELATION_SCALE = 8.0  # pixels: an offset this far the right way is log sigmoid(1) = -0.31, as far the wrong way -1.31


def relation_support(p: Percept, cot: str) -> float | None:
    """log P("anchor : A … above it : B" holds): a sigmoid of B's offset from A along the named axis, where the
    tokens see each; None when the CoT states no directional relation (closest / farthest are not checked)."""
    match = _RELATION.search(cot)
    if match is None:
        return None
    anchor, target = claims(match.group(1)), claims(match.group(3))
    if not anchor or not target:
        return None
    axis, sign = _AXIS[match.group(2)]
    offset = sign * float(locate(p, target[0])[axis] - locate(p, anchor[0])[axis])
    return float(F.logsigmoid(torch.tensor(offset / RELATION_SCALE)))


def verify(p: Percept, cot: str) -> float | None:
    """The least supported claim's log-probability (objects, their regions, a directional relation); None when
    the CoT names no object."""
    scores = [support(p, c) for c in claims(cot)]
    relation = relation_support(p, cot)
    if relation is not None:
        scores.append(relation)
    return min(scores) if scores else None
