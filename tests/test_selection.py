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
    assert sorted(p.name for p in (tmp_path / costs.COSTS_DIR).iterdir()) == [
        "comparison_with_measured_costs.md", "costs.json", "costs.md"]
    assert not list((tmp_path / "reports").glob("*measured*")) and not list((tmp_path / "reports").glob("cost*"))
    measured = read_json(tmp_path / costs.COSTS_DIR / "costs.json")["methods"]
    assert measured["joint"]["query_latency"]["1000"]["queries"] == 32  # the tiny test split has 32 captions
    assert out["serving"]["contrastive"]["index"].startswith("yes")
    # the tiny test split: 16 images, so a matcher scores 16 pairs per query, joint its shortlist of 4
    assert {m: out["serving"][m]["pairs"] for m in cfg.train.methods} == {"concat_mlp": 16, "contrastive": 0, "joint": 4}
    assert f"| contrastive | {out['serving']['contrastive']['params']:,} | yes" in md
    cost_section = md.split("## Cost")[1].split("\n## ")[0]
    assert "costs/costs.md" in cost_section and not re.search(r"\d\s*(ms|s/epoch)", cost_section)  # no timing
    machine = read_json(tmp_path / costs.COSTS_DIR / "costs.json")["machine"]
    assert machine not in md and "Measured on" not in md
    latency = f"{measured['joint']['query_latency']['1']['ms']:.2f}"
    assert latency in (tmp_path / costs.COSTS_DIR / "costs.md").read_text()
    # the select run in MLflow holds the same report with the measured times, labelled with the machine
    from crossalign.tracking import registry

    with registry.using(cfg, tmp_path) as client:
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        (run,) = client.search_runs([exp.experiment_id], "tags.stage = 'select'")
        names = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
        local = client.download_artifacts(run.info.run_id, "reports/comparison_with_measured_costs.md", str(tmp_path / "dl"))
    assert {"reports/comparison.md", "reports/comparison_with_measured_costs.md"} <= names
    logged = __import__("pathlib").Path(local).read_text()
    assert f"Measured on {machine}" in logged and "| joint | " in logged and f" | {latency} | " in logged
    intro = next(line for line in logged.splitlines() if line.startswith("This rendering adds the times measured on"))
    top = "# Method comparison\n\n"  # the same report, plus that line, above and after the cost section
    assert logged.split("## Cost")[0] == md.split("## Cost")[0].replace(top, f"{top}{intro}\n\n", 1)
    assert logged.split("## Cost")[1].split("\n## ", 1)[1] == md.split("## Cost")[1].split("\n## ", 1)[1]


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


# --------------------------------------------------------------- the decision table, from hand-made facts
def _gain(delta: float, lo: float, hi: float) -> dict:
    return {"rsum": {"delta": delta, "ci95": [lo, hi], "significant": lo > 0 or hi < 0}}


def _facts(lead: tuple[float, float, float], seeds=(0,)) -> dict:
    """joint champion (shortlist) over contrastive (index) by ``lead`` (delta, lo, hi) on test, far over
    concat_mlp; the control contrastive+cross_attention is best on val, cheapest, binds best, within noise."""
    def row(method, val, bind, control=False):
        return {"method": method, "val_rsum": val, "seeds": list(seeds), "control": control,
                "binding_probe": {"mean": bind[0], "ci95": {"mean": [bind[1], bind[2]]}}}

    board = [row("contrastive+cross_attention", 490.0, (90.0, 85.0, 95.0), control=True),
             row("joint", 480.0, (70.0, 66.0, 74.0)), row("contrastive", 470.0, (52.0, 49.0, 55.0)),
             row("concat_mlp", 300.0, (60.0, 56.0, 64.0))]
    serving = {"joint": {"kind": "shortlist", "pairs": 16, "macs": 3_000_000, "params": 300_000},
               "contrastive": {"kind": "index", "pairs": 0, "macs": 45_000, "params": 115_000},
               "concat_mlp": {"kind": "pairs", "pairs": 250, "macs": 185_000, "params": 173_000},
               "contrastive+cross_attention": {"kind": "shortlist", "pairs": 16, "macs": 1_000, "params": 288_000}}
    vs = {"contrastive+cross_attention": _gain(-1.7, -17.5, 13.3), "contrastive": _gain(*lead),
          "concat_mlp": _gain(190.0, 168.0, 211.0)}
    return {"champion": "joint", "leaderboard": board, "champion_vs": vs, "serving": serving}


def test_a_lead_whose_ci_contains_zero_is_a_tie_won_by_the_cheaper(tmp_path):
    d = selection.decide(tiny_config(tmp_path), _facts((4.0, -3.0, 11.0)))
    q = d["quality"]
    assert (q["method"], q["runner_up"], q["tie"], q["pick"]) == ("joint", "contrastive", True, "contrastive")
    assert q["rsum"] == {"delta": 4.0, "ci95": [-3.0, 11.0], "significant": False}
    assert d["cost"] == {"method": "contrastive", "within_noise": ["joint", "contrastive"]}  # 0 pair calls vs 16


def test_a_clear_lead_keeps_the_champion(tmp_path):
    d = selection.decide(tiny_config(tmp_path), _facts((65.7, 48.0, 82.9)))
    assert (d["quality"]["tie"], d["quality"]["pick"]) == (False, "joint")
    assert d["cost"] == {"method": "joint", "within_noise": ["joint"]}
    # the index-able pick and its gap: contrastive, joint minus it on test
    assert d["index"] == {"method": "contrastive", "val_rsum": 470.0, "is_champion": False,
                          "gap": {"delta": 65.7, "ci95": [48.0, 82.9], "significant": True}}


def test_controls_are_shown_but_never_recommended(tmp_path):
    facts = _facts((4.0, -3.0, 11.0))
    d = selection.decide(tiny_config(tmp_path), facts)
    picks = {d["quality"]["pick"], d["quality"]["runner_up"], d["index"]["method"], d["binding"]["method"],
             d["cost"]["method"], *d["cost"]["within_noise"]}
    assert "contrastive+cross_attention" not in picks | set(d["recommendable"])
    assert d["binding"]["method"] == "joint"  # the control binds best (90 %): not recommended
    assert d["controls"] == [{"method": "contrastive+cross_attention", "val_rsum": 490.0,
                              "vs_champion": {"delta": -1.7, "ci95": [-17.5, 13.3], "significant": False}}]
    # select.controls_compete: the control competes like a method (and binds best)
    compete = selection.decide(tiny_config(tmp_path, select={"controls_compete": True}), facts)
    assert "contrastive+cross_attention" in compete["recommendable"] and compete["controls"] == []
    assert compete["binding"]["method"] == "contrastive+cross_attention"
    assert "contrastive+cross_attention" in compete["cost"]["within_noise"]


def test_index_pick_is_the_best_index_able_method_by_val(tmp_path):
    facts = _facts((65.7, 48.0, 82.9))
    facts["leaderboard"].append({"method": "clip", "val_rsum": 400.0, "seeds": [0], "control": False})
    facts["serving"]["clip"] = {"kind": "index", "pairs": 0, "macs": 10, "params": 10}
    facts["champion_vs"]["clip"] = _gain(80.0, 60.0, 100.0)
    assert selection.decide(tiny_config(tmp_path), facts)["index"]["method"] == "contrastive"  # 470 > 400 on val
    facts["serving"]["joint"]["kind"] = "index"  # the champion itself index-able: no gap to state
    assert selection.decide(tiny_config(tmp_path), facts)["index"] == {"method": "joint", "val_rsum": 480.0,
                                                                       "is_champion": True, "gap": None}
    for m in ("joint", "contrastive", "clip"):
        facts["serving"][m]["kind"] = "pairs"
    assert selection.decide(tiny_config(tmp_path), facts)["index"] is None


def test_binding_row_reads_the_twin_probe(tmp_path):
    board = _facts((65.7, 48.0, 82.9))["leaderboard"]
    b = selection.binding_need(board, ["joint", "contrastive", "concat_mlp"])
    assert (b["probe"], b["method"], b["mean"], b["ci95"], b["above_chance"]) == ("twin", "joint", 70.0, [66.0, 74.0], True)
    assert b["next"] == {"method": "concat_mlp", "mean": 60.0, "ci95": [56.0, 64.0]} and b["apart"]  # 66 > 64
    board[3]["binding_probe"]["ci95"]["mean"] = [56.0, 67.0]
    assert not selection.binding_need(board, ["joint", "concat_mlp"])["apart"]  # 66 < 67: overlapping CIs
    assert selection.binding_need([{**r, "binding_probe": {}} for r in board], ["joint"]) is None  # no twins


def test_one_seed_is_said_and_several_are_not(tmp_path):
    assert selection.decide(tiny_config(tmp_path), _facts((4.0, -3.0, 11.0)))["single_seed"] == [
        "joint", "contrastive", "concat_mlp"]
    assert selection.decide(tiny_config(tmp_path), _facts((4.0, -3.0, 11.0), seeds=(0, 1, 2)))["single_seed"] == []


def test_binding_row_reads_the_caption_swap_probe_where_there_are_no_twins(tmp_path):
    """No twin probe (real captions): the row reads the caption-swap probe's i2t accuracy; a method
    whose swap probe found no pairs (absent) is not ranked; the twin probe wins where both exist."""
    metrics = {}
    for method, acc, ci in (("joint", 61.0, [57.0, 65.0]), ("contrastive", 52.0, [48.0, 56.0])):
        metrics[method] = {"val": {"rsum": 300.0}, "seeds": [0],
                           "test": {"rsum": 290.0, "swap_probe": {"overall": {"i2t": acc, "ci95": ci, "pairs": 900}}}}
    metrics["concat_mlp"] = {"val": {"rsum": 200.0}, "seeds": [0],
                             "test": {"rsum": 190.0, "swap_probe": {"overall": {"absent": True, "pairs": 0}}}}
    board = selection.leaderboard(metrics)
    b = selection.binding_need(board, ["joint", "contrastive", "concat_mlp"])
    assert (b["probe"], b["method"], b["mean"], b["ci95"], b["above_chance"]) == ("caption-swap", "joint", 61.0,
                                                                                  [57.0, 65.0], True)
    assert b["next"] == {"method": "contrastive", "mean": 52.0, "ci95": [48.0, 56.0]} and b["apart"]  # 57 > 56
    assert "swap_probe" not in next(r for r in board if r["method"] == "concat_mlp")
    board[1]["binding_probe"] = {"mean": 55.0, "ci95": {"mean": [51.0, 59.0]}}  # contrastive has twins too
    assert selection.binding_need(board, ["joint", "contrastive"])["probe"] == "twin"
