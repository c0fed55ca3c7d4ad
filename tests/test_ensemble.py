"""The contrastive+cross_attention control: composite scores, its evaluate stage, select lists it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_tiny_features, tiny_config, dump_params
from crossalign.evaluate import ensemble
from crossalign.select import stage as selection
from crossalign.io import load_features, read_json, write_json
from crossalign.methods import build_aligner, load_aligner
from crossalign.methods.base import Rerank
from crossalign.retrieval.protocol import coco_metrics
from crossalign.retrieval.scoring import score_matrices
from eval_helpers import IMAGE_DIM, TEXT_DIM, save_model, write_eval_outputs, write_split_features

CONTROL = "contrastive+cross_attention"
N, M = 40, 80


def _parts(cfg, seed: int = 0):
    torch.manual_seed(seed)
    return (build_aligner(cfg, "contrastive", IMAGE_DIM, TEXT_DIM).eval(),
            build_aligner(cfg, "cross_attention", IMAGE_DIM, TEXT_DIM).eval())


def test_composite_scores_are_the_two_models_fused_on_the_shortlist(tmp_path):
    cfg = tiny_config(tmp_path)
    split = load_features(make_tiny_features(tmp_path / "f", n_images=10, captions_per_image=2,
                                             image_dim=IMAGE_DIM, text_dim=TEXT_DIM))
    embedder, matcher = _parts(cfg)
    k, alpha = 3, 0.3
    model = ensemble.Ensemble(embedder, matcher, Rerank(k, alpha))
    i2t, t2i = score_matrices(model, split, block_images=4, block_texts=8, pair_chunk=7)

    sim = score_matrices(embedder, split)[0]  # (N, M) the contrastive model alone
    match = score_matrices(matcher, split, block_images=3, block_texts=5)[0]  # (N, M) cross_attention alone
    fused = alpha * match + (1 - alpha) * sim
    short_rows = np.zeros_like(sim, dtype=bool)  # i2t: each image's top-k captions by similarity
    np.put_along_axis(short_rows, np.argsort(-sim, axis=1)[:, :k], True, axis=1)
    short_cols = np.zeros_like(sim, dtype=bool)  # t2i: each caption's top-k images
    np.put_along_axis(short_cols, np.argsort(-sim, axis=0)[:k, :], True, axis=0)
    for scores, short in ((i2t, short_rows), (t2i, short_cols)):
        np.testing.assert_allclose(scores[~short], sim[~short], rtol=0, atol=1e-5)  # outside: similarity
        shift = scores[short] - fused[short]  # inside: the fused score, all lifted by one constant
        np.testing.assert_allclose(shift, shift[0], rtol=0, atol=1e-4)
        assert scores[short].min() > sim[~short].max()  # the shortlist ranks above the rest
    assert not np.allclose(np.argsort(-i2t, axis=1), np.argsort(-sim, axis=1))  # the re-rank changed an order

    with pytest.raises(ValueError, match="embedding method and a matching method"):
        ensemble.Ensemble(matcher, embedder, Rerank(k, alpha))


def test_evaluate_control_writes_metrics_like_a_method(tmp_path, monkeypatch):
    from tasks import evaluate_control

    cfg = tiny_config(tmp_path, train={"seeds": [0, 1]}, methods={"embed_dim": 16, "cross_attention": {"heads": 2},
                                                                    "joint": {"shortlist_k": 5, "fusion_alpha": 0.7}},
                      evaluate={"fusion_alphas": [0.0, 0.5, 1.0]})
    write_split_features(tmp_path)
    for seed in (0, 1):
        save_model(cfg, tmp_path, "contrastive", seed, mlflow_run=False, init_seed=10 + seed)
        save_model(cfg, tmp_path, "cross_attention", seed, mlflow_run=False, init_seed=20 + seed)
    (tmp_path / "params.yaml").write_text(dump_params(cfg))
    monkeypatch.chdir(tmp_path)
    assert evaluate_control.main(["--control", CONTROL]) == 0

    assert not (tmp_path / "metrics" / f"{CONTROL}.json").exists()  # a control is no row of `dvc metrics show`
    metrics = read_json(tmp_path / "eval" / CONTROL / "results.json")
    assert metrics["method"] == CONTROL and metrics["weights_sha256"] == {} and metrics["seeds"] == [0, 1]
    assert (tmp_path / "eval" / CONTROL / "ranks" / "seed-1" / "test_t2i.npy").exists()
    assert not (tmp_path / "models" / CONTROL).exists()
    # each seed pairs the two methods' models of that seed: a hand-built composite scored on val at
    # every grid alpha (each alpha a whole ranking of its own), the best val RSUM (ties: the smaller
    # alpha) is the control's alpha, and its test metrics are the composite's at that alpha
    val, test = (load_features(tmp_path / "data" / "features" / s) for s in ("val", "test"))
    for seed in (0, 1):
        torch.manual_seed(10 + seed)
        e = build_aligner(cfg, "contrastive", IMAGE_DIM, TEXT_DIM).eval()
        torch.manual_seed(20 + seed)
        m = build_aligner(cfg, "cross_attention", IMAGE_DIM, TEXT_DIM).eval()
        val_rsum = {a: coco_metrics(*score_matrices(ensemble.Ensemble(e, m, Rerank(5, a)), val),
                                    val.caption_image_index)[0]["rsum"] for a in (0.0, 0.5, 1.0)}
        chosen = max(val_rsum, key=lambda a: (val_rsum[a], -a))
        fusion = metrics["fusion"]["per_seed"][str(seed)]
        assert fusion["val_rsum"] == pytest.approx({f"{a:g}": r for a, r in val_rsum.items()})
        assert fusion["alpha"] == chosen and "mlflow_model" not in fusion  # a control is never registered
        i2t, t2i = score_matrices(ensemble.Ensemble(e, m, Rerank(5, chosen)), test)
        want = coco_metrics(i2t, t2i, test.caption_image_index)[0]
        per_seed = metrics["test"]["per_seed"][str(seed)]
        assert per_seed["rsum"] == pytest.approx(want["rsum"]) and per_seed["i2t_r1"] == pytest.approx(want["i2t_r1"])
    assert "chosen on val from alphas [0, 0.5, 1]" in metrics["protocol"]

    # evaluate.fusion_alphas: [] ranks at joint's fusion_alpha, as the control always did
    (tmp_path / "params.yaml").write_text(dump_params(tiny_config(
        tmp_path, train={"seeds": [0, 1]}, methods={"embed_dim": 16, "cross_attention": {"heads": 2},
                                                     "joint": {"shortlist_k": 5, "fusion_alpha": 0.7}},
        evaluate={"fusion_alphas": []})))
    assert evaluate_control.main(["--control", CONTROL]) == 0
    fixed = read_json(tmp_path / "eval" / CONTROL / "results.json")
    assert "shortlist k=5 re-rank alpha=0.7;" in fixed["protocol"] and "fusion" not in fixed


def _ranks(rng, p_hit):
    return np.where(rng.random(N) < p_hit, 0, 20), np.where(rng.random(M) < p_hit, 0, 20)


@pytest.mark.parametrize("compete", [False, True])
def test_select_lists_the_control_beside_the_methods(tmp_path, compete):
    methods = ["concat_mlp", "cross_attention", "contrastive", "joint"]
    cfg = tiny_config(tmp_path, train={"methods": methods}, select={"bootstrap": 200, "controls_compete": compete})
    write_split_features(tmp_path)
    rng = np.random.default_rng(0)
    ranks = {m: _ranks(rng, p) for m, p in
             (("concat_mlp", 0.2), ("cross_attention", 0.3), ("contrastive", 0.4), ("joint", 0.5), (CONTROL, 0.9))}
    for method, val in (("concat_mlp", 100.0), ("cross_attention", 150.0), ("contrastive", 200.0), ("joint", 250.0)):
        save_model(cfg, tmp_path, method, 0)  # a tracked training run: its weights' hash finds it
        write_eval_outputs(tmp_path, method, val, {0: ranks[method]}, tmp_path)
    write_eval_outputs(tmp_path, CONTROL, 300.0, {0: ranks[CONTROL]})  # best on val; no weights of its own
    write_json(tmp_path / "eval" / "test_index.json",  # the N images x 2 captions the ranks describe
               {"image_ids": list(range(N)), "caption_image_ids": [i for i in range(N) for _ in (0, 1)]})
    out = selection.run(cfg, tmp_path)

    rows = {r["method"]: r for r in out["leaderboard"]}
    assert rows[CONTROL]["control"] is True and not any(rows[m]["control"] for m in methods)
    for m in methods:  # the params column: each model's trainable parameters, the control both of its models
        model, _ = load_aligner(tmp_path / "models" / m / "final" / "seed-0")
        assert rows[m]["params"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert rows[CONTROL]["params"] == rows["contrastive"]["params"] + rows["cross_attention"]["params"]
    assert f"| {CONTROL} (control) | {rows[CONTROL]['params']:,} |" in (tmp_path / "reports" / "comparison.md").read_text()
    assert out["leaderboard"][0]["method"] == CONTROL
    assert CONTROL in out["gain_over_baseline"] and CONTROL not in out["registry"]["versions"]
    # joint vs the control, paired: hand-computed point estimate from the ranks
    g = out["gain_over_control"]["joint"]
    want = 100 * ((ranks["joint"][0] < 1).mean() - (ranks[CONTROL][0] < 1).mean())
    assert g["control"] == CONTROL and g["i2t_r1"]["delta"] == pytest.approx(want) and want < 0
    if compete:
        assert out["champion"] == CONTROL and out["registry"]["champion_version"] is None
    else:
        assert out["champion"] == "joint"
        assert out["registry"]["champion_version"] == out["registry"]["versions"]["joint"]


def test_controls_param_names_known_controls_and_follows_the_flows_methods():
    from crossalign import config
    from flows.overrides import overrides_from

    assert config.Config().evaluate.controls == [CONTROL]
    with pytest.raises(config.ConfigError, match=r"evaluate.controls.*unknown controls \['clip\+joint'\]"):
        config.from_dict({"evaluate": {"controls": ["clip+joint"]}})
    # the flow's methods parameter drops a control whose parts are not both trained (its stage reads their models)
    assert overrides_from(methods=["concat_mlp", "contrastive"])["evaluate"]["controls"] == []
    assert overrides_from(methods=["cross_attention", "contrastive"])["evaluate"]["controls"] == [CONTROL]
