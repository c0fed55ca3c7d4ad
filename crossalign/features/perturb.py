"""Binding perturbations of captions: the same words, bound differently (NegCLIP-style hard negatives).

Needs no metadata: works on any English caption, synthetic or real COCO. Two kinds of edit, each
keeping the caption's multiset of words and changing its text (case aside; the article "a"/"an"
before a swapped word is re-agreed, "an orange circle" <-> "a blue circle", so it counts as one
word: an ungrammatical negative would be told apart by its grammar, not its binding):

- **attribute swap** (kinds ``colour``, ``size``, ``number``): two lexicon words of the same class
  with *different values* exchange places ("a red circle left of a blue square" -> "a blue circle
  left of a red square"; "two dogs and three cats" -> "three dogs and two cats"). The two words
  must sit in different noun phrases: at least one word between them that is neither a lexicon
  word nor "and"/"or"/"," ("a red and white bus" is one phrase, left alone). Synonyms count as one
  value ("small"/"tiny"), so swapping them is not offered (same meaning, not a negative).
- **relation swap** (kind ``position``): the two noun phrases around a spatial relation exchange
  places ("a cat on a table" -> "a table on a cat"; "a red circle left of a blue square" -> "a blue
  square left of a red circle"), equivalent to flipping left<->right / above<->below with the same
  words. For a relation phrase between two noun phrases (prepositions, "X is left of Y", "X sitting
  on Y") the nearest noun phrase on each side, at most two words ("is", "are", ",", "-ing") apart; for an adverbial one ("X and, to its left, Y", "Y with X to its
  left", "on the left X, on the right Y"): the two nearest before it when it directly follows a noun
  phrase ("Y with X to its left"), else the nearest on each side, else the two nearest on one side.

Noun phrases are found without a tagger: a determiner (:data:`DETERMINERS`, which includes the
number words) followed by up to four words that are not stop words (:data:`STOP`: verbs "is"/"are",
prepositions, conjunctions, "-ing" words, punctuation, relation words). Captions with no noun phrase
of that shape simply get no relation swap.

Lexicon (documented in docs/configuration.md): the synthetic set's colours, sizes and
relations (:mod:`crossalign.data.captions`, :mod:`crossalign.data.render`) plus common COCO colour
and number adjectives and spatial prepositions.

Determinism: :func:`perturb` draws from a generator seeded by ``(seed, row)`` only, so a caption's
perturbations do not depend on how many captions, workers or batches there are. Speed: about
0.3 ms per caption on one core (phrase lookup indexed by first word), so 600K COCO captions take
minutes, not hours.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np

KINDS = ("colour", "size", "number", "position")  # kind code = index
KIND_CODE = {k: i for i, k in enumerate(KINDS)}

# word -> value; synonyms share a value (a swap needs two different values)
COLOURS = {w: w for w in ("red", "green", "blue", "yellow", "purple", "orange", "white", "black",  # synthetic
                           "brown", "pink", "silver", "gold", "tan")}  # + common COCO colours
COLOURS.update({"gray": "grey", "grey": "grey", "golden": "gold"})
SIZES = {**{w: "small" for w in ("small", "little", "tiny")},  # synthetic SIZE_WORDS
         **{w: "large" for w in ("large", "big", "huge", "giant")}}
NUMBERS = {w: w for w in ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")}
ATTRIBUTES = {"colour": COLOURS, "size": SIZES, "number": NUMBERS}

# relations between two noun phrases "X <rel> Y" (synthetic RELATION_PHRASES + COCO prepositions);
# symmetric ones ("next to", "beside", "near") are left out: swapping around them changes nothing
RELATIONS = (
    "to the left of", "left of", "on the left of", "to the right of", "right of", "on the right of",
    "above", "over", "higher than", "below", "under", "lower than", "underneath", "beneath",
    "on top of", "in front of", "behind", "on", "in", "inside", "atop",
)
# adverbial relations about the noun phrase(s) around them (synthetic RELATION_ADVERBS, template 4)
ADVERBS = (
    "to its left", "on its left", "left of it", "to its right", "on its right", "right of it",
    "above it", "over it", "higher up", "below it", "under it", "lower down",
    "on the left", "on the right", "at the top", "at the bottom",
)
DETERMINERS = frozenset(("a", "an", "the", "some", "his", "her", "their", "this", "that", *NUMBERS))
STOP = frozenset((
    "is", "are", "was", "were", "be", "has", "have", "and", "or", "but", "with", "while", "who", "which",
    "of", "to", "at", "by", "for", "from", "into", "onto", "near", "next", "beside", "there", "it", "its",
    "plus", "also", "as", "then", "up", "down",
)) | {w for phrase in RELATIONS + ADVERBS for w in phrase.split()}
MAX_NP_WORDS = 4  # words after the determiner
WORD = re.compile(r"\w+(?:[-'’]\w+)*|[^\w\s]")  # words keep inner hyphens/apostrophes ("t-shirt")


@dataclass(frozen=True)
class Token:
    text: str
    start: int
    end: int
    low: str  # text.lower()


def tokens(caption: str) -> list[Token]:
    """Words and single punctuation marks with their character spans."""
    return [Token(m.group(), m.start(), m.end(), m.group().lower()) for m in WORD.finditer(caption)]


def words(caption: str) -> list[str]:
    """Lower-cased words (no punctuation, "an" counted as "a"): the multiset a perturbation keeps."""
    return ["a" if t.low == "an" else t.low for t in tokens(caption) if t.text[0].isalnum() or t.text[0] == "_"]


def _swap_spans(caption: str, a: tuple[int, int], b: tuple[int, int]) -> str:
    """Exchange the character spans ``a`` < ``b`` (disjoint); keeps a capital first letter in place."""
    (a0, a1), (b0, b1) = a, b
    first, second = caption[a0:a1], caption[b0:b1]
    head = first.split()[0] if first.split() else ""
    if a0 == 0 and head[:1].isupper() and (len(head) == 1 or head[1:].islower()):
        first, second = first[0].lower() + first[1:], second[:1].upper() + second[1:]
    return caption[:a0] + second + caption[a1:b0] + first + caption[b1:]


def _agree(article: str, word: str) -> str:
    """"a"/"an" as ``word`` needs it (vowel letter rule, as crossalign.data.captions), same case."""
    low = "an" if word[:1].lower() in "aeiou" else "a"
    return low.capitalize() if article[:1].isupper() else low


def _exchange_words(caption: str, toks: list[Token], i: int, j: int) -> str:
    """Exchange words ``i`` < ``j``, re-agreeing an "a"/"an" right before either ("an orange" <->
    "a blue") and keeping a capital first letter in place."""
    new = {i: toks[j].text, j: toks[i].text}
    if i == 0 and toks[i].text[:1].isupper() and toks[i].text[1:].islower():
        new = {i: new[i].capitalize(), j: new[j].lower()}
    for w in (i, j):
        if w > 0 and toks[w - 1].low in ("a", "an"):
            new[w - 1] = _agree(toks[w - 1].text, new[w])
    text = caption
    for w in sorted(new, reverse=True):
        text = text[:toks[w].start] + new[w] + text[toks[w].end:]
    return text


def attribute_swaps(caption: str, toks: list[Token] | None = None) -> list[tuple[str, str]]:
    """Every (kind, perturbed caption) exchanging two attribute words of one class, different values,
    in different noun phrases (see the module docstring). ``toks``: ``tokens(caption)`` if known."""
    toks = tokens(caption) if toks is None else toks
    glue = {"and", "or", ","}
    out = []
    for kind, lexicon in ATTRIBUTES.items():
        spots = [i for i, t in enumerate(toks) if t.low in lexicon]
        for x, i in enumerate(spots):
            for j in spots[x + 1:]:
                if lexicon[toks[i].low] == lexicon[toks[j].low]:
                    continue
                between = [t.low for t in toks[i + 1:j]]
                if not any(w not in glue and not any(w in lex for lex in ATTRIBUTES.values()) for w in between):
                    continue
                out.append((kind, _exchange_words(caption, toks, i, j)))
    return out


def _index(phrases: tuple[str, ...]) -> dict[str, list[tuple[str, ...]]]:
    """First word -> the phrases starting with it as word tuples, longest first."""
    out: dict[str, list[tuple[str, ...]]] = {}
    for phrase in phrases:
        out.setdefault(phrase.split()[0], []).append(tuple(phrase.split()))
    return {w: sorted(ps, key=len, reverse=True) for w, ps in out.items()}


RELATION_INDEX, ADVERB_INDEX = _index(RELATIONS), _index(ADVERBS)


def _match(lows: list[str], i: int, index: dict[str, list[tuple[str, ...]]]) -> int:
    """Length in tokens of the longest indexed phrase starting at token ``i`` (0: none)."""
    for words in index.get(lows[i], ()):
        if tuple(lows[i:i + len(words)]) == words:
            return len(words)
    return 0


def _verb(word: str) -> bool:
    """An "-ing" form ("sitting", "holding"): ends a noun phrase, may sit between it and a relation."""
    return len(word) > 4 and word.endswith("ing")


def noun_phrases(toks: list[Token], taken: set[int]) -> list[tuple[int, int]]:
    """Token spans [i, j) of noun phrases: a determiner then 1..MAX_NP_WORDS non-stop words."""
    spans, i = [], 0
    while i < len(toks):
        if toks[i].low in DETERMINERS and i not in taken:
            j = i + 1
            while (j < len(toks) and j - i - 1 < MAX_NP_WORDS and j not in taken and toks[j].low not in STOP
                   and toks[j].low not in DETERMINERS and toks[j].text[0].isalnum()
                   and not _verb(toks[j].low)):
                j += 1
            if j > i + 1:
                spans.append((i, j))
                i = j
                continue
        i += 1
    return spans


def relation_swaps(caption: str, toks: list[Token] | None = None) -> list[tuple[str, str]]:
    """Every ("position", perturbed caption) exchanging the two noun phrases a relation links."""
    toks = tokens(caption) if toks is None else toks
    found: list[tuple[int, int, bool]] = []  # (start, end, adverbial)
    taken: set[int] = set()
    lows = [t.low for t in toks]
    i = 0
    while i < len(toks):
        n_adv, n_rel = _match(lows, i, ADVERB_INDEX), _match(lows, i, RELATION_INDEX)
        n = max(n_adv, n_rel)
        if n:
            found.append((i, i + n, n_adv > n_rel))
            taken.update(range(i, i + n))
            i += n
        else:
            i += 1
    phrases = noun_phrases(toks, taken)
    out, seen = [], set()
    for start, end, adverbial in found:
        before = [p for p in phrases if p[1] <= start]
        after = [p for p in phrases if p[0] >= end]
        pair = None
        if not adverbial:  # "X <rel> Y", "X is <rel> Y": adjacent phrases only
            if before and after:
                gap = [t.low for t in toks[before[-1][1]:start]]
                if after[0][0] == end and len(gap) <= 2 and all(w in ("is", "are", ",") or _verb(w) for w in gap):
                    pair = (before[-1], after[0])
        elif len(before) >= 2 and before[-1][1] == start:  # "Y with X to its left": X, Y both before
            pair = (before[-2], before[-1])
        elif before and after:  # "X and, to its left, Y"
            pair = (before[-1], after[0])
        elif len(before) >= 2:
            pair = (before[-2], before[-1])
        elif len(after) >= 2:
            pair = (after[0], after[1])
        if pair is None or pair in seen:
            continue
        seen.add(pair)
        (a0, a1), (b0, b1) = pair
        text = _swap_spans(caption, (toks[a0].start, toks[a1 - 1].end), (toks[b0].start, toks[b1 - 1].end))
        out.append(("position", text))
    return out


def candidates(caption: str) -> list[tuple[str, str]]:
    """All distinct perturbations of ``caption`` as (kind, text), in a fixed order; none equals
    the caption (case-insensitively) and each keeps its multiset of words."""
    key = caption.lower()
    out, texts = [], {key}
    toks = tokens(caption)
    for kind, text in attribute_swaps(caption, toks) + relation_swaps(caption, toks):
        if text.lower() not in texts:
            texts.add(text.lower())
            out.append((kind, text))
    return out


def perturb(caption: str, row: int, k: int, seed: int = 0) -> list[tuple[int, str]]:
    """Up to ``k`` perturbations of caption ``row`` as (kind code, text), drawn from a generator
    seeded by ``(seed, row)``: kinds in a random order, cycling, each a random unused candidate of
    that kind, so kinds stay balanced when a caption offers several."""
    if k <= 0:
        return []
    pool = candidates(caption)
    if not pool:
        return []
    rng = random.Random(f"{seed}:{row}")  # str seeds hash with SHA-512: stable across runs and machines
    by_kind: dict[str, list[str]] = {}
    for kind, text in pool:
        by_kind.setdefault(kind, []).append(text)
    kinds = [KINDS[c] for c in sorted(KIND_CODE[k_] for k_ in by_kind)]
    rng.shuffle(kinds)
    for kind in kinds:
        rng.shuffle(by_kind[kind])
    out: list[tuple[int, str]] = []
    while len(out) < k and any(by_kind[kind] for kind in kinds):
        for kind in kinds:
            if by_kind[kind] and len(out) < k:
                out.append((KIND_CODE[kind], by_kind[kind].pop(0)))
    return out


def perturb_all(captions: list[str], k: int, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Perturbations of every caption -> (texts (P,), source rows (P,) int64 ascending, kinds (P,) int8)."""
    texts: list[str] = []
    source: list[int] = []
    kind: list[int] = []
    for row, caption in enumerate(captions):
        for code, text in perturb(caption, row, k, seed):
            texts.append(text)
            source.append(row)
            kind.append(code)
    return texts, np.asarray(source, np.int64), np.asarray(kind, np.int8)
