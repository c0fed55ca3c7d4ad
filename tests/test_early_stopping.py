"""Early stopping: patience < epochs stops at the right epoch and restores the *best* epoch's
weights, not the last. Validation RSUM is scripted (``training.validation_metrics`` replaced), so
the right answer is known without training to a target."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from crossalign.train import checkpoint
from crossalign.train import stage as training

torch.set_num_threads(1)


@pytest.mark.parametrize("rsums, patience, best_epoch, last_epoch", [
    ([100, 300, 200, 250, 400, 500, 600, 700], 2, 2, 4),  # two epochs without a new best: stop after 4
    ([100, 90, 150, 140, 130, 900, 900, 900], 2, 3, 5),  # a new best at 3 resets the count
    ([100, 100, 100, 100, 900, 900, 900, 900], 3, 1, 4),  # a tie is no improvement
    ([10, 20, 30, 40, 50, 60, 70, 5], 3, 7, 8),  # never 3 bad epochs: runs all 8, best is 7 not 8
])
def test_stops_at_patience_and_restores_the_best_epoch(tmp_path, tiny_features, monkeypatch, rsums, patience,
                                                       best_epoch, last_epoch):
    snapshots = []  # weights as validated after each epoch

    def scripted(model, split, device):
        snapshots.append(checkpoint.state_tensors(model))
        return {"rsum": float(rsums[len(snapshots) - 1]), "i2t_r1": float(len(snapshots))}

    monkeypatch.setattr(training, "validation_metrics", scripted)
    cfg = tiny_config(tmp_path, train={"epochs": 8, "patience": patience, "batch_size": 16, "lr": 3e-3,
                                       "device": "cpu", "threads": 1})
    result = training.run(cfg, tmp_path, "contrastive", log=lambda *_: None)[0]
    assert len(snapshots) == last_epoch and [r["epoch"] for r in result["history"]] == list(range(1, last_epoch + 1))
    assert result["best_epoch"] == best_epoch and result["epochs_run"] == last_epoch
    assert result["val_metrics"] == {"rsum": rsums[best_epoch - 1], "i2t_r1": best_epoch}
    final = tmp_path / "models" / "contrastive" / "final" / "seed-0"
    saved = load_file(final / "model.safetensors")
    assert all(torch.equal(saved[k], snapshots[best_epoch - 1][k]) for k in saved)
    last = snapshots[last_epoch - 1]
    if best_epoch != last_epoch:  # the weights did move after the best epoch: the last ones are not it
        assert any(not torch.equal(saved[k], last[k]) for k in saved)
    meta = json.loads((final / "model.json").read_text())
    assert meta["best_epoch"] == best_epoch and meta["epochs_run"] == last_epoch
