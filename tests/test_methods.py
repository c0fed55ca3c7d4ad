"""The four aligners: interface, exact blockwise scoring, masking, save/load."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from crossalign.io import load_features
from crossalign.methods import REGISTRY, build_aligner, get_method, load_aligner, method_params, save_aligner
from crossalign.methods import common
from crossalign.methods.base import Batch, Rerank, index_state
from crossalign.retrieval.scoring import score_matrices
from conftest import tiny_config

torch.set_num_threads(1)
METHODS = ["concat_mlp", "cross_attention", "contrastive", "joint"]
DI, DT, R, L = 12, 10, 4, 6


def make_batch(b: int = 8, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, L + 1, (b,), generator=g)
    mask = torch.arange(L)[None, :] < lengths[:, None]
    tokens = torch.randn(b, L, DT, generator=g) * mask[..., None]
    return Batch(torch.randn(b, R, DI, generator=g), torch.randn(b, DI, generator=g), tokens, mask,
                 torch.randn(b, DT, generator=g), torch.arange(b) // 2)


@pytest.fixture
def cfg(tmp_path):
    return tiny_config(tmp_path)


def encode(model, batch):
    return (model.encode_images(batch.image_tokens, batch.image_pooled),
            model.encode_texts(batch.text_tokens, batch.text_mask, batch.text_pooled))


def test_registry_names_the_four_methods():
    assert sorted(REGISTRY) == sorted(METHODS)
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        get_method("nope")


@pytest.mark.parametrize("method", METHODS)
def test_forward_gives_finite_named_losses_and_gradients(cfg, method):
    torch.manual_seed(0)
    model, loss_fn = build_aligner(cfg, method, DI, DT), get_method(method).build_loss(cfg)
    batch = make_batch()
    terms = loss_fn(model(batch), batch)
    assert terms and all(k.endswith("loss") and torch.isfinite(v) for k, v in terms.items())
    sum(terms.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{method}: parameters without gradient {missing}"


@pytest.mark.parametrize("method", ["concat_mlp", "cross_attention", "joint"])
def test_match_block_equals_pairwise_match(cfg, method, monkeypatch):
    torch.manual_seed(0)
    model = build_aligner(cfg, method, DI, DT).eval()
    batch = make_batch(6)
    with torch.no_grad():
        im, tx = encode(model, batch)
        block = model.match_block(im, tx)  # (6, 6)
        single = torch.stack([torch.stack([model.match(index_state(im, [i]), index_state(tx, [t]))[0]
                                           for t in range(6)]) for i in range(6)])
        monkeypatch.setattr(common, "PAIR_CHUNK_ELEMENTS", 1)  # one image per chunk: same numbers
        chunked = model.match_block(im, tx)
    assert block.shape == (6, 6)
    torch.testing.assert_close(block, single, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked, block, rtol=1e-5, atol=1e-5)


def test_cross_block_is_multihead_attention_with_residual_layernorm():
    torch.manual_seed(0)
    block = common.CrossBlock(16, 4, dropout=0.0).eval()
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([block.q.weight, block.k.weight, block.v.weight]))
        mha.in_proj_bias.copy_(torch.cat([block.q.bias, block.k.bias, block.v.bias]))
        mha.out_proj.weight.copy_(block.o.weight)
        mha.out_proj.bias.copy_(block.o.bias)
    x, kv = torch.randn(3, 5, 16), torch.randn(3, 7, 16)
    pad = torch.tensor([[False] * 7, [False] * 4 + [True] * 3, [False] + [True] * 6])
    with torch.no_grad():
        k, v = block.keys(kv)
        ours = block(x, block.q(x), k, v, pad)
        ref = block.norm(x + mha(x, kv, kv, key_padding_mask=pad, need_weights=False)[0])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["cross_attention", "joint"])
def test_padded_caption_tokens_do_not_change_scores(cfg, method):
    torch.manual_seed(0)
    model = build_aligner(cfg, method, DI, DT).eval()
    batch = make_batch(4)
    noisy = Batch(**{**vars(batch), "text_tokens": batch.text_tokens + 50.0 * (~batch.text_mask)[..., None]})
    with torch.no_grad():
        a = model.match_block(*encode(model, batch))
        b = model.match_block(*encode(model, noisy))
    torch.testing.assert_close(a, b)


def test_directions_have_separate_attention_modules(cfg):
    model = build_aligner(cfg, "cross_attention", DI, DT)
    t2i = {id(p) for p in model.encoder.t2i.parameters()}
    assert t2i and not t2i & {id(p) for p in model.encoder.i2t.parameters()}


def test_contrastive_temperature_fixed_or_learnable(tmp_path):
    fixed = build_aligner(tiny_config(tmp_path), "contrastive", DI, DT)
    assert not fixed.logit_scale.requires_grad
    assert fixed.logit_scale.exp().item() == pytest.approx(10.0)  # 1 / 0.1, the article's temperature
    learn = build_aligner(tiny_config(tmp_path, methods={"embed_dim": 16, "contrastive": {"learnable_temperature": True}}),
                          "contrastive", DI, DT)
    assert learn.logit_scale.requires_grad
    with torch.no_grad():
        learn.logit_scale.fill_(10.0)  # clamped at CLIP's 100
    im, tx = encode(learn.eval(), make_batch(2))
    assert learn.similarity(im, tx).abs().max() <= 100.0 + 1e-4


def test_capabilities_and_rerank(cfg):
    caps = {m: (build_aligner(cfg, m, DI, DT).embeds, build_aligner(cfg, m, DI, DT).matches) for m in METHODS}
    assert caps == {"concat_mlp": (False, True), "cross_attention": (False, True),
                    "contrastive": (True, False), "joint": (True, True)}
    assert build_aligner(cfg, "joint", DI, DT).rerank == Rerank(cfg.methods.joint.shortlist_k, cfg.methods.joint.fusion_alpha)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip_scores_identically(cfg, method, tmp_path, tiny_features):
    torch.manual_seed(0)
    model = build_aligner(cfg, method, DI, DT).eval()
    meta = {"method": method, "image_dim": DI, "text_dim": DT, "methods": method_params(cfg, method), "best_epoch": 3}
    save_aligner(model, tmp_path / "m", meta)
    loaded, got = load_aligner(tmp_path / "m")
    assert got["best_epoch"] == 3 and (tmp_path / "m" / "model.safetensors").exists()
    split = load_features(tiny_features / "data" / "features" / "val")
    for a, b in zip(score_matrices(model, split), score_matrices(loaded, split)):
        assert a.shape == (split.n_images, split.n_captions)
        assert (a == b).all()


def test_load_rejects_weights_of_another_architecture(cfg, tmp_path):
    model = build_aligner(cfg, "contrastive", DI, DT)
    save_aligner(model, tmp_path / "m", {"method": "contrastive", "image_dim": DI, "text_dim": DT,
                                         "methods": method_params(cfg, "contrastive")})
    meta = json.loads((tmp_path / "m" / "model.json").read_text())
    meta["method"] = "concat_mlp"
    meta["methods"] = method_params(cfg, "concat_mlp")
    (tmp_path / "m" / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not fit concat_mlp"):
        load_aligner(tmp_path / "m")
    with pytest.raises(ValueError, match="meta lacks"):
        save_aligner(model, tmp_path / "x", {"method": "contrastive"})


def test_joint_aligns_before_it_fuses(tmp_path):
    """The contrastive (ITC) and matching (ITM) objectives train the same token projections: the
    cross-encoder reads exactly the projected tokens whose pool is embedded, ITC alone moves the
    projections but not the encoder, ITM alone moves them but not the embedding heads."""
    from crossalign.methods.losses import ContrastiveLoss, MatchingLoss
    from crossalign.methods import trainable_params

    # the structure under test is the cross-attention matcher's, without positions (the late
    # matcher and positions are tested in test_binding_methods.py)
    cfg = tiny_config(tmp_path, methods={"embed_dim": 16, "image_positions": "none",
                                         "cross_attention": {"heads": 2, "matcher": "cross"},
                                         "joint": {"heads": 2, "hard_k": 4, "shortlist_k": 4, "matcher": "cross",
                                                   "shared_projections": True}})
    torch.manual_seed(0)
    model = build_aligner(cfg, "joint", DI, DT)
    batch = make_batch()
    with torch.no_grad():
        im, tx = encode(model.eval(), batch)
        x_img, x_txt = model.image_proj(batch.image_tokens), model.text_proj(batch.text_tokens)  # (B, R|L, D)
        torch.testing.assert_close(im["x_img"], x_img)
        torch.testing.assert_close(tx["x_txt"], x_txt)
        w = batch.text_mask[..., None].float()  # caption padding is not pooled
        torch.testing.assert_close(im["embed"], torch.nn.functional.normalize(model.image_head(x_img.mean(1)), dim=-1))
        torch.testing.assert_close(tx["embed"], torch.nn.functional.normalize(
            model.text_head((x_txt * w).sum(1) / w.sum(1)), dim=-1))
    model.train()
    moved = {}
    for name, loss in (("itc", ContrastiveLoss()), ("itm", MatchingLoss())):
        model.zero_grad(set_to_none=True)
        sum(loss(model(batch), batch).values()).backward()
        moved[name] = {n.split(".")[0] for n, p in model.named_parameters()
                       if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved["itc"] == {"image_proj", "text_proj", "image_head", "text_head"}
    assert moved["itm"] == {"image_proj", "text_proj", "encoder"}
    # one set of projections: joint = cross_attention + the two embedding heads, not + a whole contrastive model
    heads = sum(p.numel() for p in [*model.image_head.parameters(), *model.text_head.parameters()])
    cross = trainable_params(build_aligner(cfg, "cross_attention", DI, DT))
    assert trainable_params(model) == cross + heads
    # at the shipped dims (1280-d image, 384-d text tokens, D = 64): 152,833 + 2 x 8,448 = 169,729,
    # where the ensemble it replaced had cross_attention + contrastive = 152,833 + 115,200 = 268,033
    from crossalign import config
    shipped = config.from_dict({"methods": {"joint": {"matcher": "cross", "shared_projections": True},
                                            "cross_attention": {"matcher": "cross"}}}, "defaults")
    counts = {m: trainable_params(build_aligner(shipped, m, 1280, 384)) for m in ("cross_attention", "joint")}
    assert counts == {"cross_attention": 152_833, "joint": 169_729}  # sincos positions have no parameters


def test_joint_itc_input_pooled_embeds_the_pooled_features_only(tmp_path):
    """itc_input: pooled -> the shortlist embedding reads image_pooled / text_pooled (as contrastive)
    and no token; tokens (the default) -> it moves with the tokens and ignores the pooled vectors."""
    embeds = {}
    for itc in ("tokens", "pooled"):
        cfg = tiny_config(tmp_path, methods={"embed_dim": 16, "joint": {"itc_input": itc, "heads": 2}})
        torch.manual_seed(0)
        model = build_aligner(cfg, "joint", DI, DT).eval()
        a, b = make_batch(seed=0), make_batch(seed=1)
        tokens_swapped = Batch(b.image_tokens, a.image_pooled, b.text_tokens, b.text_mask, a.text_pooled, a.image_index)
        pooled_swapped = Batch(a.image_tokens, b.image_pooled, a.text_tokens, a.text_mask, b.text_pooled, a.image_index)
        with torch.no_grad():
            embeds[itc] = [tuple(s["embed"] for s in encode(model, x)) for x in (a, tokens_swapped, pooled_swapped)]
    (im, tx), (im_t, tx_t), (im_p, tx_p) = embeds["pooled"]
    torch.testing.assert_close(im, im_t) and torch.testing.assert_close(tx, tx_t)  # tokens changed: same embedding
    assert not torch.allclose(im, im_p) and not torch.allclose(tx, tx_p)
    (im, tx), (im_t, tx_t), (im_p, tx_p) = embeds["tokens"]
    torch.testing.assert_close(im, im_p) and torch.testing.assert_close(tx, tx_p)  # pooled changed: same embedding
    assert not torch.allclose(im, im_t) and not torch.allclose(tx, tx_t)
