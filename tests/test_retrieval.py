"""The COCO metrics on hand-built score matrices, and the three ranking paths on tiny aligners."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor

from crossalign.retrieval import protocol, scoring
from crossalign.evaluate.binding import binding_probe
from crossalign.methods.base import Aligner, Rerank, State
from crossalign.retrieval.protocol import coco_metrics, i2t_ranks, retrieval_metrics, t2i_ranks
from crossalign.retrieval.scoring import score_states

torch.set_num_threads(1)


def reference_ranks(scores: np.ndarray, caption_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: sort each query's candidates, false ones first among equals (pessimistic)."""
    n, m = scores.shape
    i2t = []
    for i in range(n):
        order = sorted(range(m), key=lambda j: (-scores[i, j], caption_image[j] == i))
        i2t.append(min(r for r, j in enumerate(order) if caption_image[j] == i))
    t2i = []
    for j in range(m):
        order = sorted(range(n), key=lambda i: (-scores[i, j], i == caption_image[j]))
        t2i.append(order.index(caption_image[j]))
    return np.array(i2t), np.array(t2i)


# 3 images with 5, 6 and 7 captions (columns grouped by image)
CI_567 = np.repeat([0, 1, 2], [5, 6, 7])


def test_unequal_caption_counts_hand_computed():
    s = np.full((3, 18), 0.5, dtype=np.float32)
    s[0, CI_567 == 0] = 0.1  # image 0: all 13 false captions above its own -> rank 13
    s[1, np.flatnonzero(CI_567 == 1)[3]] = 0.9  # image 1: one true caption on top -> rank 0
    s[2, CI_567 == 2] = 0.6
    s[2, [0, 5]] = 0.7  # image 2: two false captions above its best -> rank 2
    assert i2t_ranks(s, CI_567).tolist() == [13, 0, 2]
    m = retrieval_metrics(s, CI_567)
    assert m["i2t_r1"] == pytest.approx(100 / 3)
    assert m["i2t_r5"] == pytest.approx(200 / 3) and m["i2t_r10"] == pytest.approx(200 / 3)
    assert m["i2t_medr"] == 3.0  # median rank 2 -> 1-based 3
    # t2i, e.g. caption 0 (image 0): 0.1 vs 0.5 (img 1) and 0.7 (img 2) -> rank 2
    t = t2i_ranks(s, CI_567)
    assert t[0] == 2 and t[5] == 2  # caption 5 (image 1, 0.5): image 2 above (0.7), image 0 tied (0.5)
    assert t[np.flatnonzero(CI_567 == 1)[3]] == 0
    assert m["rsum"] == pytest.approx(sum(m[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)))


def test_constant_scores_rank_last_among_ties():
    s = np.zeros((3, 18), dtype=np.float32)
    assert i2t_ranks(s, CI_567).tolist() == [13, 12, 11]  # every false caption ties above
    assert (t2i_ranks(s, CI_567) == 2).all()
    m = retrieval_metrics(s, CI_567)
    assert m["i2t_r1"] == 0 and m["t2i_r1"] == 0 and m["t2i_r5"] == 100


def test_tie_between_true_captions_is_not_a_penalty():
    s = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    assert i2t_ranks(s, np.array([0, 0, 1])).tolist() == [0, 0]


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    ci = np.repeat(np.arange(7), rng.integers(5, 8, size=7))  # 5-7 captions each
    s = rng.integers(0, 4, size=(7, ci.size)).astype(np.float32)  # many ties
    ref_i2t, ref_t2i = reference_ranks(s, ci)
    np.testing.assert_array_equal(i2t_ranks(s, ci), ref_i2t)
    np.testing.assert_array_equal(t2i_ranks(s, ci), ref_t2i)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(np.zeros((3, 2)), np.array([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.array([[np.nan, 0.0]]), np.array([0, 0]))
    with pytest.raises(ValueError, match="caption_image"):
        retrieval_metrics(np.zeros((2, 3)), np.array([0, 1]))


def test_separate_t2i_matrix_is_used():
    ci = np.array([0, 1])
    i2t = np.eye(2, dtype=np.float32)
    t2i = 1 - np.eye(2, dtype=np.float32)
    m = retrieval_metrics(i2t, ci, t2i)
    assert m["i2t_r1"] == 100 and m["t2i_r1"] == 0


def test_1k_folds_are_the_mean_of_per_fold_metrics(monkeypatch):
    monkeypatch.setattr(protocol, "FOLD_IMAGES", 4)  # 5 folds of 4 images
    rng = np.random.default_rng(0)
    ci = np.repeat(np.arange(20), rng.integers(1, 4, size=20))
    s = rng.normal(size=(20, ci.size)).astype(np.float32)
    s[ci, np.arange(ci.size)] += 1.0
    s2 = rng.normal(size=s.shape).astype(np.float32)  # a different t2i matrix: each direction reads its own
    metrics, r_i2t, r_t2i = coco_metrics(s, s2, ci)
    assert {k: v for k, v in metrics.items() if k != "1k"} == pytest.approx(retrieval_metrics(s, ci, s2))
    assert metrics["t2i_r1"] != pytest.approx(retrieval_metrics(s, ci)["t2i_r1"])  # s2 was read for t2i
    folds = []
    for f in range(5):
        cols = (ci >= 4 * f) & (ci < 4 * f + 4)
        folds.append(retrieval_metrics(s[4 * f:4 * f + 4][:, cols], ci[cols] - 4 * f, s2[4 * f:4 * f + 4][:, cols]))
    for key in ("i2t_r1", "t2i_r1", "rsum"):
        assert metrics["1k"][key] == pytest.approx(np.mean([x[key] for x in folds]))
    assert metrics["1k"]["i2t_r1"] >= metrics["i2t_r1"]  # 4 candidates per fold are easier than 20
    assert len(r_i2t) == 20 and len(r_t2i) == ci.size
    keep = ci < 19
    assert "1k" not in coco_metrics(s[:19][:, keep], s[:19][:, keep], ci[keep])[0]  # no folds unless 5 x 1K


def test_binding_probe_hand_computed():
    ci = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    s = np.zeros((4, 8), dtype=np.float32)
    s[0] = [2, 2, 1, 1, 0, 0, 0, 0]  # image 0 prefers its captions over twin 1's: 4/4 wins
    s[1] = [1, 1, 1, 1, 0, 0, 0, 0]  # image 1: all ties with twin 0's captions: 4 x 0.5
    s[2] = [0, 0, 0, 0, 0, 0, 5, 5]  # image 2 prefers twin 3's captions: 0/4
    s[3] = [0, 0, 0, 0, 0, 0, 5, 5]
    twins = [{"image": 0, "twin": 1, "swap": "colour"}, {"image": 1, "twin": 0, "swap": "colour"},
             {"image": 2, "twin": 3, "swap": "size"}]
    p = binding_probe(s, s, ci, twins)
    assert p["per_swap"]["colour"]["pairs"] == 1  # (0, 1) listed twice, counted once
    assert p["per_swap"]["colour"]["i2t"] == pytest.approx(100 * (4 + 2) / 8)
    # t2i colour: captions of 0 -> image 0 (2) vs image 1 (1): win; captions of 1 -> 1 (1) vs 0 (1): tie
    assert p["per_swap"]["colour"]["t2i"] == pytest.approx(100 * (2 + 1) / 4)
    # size: image 2 loses 4/4, image 3 wins 4/4; t2i: captions of 2: 0 vs 0 ties, captions of 3: 5 vs 5 ties
    assert p["per_swap"]["size"]["i2t"] == pytest.approx(50.0)
    assert p["per_swap"]["size"]["t2i"] == pytest.approx(50.0)
    assert p["overall"]["i2t"] == pytest.approx(100 * (6 + 4) / 16)
    assert p["chance"] == 50.0
    with pytest.raises(ValueError, match="twins\\[0\\]"):
        binding_probe(s, s, ci, [{"image": 0}])


# ------------------------------------------------------------------------------ tiny aligners
class DotAligner(Aligner):
    """Embeds: pooled features are the embedding; similarity = dot product."""

    embeds = True

    def encode_images(self, tokens: Tensor, pooled: Tensor) -> State:
        return {"emb": pooled}

    def encode_texts(self, tokens: Tensor, mask: Tensor, pooled: Tensor) -> State:
        return {"emb": pooled}

    def similarity(self, images: State, texts: State) -> Tensor:
        return images["emb"] @ texts["emb"].T  # (Bi, Bt)


class PairAligner(DotAligner):
    """Matches only (a nonlinear pair score over tokens), recording the largest call."""

    embeds = False
    matches = True

    def __init__(self):
        super().__init__()
        self.largest = 0

    def encode_images(self, tokens: Tensor, pooled: Tensor) -> State:
        return {"tok": tokens}  # (B, R, D)

    def encode_texts(self, tokens: Tensor, mask: Tensor, pooled: Tensor) -> State:
        return {"tok": tokens, "mask": mask}  # (B, L, D), (B, L)

    def match(self, images: State, texts: State) -> Tensor:
        self.largest = max(self.largest, images["tok"].shape[0])
        att = torch.einsum("prd,pld->plr", images["tok"], texts["tok"])  # (P, L, R)
        best = att.max(-1).values * texts["mask"]  # (P, L)
        return best.sum(-1) / texts["mask"].sum(-1)  # (P,)


class JointAligner(PairAligner):
    """Embeds and matches: re-ranks a similarity shortlist."""

    embeds = True

    def __init__(self, k: int, alpha: float):
        super().__init__()
        self.rerank = Rerank(k, alpha)

    def encode_images(self, tokens: Tensor, pooled: Tensor) -> State:
        return {"tok": tokens, "emb": pooled}

    def encode_texts(self, tokens: Tensor, mask: Tensor, pooled: Tensor) -> State:
        return {"tok": tokens, "mask": mask, "emb": pooled}


def _states(model: Aligner, n: int = 9, m: int = 20, seed: int = 0) -> tuple[State, State]:
    g = torch.Generator().manual_seed(seed)
    img_tok, txt_tok = torch.randn(n, 3, 4, generator=g), torch.randn(m, 5, 4, generator=g)
    mask = torch.arange(5)[None, :] < torch.randint(1, 6, (m,), generator=g)[:, None]  # (M, 5)
    return (model.encode_images(img_tok, img_tok.mean(1)),
            model.encode_texts(txt_tok * mask[..., None], mask, txt_tok.mean(1)))


def test_embedding_path_is_the_similarity():
    model = DotAligner()
    im, tx = _states(model)
    i2t, t2i = score_states(model, im, tx, block_images=4)
    np.testing.assert_allclose(i2t, (im["emb"] @ tx["emb"].T).numpy(), rtol=1e-5, atol=1e-6)
    assert i2t is t2i


@pytest.mark.parametrize("blocks", [(1, 1), (4, 7), (64, 512)])
def test_exact_all_pairs_is_independent_of_blocks_and_bounded(blocks):
    model = PairAligner()
    im, tx = _states(model)
    i2t, _ = score_states(model, im, tx, *blocks)
    brute = np.array([[float(model.match({"tok": im["tok"][i:i + 1]},
                                         {"tok": tx["tok"][j:j + 1], "mask": tx["mask"][j:j + 1]}))
                       for j in range(20)] for i in range(9)])
    model.largest = 0
    score_states(model, im, tx, *blocks)
    assert model.largest <= blocks[0] * blocks[1]  # never more pairs than one block at once
    np.testing.assert_allclose(i2t, brute, rtol=1e-5, atol=1e-6)


def test_rerank_lifts_the_shortlist_and_chunks_match_calls():
    model = JointAligner(k=3, alpha=0.5)
    im, tx = _states(model)
    i2t, t2i = score_states(model, im, tx, pair_chunk=5)
    assert model.largest <= 5
    sim = (im["emb"] @ tx["emb"].T).numpy()  # (9, 20)
    for i in range(9):
        short = np.argsort(-sim[i], kind="stable")[:3]
        rest = np.setdiff1d(np.arange(20), short)
        assert i2t[i, short].min() > i2t[i, rest].max()  # shortlisted captions first
        np.testing.assert_allclose(i2t[i, rest], sim[i, rest])
        match = model.match({"tok": im["tok"][[i] * 3]}, {"tok": tx["tok"][short], "mask": tx["mask"][short]})
        fused = 0.5 * match.numpy() + 0.5 * sim[i, short]
        assert (np.argsort(-i2t[i, short]) == np.argsort(-fused)).all()  # order = fused score
    for j in range(20):
        short = np.argsort(-sim[:, j], kind="stable")[:3]
        assert t2i[short, j].min() > np.delete(t2i[:, j], short).max()
    big_i2t, big_t2i = score_states(model, im, tx, pair_chunk=10_000)
    np.testing.assert_allclose(i2t, big_i2t, rtol=1e-6)  # chunking changes nothing
    np.testing.assert_allclose(t2i, big_t2i, rtol=1e-6)


def test_rerank_with_alpha_zero_keeps_the_similarity_order():
    model = JointAligner(k=4, alpha=0.0)
    im, tx = _states(model, seed=3)
    i2t, t2i = score_states(model, im, tx)
    sim = (im["emb"] @ tx["emb"].T).numpy()
    ci = np.arange(20) % 9
    assert retrieval_metrics(i2t, ci, t2i) == retrieval_metrics(sim, ci)


def test_protocol_description():
    assert scoring.describe_protocol(DotAligner(), 8, 16) == "embedding similarity"
    assert scoring.describe_protocol(PairAligner(), 8, 16) == "exact all-pairs (blocks 8x16)"
    assert scoring.describe_protocol(JointAligner(16, 0.5), 8, 16) == "shortlist k=16 re-rank alpha=0.5"
