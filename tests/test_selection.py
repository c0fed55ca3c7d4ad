"""select: champion by val RSUM only, leaderboard, paired bootstrap gains, missing methods."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import tiny_config
from crossalign import selection
from crossalign.io import read_json
from eval_helpers import save_model, write_eval_outputs, write_split_features

N, M = 40, 80


def ranks(rng: np.random.Generator, p_hit: float) -> tuple[np.ndarray, np.ndarray]:
    """Test ranks where a query is at rank 0 with probability p_hit, else at rank 20."""
    return (np.where(rng.random(N) < p_hit, 0, 20), np.where(rng.random(M) < p_hit, 0, 20))


def test_paired_bootstrap_hand_values():
    base = (np.zeros((4, 3)), np.zeros((2, 3)))
    better = (np.array([[1, 1, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1.0]]), np.ones((2, 3)))
    g = selection.paired_bootstrap(better, base, resamples=200)
    assert g["i2t_r1"]["delta"] == pytest.approx(50.0)
    assert g["t2i_r1"]["delta"] == pytest.approx(100.0)
    assert g["rsum"]["delta"] == pytest.approx(50 + 75 + 100 + 300)
    assert g["t2i_r1"]["ci95"] == [100.0, 100.0]  # every caption improves: no spread
    lo, hi = g["i2t_r1"]["ci95"]
    assert 0 <= lo < 50 < hi <= 100 and g["rsum"]["significant"]
    same = selection.paired_bootstrap(base, base, resamples=50)
    assert same["rsum"] == {"delta": 0.0, "ci95": [0.0, 0.0], "significant": False}
    with pytest.raises(ValueError, match="test queries differ"):
        selection.paired_bootstrap((np.zeros((3, 3)), np.zeros((2, 3))), base, 10)


def test_gain_text_in_the_articles_form():
    g = {"i2t_r1": {"delta": 3.21, "ci95": [1.0, 5.5]}, "t2i_r1": {"delta": -0.5, "ci95": [-2.0, 1.0]},
         "rsum": {"delta": 12.0, "ci95": [4.04, 20.0]}}
    assert selection.gain_text(g) == ("+3.2 R@1 (i2t) [95% CI +1.0, +5.5]; -0.5 R@1 (t2i) [95% CI -2.0, +1.0]; "
                                      "+12.0 RSUM [95% CI +4.0, +20.0]")


def test_select_picks_val_not_test_and_reports_gains(tmp_path):
    cfg = tiny_config(tmp_path, train={"methods": ["concat_mlp", "contrastive", "joint"], "seeds": [0, 1]})
    write_split_features(tmp_path)
    rng = np.random.default_rng(0)
    # the registry takes the model of the seed whose scores were kept (seed 0 here): one run each
    for m in cfg.train.methods:
        save_model(cfg, tmp_path, m, 0)
    write_eval_outputs(tmp_path, "concat_mlp", 100.0, {s: ranks(rng, 0.2) for s in (0, 1)})
    write_eval_outputs(tmp_path, "contrastive", 300.0, {s: ranks(rng, 0.6) for s in (0, 1)})
    # joint is best on test but worse on val: it must not win
    write_eval_outputs(tmp_path, "joint", 200.0, {s: ranks(rng, 0.95) for s in (0, 1)})
    out = selection.run(cfg, tmp_path)

    assert out["champion"] == "contrastive" and out["metric"] == "val_rsum"
    assert [r["method"] for r in out["leaderboard"]] == ["contrastive", "joint", "concat_mlp"]
    assert out["leaderboard"][1]["test"]["rsum"] > out["leaderboard"][0]["test"]["rsum"]
    assert "rsum" in out["leaderboard"][0]["test_std"]  # two seeds: mean ± std
    gain = out["gain_over_baseline"]["joint"]
    assert gain["rsum"]["significant"] and gain["rsum"]["ci95"][0] > 0
    assert gain["text"].startswith("+") and "RSUM" in gain["text"]
    assert set(out["gain_over_baseline"]) == {"contrastive", "joint"}
    assert read_json(tmp_path / "reports" / "selection.json") == {k: v for k, v in out.items() if k != "registry"}
    champ = out["leaderboard"][0]
    assert read_json(tmp_path / "metrics" / "selection.json") == {"val_rsum": 300.0,
                                                                  "test_rsum": round(champ["test"]["rsum"], 2)}
    assert out["registry"]["versions"].keys() == set(cfg.train.methods)
    assert (tmp_path / "reports" / "comparison.md").exists()


def test_missing_method_stops_selection(tmp_path):
    cfg = tiny_config(tmp_path, train={"methods": ["concat_mlp", "contrastive", "joint"]})
    rng = np.random.default_rng(1)
    write_eval_outputs(tmp_path, "concat_mlp", 100.0, {0: ranks(rng, 0.2)})
    write_eval_outputs(tmp_path, "contrastive", 300.0, {0: ranks(rng, 0.6)})
    with pytest.raises(ValueError, match=r"missing for \['joint'\]"):
        selection.run(cfg, tmp_path)
    assert not (tmp_path / "metrics" / "selection.json").exists()  # nothing written without a champion
    assert not (tmp_path / "reports").exists()


def test_malformed_metrics_name_the_file(tmp_path):
    cfg = tiny_config(tmp_path, train={"methods": ["concat_mlp"]})
    write_eval_outputs(tmp_path, "concat_mlp", 100.0, {0: ranks(np.random.default_rng(2), 0.5)})
    path = tmp_path / "eval" / "concat_mlp" / "results.json"
    data = read_json(path)
    del data["val"]["rsum"]
    path.write_text(__import__("json").dumps(data))
    with pytest.raises(ValueError, match="concat_mlp/results.json: val lacks \\['rsum'\\]"):
        selection.run(cfg, tmp_path)


def test_stage_entry_point_lists_the_missing_methods(tmp_path, monkeypatch, capsys):
    from crossalign.config import dump_params
    from tasks import select as stage

    (tmp_path / "params.yaml").write_text(dump_params(tiny_config(tmp_path)))
    monkeypatch.chdir(tmp_path)
    assert stage.main([]) == 2
    assert "['concat_mlp', 'cross_attention', 'contrastive', 'joint']" in capsys.readouterr().err
