"""The everyday facts behind ShapeWorld-RS's `knowledge` family (the spec's fact table, all of it).

Each fact names one attribute. `clauses` are interchangeable predicates that complete
"Which shape …?" / "Point to the thing that …"; `reason` is the fact as the CoT states it
(lowercase words only, no punctuation).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Fact:
    """One fact: the attribute it names, query clauses that state it, and its CoT sentence."""

    attribute: str
    clauses: tuple[str, ...]
    reason: str


def _shape_of(attribute: str, thing: str, reason: str) -> Fact:
    return Fact(attribute, (f"has the shape of {thing}", f"is shaped like {thing}"), reason)


def _colour_of(attribute: str, thing: str, reason: str) -> Fact:
    return Fact(attribute, (f"is the colour of {thing}", f"has the colour of {thing}", f"is the same colour as {thing}"), reason)


KNOWLEDGE_FACTS: tuple[Fact, ...] = (
    Fact("circle", ("could roll down a hill", "would roll down a hill"), "a shape that rolls is a circle"),
    _shape_of("circle", "a full moon", "a full moon is a circle"),
    _shape_of("circle", "a wheel", "a wheel is a circle"),
    Fact("triangle", ("has three corners", "has exactly three corners"), "three corners means a triangle"),
    _shape_of("triangle", "a slice of pizza", "a slice of pizza is a triangle"),
    _shape_of("triangle", "a warning sign", "a warning sign is a triangle"),
    _shape_of("square", "a chessboard square", "a chessboard square is a square"),
    _shape_of("square", "a sticky note", "a sticky note is a square"),
    Fact("diamond", ("has the shape on the diamonds playing card", "looks like the symbol on the diamonds playing card"),
         "the diamonds card shows a diamond"),
    Fact("diamond", ("looks like a square balanced on its corner", "is a square balanced on its corner"),
         "a square on its corner is a diamond"),
    _shape_of("hexagon", "a honeycomb cell", "a honeycomb cell is a hexagon"),
    Fact("hexagon", ("has six corners", "has exactly six corners"), "six corners means a hexagon"),
    Fact("star", ("is what you put on top of a Christmas tree", "looks like what goes on top of a Christmas tree"),
         "the top of a christmas tree has a star"),
    _shape_of("star", "a sheriff's badge", "a sheriff badge is a star"),
    _colour_of("red", "a ripe tomato", "a ripe tomato is red"),
    _colour_of("red", "a fire truck", "a fire truck is red"),
    _colour_of("green", "grass", "grass is green"),
    _colour_of("green", "a fresh leaf", "a fresh leaf is green"),
    _colour_of("blue", "a clear sky", "a clear sky is blue"),
    _colour_of("blue", "the deep ocean", "the deep ocean is blue"),
    _colour_of("yellow", "a banana", "a banana is yellow"),
    _colour_of("yellow", "a lemon", "a lemon is yellow"),
    _colour_of("purple", "grapes", "grapes are purple"),
    _colour_of("purple", "lavender", "lavender is purple"),
    _colour_of("orange", "a pumpkin", "a pumpkin is orange"),
    _colour_of("orange", "a carrot", "a carrot is orange"),
    _colour_of("white", "snow", "snow is white"),
    _colour_of("white", "milk", "milk is white"),
)
