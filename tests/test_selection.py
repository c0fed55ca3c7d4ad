"""select: champion by val RSUM only, leaderboard, paired bootstrap gains, missing methods."""
from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import tiny_config, dump_params
from crossalign.select import costs
from crossalign.select import stage as selection
from crossalign.io import read_json, write_json
from eval_helpers import save_model, write_eval_outputs, write_split_features

N, M = 40, 80


def write_test_index(root) -> None:
    """eval/test_index.json for the N images x 2 captions of :func:`ranks`."""
    write_json(root / "eval" / "test_index.json", {"image_ids": list(range(100, 100 + N)),
                                                   "caption_image_ids": [100 + i for i in range(N) for _ in (0, 1)]})


def ranks(rng: np.random.Generator, p_hit: float) -> tuple[np.ndarray, np.ndarray]:
    """Test ranks where a query is at rank 0 with probability p_hit, else at rank 20."""
    return (np.where(rng.random(N) < p_hit, 0, 20), np.where(rng.random(M) < p_hit, 0, 20))


def test_paired_bootstrap_hand_values():
    caption_image = np.array([0, 0, 1, 1, 2, 2, 3, 3])  # two captions per image
    base = (np.zeros((1, 4, 3)), np.zeros((1, 8, 3)))
    better = (np.array([[[1, 1, 1], [0, 1, 1], [1, 1, 1], [0, 0, 1.0]]]), np.ones((1, 8, 3)))
    g = selection.paired_bootstrap(better, base, caption_image, resamples=200)
    assert g["i2t_r1"]["delta"] == pytest.approx(50.0)
    assert g["t2i_r1"]["delta"] == pytest.approx(100.0)
    assert g["rsum"]["delta"] == pytest.approx(50 + 75 + 100 + 300)
    assert g["t2i_r1"]["ci95"] == [100.0, 100.0]  # every caption improves: no spread
    lo, hi = g["i2t_r1"]["ci95"]
    assert 0 <= lo < 50 < hi <= 100 and g["rsum"]["significant"]
    same = selection.paired_bootstrap(better, better, caption_image, resamples=50)
    assert same["rsum"] == {"delta": 0.0, "ci95": [0.0, 0.0], "significant": False}  # paired: no spread


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
    write_test_index(tmp_path)
    out = selection.run(cfg, tmp_path)

    assert out["champion"] == "contrastive" and out["metric"] == "val_rsum"
    assert [r["method"] for r in out["leaderboard"]] == ["contrastive", "joint", "concat_mlp"]
    assert out["leaderboard"][1]["test"]["rsum"] > out["leaderboard"][0]["test"]["rsum"]
    assert "rsum" in out["leaderboard"][0]["test_std"]  # two seeds: mean ± std
    gain = out["gain_over_baseline"]["joint"]
    assert gain["rsum"]["significant"] and gain["rsum"]["ci95"][0] > 0
    assert gain["text"].startswith("+") and "RSUM" in gain["text"]
    assert set(out["gain_over_baseline"]) == {"contrastive", "joint"}
    # the champion against every other method, not only the baseline; joint is better on test
    vs = out["champion_vs"]
    assert set(vs) == {"joint", "concat_mlp"} and vs["joint"]["baseline"] == "joint"
    assert vs["joint"]["rsum"]["delta"] == pytest.approx(out["leaderboard"][0]["test"]["rsum"]
                                                         - out["leaderboard"][1]["test"]["rsum"])
    assert vs["joint"]["rsum"]["ci95"][1] < 0 and vs["joint"]["rsum"]["significant"]
    assert vs["concat_mlp"]["rsum"]["delta"] == pytest.approx(out["gain_over_baseline"]["contrastive"]["rsum"]["delta"])
    md = (tmp_path / "reports" / "comparison.md").read_text()
    assert "## Champion (contrastive) vs every other method" in md and vs["joint"]["text"] in md
    assert md.index("- contrastive vs **joint**") < md.index("- contrastive vs **concat_mlp**")  # runner-up first
    assert "## Leaderboard (test; mean ± std over 2 training seeds, std with ddof=1)" in md
    assert read_json(tmp_path / "reports" / "selection.json") == {k: v for k, v in out.items() if k != "registry"}
    champ = out["leaderboard"][0]
    assert read_json(tmp_path / "metrics" / "selection.json") == {"champion": "contrastive", "val_rsum": 300.0,
                                                                  "test_rsum": round(champ["test"]["rsum"], 2)}
    assert out["registry"]["versions"].keys() == set(cfg.train.methods)
    # measured costs: beside reports/ (a DVC out), never inside it; the deterministic part in the report
    assert sorted(p.name for p in (tmp_path / costs.COSTS_DIR).iterdir()) == ["costs.json", "costs.md"]
    assert not list((tmp_path / "reports").glob("cost*"))
    measured = read_json(tmp_path / costs.COSTS_DIR / "costs.json")["methods"]
    assert measured["joint"]["query_latency"]["1000"]["queries"] == 32  # the tiny test split has 32 captions
    assert out["serving"]["contrastive"]["index"].startswith("yes")
    assert f"| contrastive | {out['serving']['contrastive']['params']:,} | yes" in md
    cost_section = md.split("## Cost")[1].split("\n## ")[0]
    assert "costs/costs.md" in cost_section and not re.search(r"\d\s*(ms|s/epoch)", cost_section)  # no timing


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
    from tasks import select as stage

    (tmp_path / "params.yaml").write_text(dump_params(tiny_config(tmp_path)))
    monkeypatch.chdir(tmp_path)
    assert stage.main([]) == 2
    assert "['concat_mlp', 'cross_attention', 'contrastive', 'joint']" in capsys.readouterr().err
