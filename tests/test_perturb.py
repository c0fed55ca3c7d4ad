"""Binding perturbations (crossalign.features.perturb) and the cached-negatives loader (crossalign.features.hardneg).

Expected outputs are written out by hand; the synthetic check uses the generator's own twin
captions (crossalign.data: rendered from the same plans with the focal pair swapped) as an
independent oracle for what a colour / size / position swap must produce."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from crossalign.features import hardneg
from crossalign.features import perturb
from crossalign.config import SyntheticParams
from crossalign.data.captions import Described, plan_captions, render
from crossalign.data.synthetic import relation, sample_scene, swap_pair
from crossalign.io import write_features


def bag(text: str) -> Counter:
    """Case-insensitive multiset of the words, "an" counted as "a" (re-agreed articles), computed
    independently of perturb.words."""
    words = (w.strip(".,;:!?").lower() for w in text.split())
    return Counter("a" if w == "an" else w for w in words if w)


def check_all(captions: list[str], k: int = 3) -> int:
    """Every perturbation keeps the words, changes the text, and is reproducible; returns the count."""
    total = 0
    for row, caption in enumerate(captions):
        got = perturb.perturb(caption, row, k)
        assert got == perturb.perturb(caption, row, k)  # deterministic
        assert len({t for _, t in got}) == len(got) <= k
        for code, text in got:
            assert bag(text) == bag(caption), (caption, text)
            assert text.lower() != caption.lower(), caption
            assert 0 <= code < len(perturb.KINDS)
        total += len(got)
    return total


@pytest.mark.parametrize("caption, expected", [
    ("a red circle left of a blue square",
     {("colour", "a blue circle left of a red square"), ("position", "a blue square left of a red circle")}),
    ("A small red circle is above a large blue star.",
     {("colour", "A small blue circle is above a large red star."),
      ("size", "A large red circle is above a small blue star."),
      ("position", "A large blue star is above a small red circle.")}),
    # adverbial relations: "Y with X to its left" / "X and, to its left, Y" / "on the left X, on the right Y"
    ("a tiny green star with a huge blue diamond lower down",
     {("colour", "a tiny blue star with a huge green diamond lower down"),
      ("size", "a huge green star with a tiny blue diamond lower down"),
      ("position", "a huge blue diamond with a tiny green star lower down")}),
    ("Two shapes: a blue cross and, to its left, a red circle",
     {("colour", "Two shapes: a red cross and, to its left, a blue circle"),
      ("position", "Two shapes: a red circle and, to its left, a blue cross")}),
    ("on the left a yellow star, on the right a red circle",
     {("colour", "on the left a red star, on the right a yellow circle"),
      ("position", "on the left a red circle, on the right a yellow star")}),
    # COCO-like: numbers, prepositions; one phrase with two colours is left alone
    ("two dogs and three cats", {("number", "three dogs and two cats")}),
    ("A cat sitting on a table.", {("position", "A table sitting on a cat.")}),
    ("an orange circle above a blue square",
     {("colour", "a blue circle above an orange square"), ("position", "a blue square above an orange circle")}),
    ("Red dogs and blue cats", {("colour", "Blue dogs and red cats")}),
    ("a red and white bus", set()),
    ("a tiny dog next to a small cat", set()),  # synonyms are one value; "next to" is symmetric
    ("a red dog and a red cat", set()),  # same value
    ("a photo of a kitchen", set()),
])
def test_hand_written_cases(caption, expected):
    assert set(perturb.candidates(caption)) == expected


def test_multiple_relations_give_one_swap_each():
    got = perturb.candidates("a cup on a table in a kitchen")
    assert got == [("position", "a table on a cup in a kitchen"), ("position", "a cup on a kitchen in a table")]


def test_draw_is_seeded_by_row_only_and_balances_kinds():
    caption = "A small red circle is above a large blue star."  # one candidate of each of three kinds
    assert {perturb.KINDS[c] for c, _ in perturb.perturb(caption, 7, 3)} == {"colour", "size", "position"}
    assert len(perturb.perturb(caption, 7, 10)) == 3 and perturb.perturb(caption, 7, 0) == []
    # the same row gives the same draw whatever else is perturbed, in any order (no shared state)
    caps = [caption, "two dogs and three cats", caption, "a cup on a table in a kitchen"]
    texts, source, kind = perturb.perturb_all(caps, 1)
    alone = [(r, perturb.perturb(c, r, 1)) for r, c in reversed(list(enumerate(caps)))]
    assert sorted((r, int(k), t) for r, got in alone for k, t in got) == sorted(zip(source.tolist(), kind.tolist(), texts))
    assert source.tolist() == [0, 1, 2, 3] and source.dtype == np.int64 and kind.dtype == np.int8
    # different rows draw differently somewhere (not one fixed choice per caption)
    assert len({perturb.perturb(caption, r, 1)[0] for r in range(40)}) == 3


def _scenes(n: int, seed: int = 0):
    p = SyntheticParams()
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        kind = ("colour", "size", "position")[i % 3]
        objects = sample_scene(rng, p, kind)
        plans = plan_captions(rng, 5, always_sizes=kind == "size", size_prob=p.size_mention,
                              distractor_prob=p.distractor_mention)
        yield kind, objects, swap_pair(objects, kind), plans


def _render(plan, scene):
    return render(plan, [Described(o.colour, o.shape, o.size) for o in scene], relation(scene[0], scene[1]))


def test_synthetic_twin_caption_is_a_perturbation_of_the_right_kind():
    """The generator's twin caption (same plan, focal pair swapped) is one of the perturbations of
    the caption, with the twin's swap kind, for every template where the twin differs by one swap
    (template 5 names the pair twice, "X and Y, the circle left of the square": a position twin
    differs there by two swaps)."""
    checked = Counter()
    for kind, scene, twin, plans in _scenes(150):
        for plan in plans:
            caption, expected = _render(plan, scene), _render(plan, twin)
            if kind == "position" and plan.template == 5:
                continue
            assert (kind, expected) in perturb.candidates(caption), (caption, expected)
            checked[kind] += 1
    assert min(checked.values()) > 150


def test_every_synthetic_perturbation_keeps_the_words():
    captions = [_render(plan, scene) for _, scene, _, plans in _scenes(120, seed=1) for plan in plans]
    assert check_all(captions) > 2 * len(captions)


def test_every_coco_perturbation_keeps_the_words(coco_sample):
    annotations = json.loads((coco_sample / "annotations" / "captions_train2017.json").read_text())["annotations"]
    captions = [a["caption"] for a in annotations]
    assert check_all(captions) >= 50  # 80 of the 400 sample captions had one when written (k = 1)
    kinds = Counter(perturb.KINDS[c] for c in perturb.perturb_all(captions, 1)[2])
    assert kinds["position"] > 0 and kinds["colour"] > 0


# ----------------------------------------------------------------------------------- hardneg
def _split(root, n_images=4, m=5):
    rng = np.random.default_rng(0)
    write_features(root, image_tokens=rng.normal(size=(n_images, 2, 3)), image_pooled=rng.normal(size=(n_images, 3)),
                   text_tokens=rng.normal(size=(m, 4, 6)), text_lengths=np.full(m, 3), text_pooled=rng.normal(size=(m, 6)),
                   image_ids=np.arange(n_images), caption_image_index=np.arange(m) % n_images, caption_ids=np.arange(m),
                   meta={"n_images": n_images})
    return root


def test_loader_round_trip_and_for_captions(tmp_path):
    root = _split(tmp_path / "s")
    lengths = np.array([2, 3, 1, 2])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.arange(8 * 6, dtype=np.float16).reshape(8, 6)
    pooled = np.arange(4 * 6, dtype=np.float16).reshape(4, 6)
    hardneg.write(root, twin_row=[1, 0, -1, -1], tokens=tokens, offsets=offsets, pooled=pooled,
                  source=[0, 0, 2, 4], kind=[0, 3, 1, 2], per_caption=2)
    neg = hardneg.load(root)
    assert isinstance(neg.tokens, np.memmap) and len(neg) == 4 and neg.per_caption == 2
    assert neg.twin_row.tolist() == [1, 0, -1, -1] and neg.kinds == perturb.KINDS
    np.testing.assert_array_equal(neg.tokens, tokens)
    np.testing.assert_array_equal(neg.pooled, pooled)
    assert [r.tolist() for r in neg.for_captions(np.array([0, 1, 2, 3, 4]))] == [[0, 1], [], [2], [], [3]]
    padded, got_lengths = neg.text.gather(np.array([1, 3]))
    assert got_lengths.tolist() == [3, 2]
    np.testing.assert_array_equal(padded[0], tokens[2:5])
    np.testing.assert_array_equal(padded[1, :2], tokens[6:8])


def test_loader_names_the_missing_file_and_the_fix(tmp_path):
    root = _split(tmp_path / "old")
    with pytest.raises(FileNotFoundError, match=r"twin_row\.npy.*dvc repro features"):
        hardneg.load(root)


def test_loader_rejects_inconsistent_arrays(tmp_path):
    root = _split(tmp_path / "s")
    hardneg.write(root, twin_row=[-1] * 4, tokens=np.zeros((3, 6)), offsets=[0, 1, 3], pooled=np.zeros((2, 6)),
                  source=[0, 1], kind=[0, 1], per_caption=1)
    np.save(root / "neg_source.npy", np.array([1, 0]))
    with pytest.raises(ValueError, match="neg_source.npy: not sorted"):
        hardneg.load(root)
    np.save(root / "neg_source.npy", np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="neg_source.npy"):
        hardneg.load(root)


def test_twin_row_array():
    records = [{"id": 5, "twin_id": 9}, {"id": 9, "twin_id": 5}, {"id": 7, "twin_id": 77}, {"id": 8}, {"id": 3, "twin_id": 3}]
    assert hardneg.twin_row_array(records, np.array([5, 9, 7, 8, 3])).tolist() == [1, 0, -1, -1, -1]


def test_empty_negatives_round_trip(tmp_path):
    root = _split(tmp_path / "s")
    hardneg.write(root, twin_row=[-1] * 4, tokens=np.zeros((0, 6)), offsets=[0], pooled=np.zeros((0, 6)),
                  source=np.zeros(0, np.int64), kind=np.zeros(0, np.int8), per_caption=0)
    neg = hardneg.load(root)
    assert len(neg) == 0 and neg.tokens.shape == (0, 6)
    assert [r.tolist() for r in neg.for_captions(np.array([0, 3]))] == [[], []]

