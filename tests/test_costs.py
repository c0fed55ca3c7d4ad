"""costs: parameter counts, serving kind, query latency ranked as evaluation ranks, training
seconds per epoch read back from MLflow; measured numbers stay out of reports/."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_tiny_features, tiny_config
from crossalign.select import costs
from crossalign.tracking import registry
from crossalign.io import load_features
from crossalign.methods import WEIGHTS, build_aligner
from crossalign.retrieval.scoring import encode_images, encode_texts, score_states
from crossalign.tracking.runs import weights_sha256
from eval_helpers import run_of, save_model

torch.set_num_threads(1)
METHODS = ("concat_mlp", "cross_attention", "contrastive", "joint")


def test_trainable_params_counts_only_what_trains():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 5, bias=False))
    model[1].weight.requires_grad_(False)
    assert costs.trainable_params(model) == 3 * 2 + 2


@pytest.mark.parametrize("method", METHODS)
def test_rank_images_ranks_as_evaluation_does(tmp_path, method):
    cfg = tiny_config(tmp_path, evaluate={"pair_chunk": 7})  # several re-rank chunks
    make_tiny_features(tmp_path / "test", n_images=12, captions_per_image=2)
    split = load_features(tmp_path / "test")
    torch.manual_seed(0)
    model = build_aligner(cfg, method, split.image_dim, split.text_dim).eval()
    gallery = encode_images(model, split, torch.device("cpu"))
    queries = encode_texts(model, split, torch.device("cpu"))
    _, t2i = score_states(model, gallery, queries, 4, 8, pair_chunk=5)  # (N, M) evaluation's t2i scores
    expected = np.argsort(-t2i, axis=0, kind="stable")[:10].T  # (M, 10)
    got = costs.rank_images(model, gallery, queries, cfg).numpy()
    np.testing.assert_array_equal(got, expected)
    assert costs.serving(model).split(":")[0] == {"contrastive": "yes", "joint": "shortlist"}.get(method, "no")


def test_train_seconds_come_from_the_mlflow_runs(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path)
    make_tiny_features(tmp_path / "data" / "features" / "test", n_images=6, image_dim=12, text_dim=10)
    weights = save_model(cfg, tmp_path, "contrastive", 0) / WEIGHTS
    run_id = run_of(cfg, tmp_path, "contrastive", 0)
    with registry.using(cfg, tmp_path) as client:
        for epoch, seconds in ((1, 2.0), (2, 4.0), (3, 9.0)):
            client.log_metric(run_id, "epoch/seconds", seconds, step=epoch)
    metrics = {"seeds": [0], "weights_sha256": {"0": weights_sha256(weights)}}
    got = costs.train_seconds(cfg, tmp_path, "contrastive", metrics)
    assert got == {"s_per_epoch": 5.0, "epochs": 3, "mlflow_runs": [run_id]}
    assert costs.train_seconds(cfg, tmp_path, "contrastive", {"seeds": [0], "weights_sha256": {"0": "f" * 64}}) is None
    # without the weights' hash: found by the run's method/seed tags
    assert costs.train_seconds(cfg, tmp_path, "contrastive", {"seeds": [0]})["s_per_epoch"] == 5.0
    assert costs.train_seconds(cfg, tmp_path, "joint", {"seeds": [0]}) is None  # no run: said, not invented

    test = load_features(tmp_path / "data" / "features" / "test")
    models = costs.load_models(tmp_path, {"contrastive": {"seeds": [0], "scores_seed": 0}})
    measured = costs.measure(cfg, tmp_path, models, {"contrastive": metrics}, test, torch.device("cpu"))
    lat = measured["contrastive"]["query_latency"]
    assert (lat["1"]["queries"], lat["1000"]["queries"], lat["1000"]["gallery_images"]) == (1, 12, 6)
    assert (lat["1"]["repeats"], lat["1000"]["repeats"]) == (costs.REPEATS[1], costs.REPEATS[1000])
    monkeypatch.setattr(costs, "BUDGET_S", 0.0)  # a slow method: one timed call per count, said so
    slow = costs.query_latency(models["contrastive"], test, torch.device("cpu"), cfg)
    assert (slow["1"]["repeats"], slow["1000"]["repeats"]) == (1, 1)
    files = costs.write(tmp_path, measured, "test machine")
    assert [f.relative_to(tmp_path).as_posix() for f in files] == ["costs/costs.json", "costs/costs.md"]
    md = files[1].read_text()
    assert "| contrastive | " in md and "| 5.0 | " in md and "(12 queries)" in md and "test machine" in md
    assert set(costs.mlflow_metrics(measured)) == {"cost_contrastive_train_s_per_epoch", "cost_contrastive_query_1_ms",
                                                   "cost_contrastive_query_1000_ms"}
    with pytest.raises(FileNotFoundError, match="models/joint/final/seed-0/model.json"):
        costs.load_models(tmp_path, {"joint": {"seeds": [0]}})


# --------------------------------------------------------------- MACs and pair calls per text query
DI, DT, D = 12, 10, 8  # frozen image / text feature widths, methods.embed_dim
SHAPE = costs.QueryShape(gallery=6, regions=4, tokens=5)  # N gallery images, R image tokens, L query tokens


def _model(tmp_path, method: str, **section):
    """``method`` at embed_dim 8, 2 heads, one layer, concat hidden 16, joint shortlist 3 (+ ``section``)."""
    params = {"concat_mlp": {"hidden": 16}, "cross_attention": {"heads": 2, "layers": 1, "matcher": "late"},
              "joint": {"heads": 2, "layers": 1, "shortlist_k": 3, "matcher": "late", "shared_projections": False}}
    params[method] = {**params.get(method, {}), **section}
    cfg = tiny_config(tmp_path, methods={"embed_dim": D, **params})
    torch.manual_seed(0)
    return build_aligner(cfg, method, DI, DT).eval()


# Counted by hand from the architectures (docs/methods.md), L = 5, R = 4, N = 6, D = 8:
#   projection of a token: 10*8 = 80; embedding head (Dt or D -> D, then D -> D): 10*8 + 8*8 = 144 / 8*8 + 8*8 = 128
#   late text block per token: qkv 8*24 + out 8*8 + MLP 8*32 + 32*8 + token weight 8*1 = 776;
#     its attention: scores 5*5*8 + weighted values 5*5*8 = 400
#   late pair: every token against every cell, 5*4*8 = 160
#   cross encoder (1 layer), text side: first query 5*64 + keys and values 5*(64+64) = 960;
#     pair: text->image scores+values 2*5*4*8 + output 5*64 = 640, image->text 2*4*5*8 + output 4*64 = 576,
#     head 24*8 + 8*1 = 200: 1416
HAND = {
    "contrastive": (0, 144 + 6 * 8),  # pooled caption through the head, then 6 dot products of width 8
    "concat_mlp": (6, 80 + 8 * 16 + 6 * 16),  # projection, the text half of the first layer once, 6 x the 16 -> 1 layer
    "cross_attention": (6, 5 * 80 + 5 * 776 + 400 + 6 * 160),
    "joint": (3, 5 * 80 + 128 + 5 * 80 + 5 * 776 + 400 + 6 * 8 + 3 * 160),  # ITC tokens + head, own ITM tokens, 3 re-ranked
}


@pytest.mark.parametrize("method", METHODS)
def test_query_macs_match_a_count_by_hand(tmp_path, method):
    got = costs.query_costs(_model(tmp_path, method), SHAPE)
    pairs, macs = HAND[method]
    assert got == {"pairs": pairs, "macs": macs}


def test_query_macs_by_hand_for_the_cross_encoder_the_shared_projections_and_a_deep_shortlist(tmp_path):
    cross = costs.query_costs(_model(tmp_path, "cross_attention", matcher="cross"), SHAPE)
    assert cross == {"pairs": 6, "macs": 5 * 80 + 960 + 6 * 1416}
    # two layers: one more text key/value pair (5*128) per query; per pair a second query projection on
    # each side (5*64, 4*64) and a second attention + output on each side (640 + 576 - 200 head counted once)
    deep = costs.query_costs(_model(tmp_path, "cross_attention", matcher="cross", layers=2), SHAPE)
    assert deep["macs"] == 5 * 80 + 960 + 5 * 128 + 6 * (1416 + 5 * 64 + 640 + 4 * 64 + 576)
    shared = costs.query_costs(_model(tmp_path, "joint", shared_projections=True), SHAPE)
    assert shared["macs"] == HAND["joint"][1] - 5 * 80  # the matcher reads the ITC projections: no own ones
    wide = costs.query_costs(_model(tmp_path, "joint", shortlist_k=16), SHAPE)  # k above the gallery: all 6
    assert wide == {"pairs": 6, "macs": HAND["joint"][1] + 3 * 160}


def test_a_control_costs_both_of_its_models(tmp_path):
    from crossalign.evaluate import ensemble

    cfg = tiny_config(tmp_path, methods={"embed_dim": D, "joint": {"shortlist_k": 3}})
    control = ensemble.build(cfg, _model(tmp_path, "contrastive"), _model(tmp_path, "cross_attention"))
    # contrastive's query side and its 6 similarities, cross_attention's query side, 3 late pairs
    assert costs.query_costs(control, SHAPE) == {"pairs": 3, "macs": 144 + 48 + 5 * 80 + 5 * 776 + 400 + 3 * 160}
    assert costs.serving_kind(control) == "shortlist"


def _counted_macs(model, shape: costs.QueryShape) -> int:
    """What torch's FlopCounterMode counts (matrix products; FLOPs / 2) for one text query through the
    method's text side and its ranking of an encoded gallery, attention on the math path (the fused CPU
    kernel has no FLOP formula)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from crossalign.methods.base import index_state

    g = torch.Generator().manual_seed(1)
    n, r, length = shape.gallery, shape.regions, shape.tokens
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        gallery = model.encode_images(torch.randn(n, r, DI, generator=g), torch.randn(n, DI, generator=g))
        counter = FlopCounterMode(display=False)
        with counter:
            query = model.encode_texts(torch.randn(1, length, DT, generator=g), torch.ones(1, length, dtype=torch.bool),
                                       torch.randn(1, DT, generator=g))
            rows = torch.arange(n)
            if model.embeds:
                sim = model.similarity(gallery, query)  # (N, 1)
                rows = sim[:, 0].topk(min(model.rerank.k, n)).indices if model.rerank else rows[:0]
            if len(rows):
                model.match(index_state(gallery, rows), index_state(query, torch.zeros(len(rows), dtype=torch.long)))
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("method,section", [("contrastive", {}), ("cross_attention", {}),
                                            ("cross_attention", {"matcher": "cross", "layers": 2}),
                                            ("joint", {}), ("joint", {"matcher": "cross", "shared_projections": True})])
def test_query_macs_agree_with_torchs_flop_counter(tmp_path, method, section):
    model = _model(tmp_path, method, **section)
    assert costs.query_costs(model, SHAPE)["macs"] == _counted_macs(model, SHAPE)


def test_query_shape_is_the_test_gallery_and_its_mean_caption(tmp_path):
    from crossalign.io import write_features

    def split(root, lengths):
        m = len(lengths)
        write_features(root, image_tokens=np.zeros((3, 4, DI)), image_pooled=np.zeros((3, DI)),
                       text_tokens=np.ones((m, max(lengths), DT)), text_lengths=np.array(lengths),
                       text_pooled=np.zeros((m, DT)), image_ids=np.arange(3), caption_image_index=np.arange(m) % 3,
                       caption_ids=np.arange(m), meta={})
        return load_features(root)

    assert costs.query_shape(split(tmp_path / "a", [3, 4, 4, 6])) == costs.QueryShape(3, 4, 4)  # mean 4.25
    assert costs.query_shape(split(tmp_path / "b", [2, 3])).tokens == 3  # mean 2.5 rounds half up
