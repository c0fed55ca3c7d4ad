"""bench/: without --final a bench script scores val only and prints no test number; with --final
it scores test and says so first."""
from __future__ import annotations

import pytest

from bench import binding_ablation, splits


def test_scored_split_is_val_unless_final():
    said: list[str] = []
    assert splits.scored_split(False, said.append) == "val" and said == []
    assert splits.scored_split(True, said.append) == "test" and said == [splits.FINAL_BANNER]
    assert said[0].startswith("FINAL: test split")
    assert splits.index_path("r", "val").as_posix() == "r/eval/val_index.json"
    with pytest.raises(ValueError, match="expected val or test"):
        splits.index_path("r", "train")


def _stored(tmp_path):
    """A results file holding one val run and one test run of the same setting."""
    import json

    cell = {"mean": 60.0, "ci95": [50.0, 70.0], "i2t": 60.0, "t2i": 60.0, "pairs": 4}
    setting = {"image_positions": "sincos", "twin_negatives": True, "caption_negatives": 1}
    runs = [{"method": "joint", "setting": setting, "split": "val", "val_rsum": 411.1, "probe": {"overall": cell}},
            {"method": "joint", "setting": setting, "split": "test", "test_rsum": 422.2, "probe": {"overall": cell}}]
    out = tmp_path / "ablation.json"
    out.write_text(json.dumps({"runs": runs}))
    return out


def test_ablation_table_prints_a_test_number_only_with_final(tmp_path, capsys):
    out = _stored(tmp_path)
    assert binding_ablation.main(["--out", str(out), "--table"]) == 0
    shown = capsys.readouterr().out
    assert "411.1" in shown and "val RSUM" in shown
    assert "422.2" not in shown and "test" not in shown.lower()
    assert binding_ablation.main(["--out", str(out), "--table", "--final"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("FINAL: test split") and "422.2" in shown and "411.1" not in shown


def test_recipe_final_scores_only_the_shipped_recipe(capsys):
    from bench import recipe_val

    assert recipe_val.main(["--final", "--arms", "joint", "joint-dropout-0.1"]) == 2  # refused before training
    captured = capsys.readouterr()
    assert captured.out.startswith("FINAL: test split") and "chosen configuration only" in captured.err
