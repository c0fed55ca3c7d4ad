"""Paraphrased captions of a synthetic scene, built so that bag-of-words cannot solve binding.

A caption is drawn in two steps: a :class:`CaptionPlan` (template, word-choice style, which optional
parts to say) is sampled once per scene, then :func:`render` turns the plan and the scene's objects
into text. A binding twin is rendered from the *same* plans, so its captions contain the same words
bound differently ("a red circle left of a blue square" / "a blue circle left of a red square").

Every caption names the focal pair (objects 0 and 1) and the spatial relation between them;
distractors (objects 2..) are named when the plan says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# where object 0 lies relative to object 1 -> phrase "X <phrase> Y"; three styles each
RELATION_PHRASES = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over", "higher than"),
    "below": ("below", "under", "lower than"),
}
# "Y and, <adverb>, X": where X lies relative to the object just named
RELATION_ADVERBS = {
    "left": ("to its left", "on its left", "left of it"),
    "right": ("to its right", "on its right", "right of it"),
    "above": ("above it", "over it", "higher up"),
    "below": ("below it", "under it", "lower down"),
}
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
N_STYLES = 3
N_TEMPLATES = 8


@dataclass(frozen=True)
class Described:
    """What a caption can say about one object."""

    colour: str
    shape: str
    size: str  # "small" | "large"


@dataclass(frozen=True)
class CaptionPlan:
    """The choices behind one caption, independent of which object has which attribute."""

    template: int  # 0..N_TEMPLATES-1
    style: int  # 0..N_STYLES-1: picks synonyms for relation, size and the distractor clause
    sizes: bool  # name the sizes of the objects
    distractors: bool  # name the objects beyond the focal pair
    capital: bool  # capitalise the first letter
    period: bool  # end with a full stop


def plan_captions(rng: np.random.Generator, n: int, *, always_sizes: bool, size_prob: float,
                  distractor_prob: float) -> list[CaptionPlan]:
    """``n`` plans with distinct templates while there are enough (then templates repeat)."""
    order: list[int] = []
    while len(order) < n:
        order.extend(int(t) for t in rng.permutation(N_TEMPLATES))
    plans = []
    for template in order[:n]:
        plans.append(CaptionPlan(
            template=template,
            style=int(rng.integers(N_STYLES)),
            sizes=bool(always_sizes or rng.random() < size_prob),
            distractors=bool(rng.random() < distractor_prob),
            capital=bool(rng.random() < 0.5),
            period=bool(rng.random() < 0.3),
        ))
    return plans


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def noun_phrase(obj: Described, sizes: bool, style: int) -> str:
    """'a small red circle' (size named when ``sizes``), with the style's size synonym."""
    words = f"{obj.colour} {obj.shape}"
    if sizes:
        words = f"{SIZE_WORDS[obj.size][style]} {words}"
    return _article(words)


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _with_distractors(text: str, others: Sequence[str], style: int) -> str:
    listed = _join(others)
    if style == 0:
        return f"{text}, and also {listed}"
    if style == 1:
        return f"{text}, next to {listed}"
    verb = "is" if len(others) == 1 else "are"
    return f"{text}; {listed} {verb} also there"


def render(plan: CaptionPlan, objects: Sequence[Described], relation: str) -> str:
    """One caption. ``objects[0]``/``objects[1]`` are the focal pair; ``relation`` says where
    object 0 lies relative to object 1 (left/right/above/below)."""
    if len(objects) < 2:
        raise ValueError(f"a caption needs the focal pair, got {len(objects)} object(s)")
    if relation not in RELATION_PHRASES:
        raise ValueError(f"relation {relation!r} is not one of {sorted(RELATION_PHRASES)}")
    s = plan.style
    x, y = (noun_phrase(o, plan.sizes, s) for o in objects[:2])
    others = [noun_phrase(o, plan.sizes, s) for o in objects[2:]]
    rel, inv = RELATION_PHRASES[relation][s], RELATION_PHRASES[INVERSE[relation]][s]
    t = plan.template
    if t == 0:
        text = f"{x} {rel} {y}"
    elif t == 1:
        text = f"{y} is {inv} {x}"
    elif t == 2:  # counts every object, so it always lists the distractors
        text = f"{COUNT_WORDS[len(objects)]} shapes: {x} and, {RELATION_ADVERBS[INVERSE[relation]][s]}, {y}"
        if others:
            text += f", plus {_join(others)}"
        others = []
    elif t == 3:
        text = f"there is {x} {rel} {y}"
    elif t == 4:
        first, second = (x, y) if relation in ("left", "above") else (y, x)
        if relation in ("left", "right"):
            text = f"on the left {first}, on the right {second}"
        else:
            text = f"at the top {first}, at the bottom {second}"
    elif t == 5:
        text = f"{x} and {y}, the {objects[0].shape} {rel} the {objects[1].shape}"
    elif t == 6:
        text = f"a picture of {x} {rel} {y}"
    elif t == 7:
        text = f"{y} with {x} {RELATION_ADVERBS[relation][s]}"
    else:
        raise ValueError(f"caption template {t} does not exist (0..{N_TEMPLATES - 1})")
    if others and plan.distractors:
        text = _with_distractors(text, others, s)
    if plan.capital:
        text = text[0].upper() + text[1:]
    return text + "." if plan.period else text
