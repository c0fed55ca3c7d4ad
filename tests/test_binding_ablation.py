"""bench/binding_ablation.py: the settings it runs, the params it overrides, the table it prints."""
from __future__ import annotations

import pytest

from bench import binding_ablation as ab


def test_settings_cover_each_ingredient_and_the_extremes():
    steps = ab.settings("steps")
    assert [ab.label(s) for s in steps] == ["none", "all", "+positions", "+twin", "+caption"]
    full = ab.settings("full")
    assert len(full) == 8 and len({tuple(sorted(s.items())) for s in full}) == 8


def test_overrides_use_the_contract_param_names_and_params_yaml_on_values():
    raw = {"methods": {"image_positions": "learned"}, "train": {"caption_negatives": 3}, "features": {"perturbations": 2}}
    on = ab.on_values(raw)
    assert on == {"positions": "learned", "caption": 2}  # capped by what the features stage wrote
    assert ab.on_values({"features": {"perturbations": 2}}) == {"positions": "sincos", "caption": 1}
    o = ab.overrides({"positions": True, "twin": False, "caption": True}, on, threads=1, device="cpu")
    assert o["methods"] == {"image_positions": "learned"}
    assert (o["train"]["twin_negatives"], o["train"]["caption_negatives"], o["train"]["seeds"]) == (False, 2, [0])
    off = ab.overrides(dict.fromkeys(ab.INGREDIENTS, False), on, threads=1, device="cpu")
    assert (off["methods"]["image_positions"], off["train"]["caption_negatives"]) == ("none", 0)
    merged = ab.merge(raw, o)
    assert merged["train"]["caption_negatives"] == 2 and raw["train"]["caption_negatives"] == 3  # base untouched


def test_table_row_written_out():
    cell = lambda m, lo, hi: {"mean": m, "ci95": [lo, hi], "i2t": m, "t2i": m, "pairs": 28}  # noqa: E731
    run = {"method": "joint", "setting": {"image_positions": "sincos", "twin_negatives": True, "caption_negatives": 2},
           "test_rsum": 421.04, "probe": {"overall": cell(71.25, 64.5, 77.75), "colour": cell(80.0, 70.0, 90.0),
                                          "position": cell(60.0, 50.0, 70.0), "size": cell(73.75, 60.0, 85.0)}}
    lines = ab.table([run]).splitlines()
    assert lines[0] == "| method | positions / twin neg / caption neg | colour | position | size | binding [95% CI] | test RSUM |"
    assert lines[2] == "| joint | sincos / on / 2 | 80.0 | 60.0 | 73.8 | 71.2 [64.5, 77.8] | 421.0 |"
    val_run = {**{k: v for k, v in run.items() if k != "test_rsum"}, "split": "val", "val_rsum": 400.0}
    assert ab.table([val_run]).splitlines()[0].endswith("| val RSUM |")
    assert ab.table([val_run]).splitlines()[2].endswith("| 400.0 |")
    with pytest.raises(ValueError, match="one table per split"):
        ab.table([run, val_run])


def test_one_run_trains_and_probes_through_the_real_code(tmp_path):
    """run_one on a tiny project with every ingredient on (one perturbed caption per caption)."""
    import numpy as np
    import torch

    from conftest import make_tiny_features, tiny_config
    from crossalign.features import hardneg
    from crossalign.io import load_features
    from eval_helpers import IMAGE_DIM, TEXT_DIM, write_split_features

    torch.set_num_threads(1)
    write_split_features(tmp_path)
    train = make_tiny_features(tmp_path / "data" / "features" / "train", n_images=32, image_dim=IMAGE_DIM,
                               text_dim=TEXT_DIM)
    feats = load_features(train)
    m = feats.n_captions
    tokens, lengths = feats.text.gather()  # perturbed = the real states reversed: same "words", other order
    hardneg.write(train, twin_row=np.arange(32) ^ 1, tokens=np.concatenate([t[:n][::-1] for t, n in zip(tokens, lengths)]),
                  offsets=feats.text.offsets(), pooled=np.asarray(feats.text_pooled), source=np.arange(m),
                  kind=np.zeros(m, np.int8), per_caption=1)
    all_on = ab.overrides(dict.fromkeys(ab.INGREDIENTS, True), {"positions": "sincos", "caption": 1}, 1, "cpu")
    raw = ab.merge(tiny_config(tmp_path, train={"epochs": 1}).model_dump(), all_on)
    result = ab.run_one(raw, "contrastive", tmp_path, tmp_path / "scratch", log=lambda msg: None)
    # the default scores val with val's twins (eval/val_index.json: 7 pairs, size / colour); no test number
    assert result["split"] == "val" and result["epochs_run"] == 1 and result["val_rsum"] > 0
    assert not any("test" in key for key in result)
    assert set(result["probe"]) == {"overall", "size", "colour"} and result["probe"]["overall"]["pairs"] == 7
    lo, hi = result["probe"]["overall"]["ci95"]
    assert lo <= result["probe"]["overall"]["mean"] <= hi
    assert not (tmp_path / "scratch" / "contrastive").exists()  # scratch models removed
    final = ab.run_one(raw, "contrastive", tmp_path, tmp_path / "scratch", log=lambda msg: None, split="test")
    assert final["split"] == "test" and final["test_rsum"] > 0 and final["probe"]["overall"]["pairs"] == 8
    assert set(final["probe"]) == {"overall", "colour", "position"}  # the test twins of eval/test_index.json
