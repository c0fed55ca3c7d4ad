"""Optimiser hygiene (open_clip): no weight decay on biases, LayerNorm parameters, the logit scale."""
from __future__ import annotations

import json

import torch

from conftest import tiny_config
from crossalign.train import stage as training
from crossalign.methods import build_aligner
from crossalign.train.optim import param_groups

torch.set_num_threads(1)


def named_groups(model, weight_decay=0.05):
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g["weight_decay"], [names[id(p)] for p in g["params"]]) for g in param_groups(model, weight_decay)]


def test_contrastive_with_learnable_temperature(tmp_path):
    cfg = tiny_config(tmp_path, methods={"embed_dim": 16, "contrastive": {"learnable_temperature": True}})
    (wd, decayed), (wd0, kept) = named_groups(build_aligner(cfg, "contrastive", 12, 10))
    assert wd == 0.05 and wd0 == 0.0
    assert decayed == ["image_head.proj.linear.weight", "image_head.mlp.1.weight",  # the four weight matrices
                       "text_head.proj.linear.weight", "text_head.mlp.1.weight"]
    assert kept == ["logit_scale",
                    "image_head.proj.linear.bias", "image_head.proj.norm.weight", "image_head.proj.norm.bias",
                    "image_head.mlp.1.bias",
                    "text_head.proj.linear.bias", "text_head.proj.norm.weight", "text_head.proj.norm.bias",
                    "text_head.mlp.1.bias"]


def test_frozen_logit_scale_is_in_no_group(tmp_path):
    cfg = tiny_config(tmp_path, methods={"joint": {"matcher": "cross", "shared_projections": True}})  # names below
    model = build_aligner(cfg, "joint", 12, 10)  # fixed temperature: logit_scale frozen
    (_, decayed), (_, kept) = named_groups(model)
    assert "logit_scale" not in decayed + kept
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(decayed + kept) == sorted(trainable) and not set(decayed) & set(kept)
    # every LayerNorm (``*.norm.*``) and bias is exempt; every Linear weight decays
    assert all(n.endswith(".bias") or ".norm." in n for n in kept)
    assert all(n.endswith(".weight") and ".norm." not in n for n in decayed)
    assert {"encoder.t2i.0.q.weight", "encoder.head.3.weight", "image_proj.linear.weight"} <= set(decayed)
    assert {"encoder.i2t.0.norm.weight", "image_proj.norm.weight", "encoder.head.0.bias"} <= set(kept)


def test_training_uses_the_groups(tmp_path, tiny_features):
    """The checkpoint's optimiser groups: weight decay on the weight matrices only."""
    cfg = tiny_config(tmp_path, train={"epochs": 1, "weight_decay": 0.03, "device": "cpu", "threads": 1})
    training.run(cfg, tmp_path, "cross_attention", log=lambda *_: None)
    state = json.loads((tmp_path / "models" / "cross_attention" / "checkpoints" / "seed-0" / "state.json").read_text())
    model = build_aligner(cfg, "cross_attention", 12, 10)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    groups = state["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.03, 0.0]
    (_, decayed), (_, kept) = named_groups(model, 0.03)
    # 2 projections + 2 x (q, k, v, o) + 2 head layers = 12 weight matrices
    assert len(groups[0]["params"]) == len(decayed) == 12 and len(groups[1]["params"]) == len(kept)
    assert len(decayed) + len(kept) == len(names)
