"""``crossalign search`` against a tiny registered champion in a real sqlite MLflow store."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_config
from crossalign import cli, registry
from crossalign.config import dump_params
from crossalign.io import load_features, read_json
from crossalign.methods import load_aligner
from crossalign.retrieval import score_matrices
from eval_helpers import save_model, write_prepared_test, write_split_features

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Features, prepared test split and a logged contrastive and joint model."""
    root = tmp_path_factory.mktemp("project")
    cfg = tiny_config(root)
    write_split_features(root)
    write_prepared_test(root)
    runs = {m: read_json(save_model(cfg, root, m, 0) / "model.json")["mlflow_run_id"] for m in ("contrastive", "joint")}
    return root, runs


def _params(root, name, champion=None, runs=None):
    """A params file whose registered model is ``name``; ``champion``: method given the alias."""
    cfg = tiny_config(root, tracking={"registered_model": name})
    if champion:
        versions = registry.register_versions(cfg, root, {champion: {"run_id": runs[champion], "seed": 0}})
        registry.set_champion(cfg, root, versions[champion])
    path = root / f"params-{name}.yaml"
    path.write_text(dump_params(cfg))
    return cfg, str(path)


def _test_features(root):
    return load_features(root / "data" / "features" / "test")


def test_no_champion_is_a_clear_message(project, monkeypatch, capsys):
    root, _ = project
    monkeypatch.chdir(root)
    _, params = _params(root, "empty")
    assert cli.main(["search", "a red circle left of a blue square", "--params", params]) == 1
    err = capsys.readouterr().err
    assert "no champion yet" in err and "'empty'" in err


def test_text_query_ranks_test_images_like_the_evaluation(project, monkeypatch, capsys):
    root, runs = project
    monkeypatch.chdir(root)
    cfg, params = _params(root, "text-query", "contrastive", runs)
    feats, j = _test_features(root), 5
    tokens, lengths = feats.text.gather([j])  # (1, L, Dt) padded to its own length
    stored = (torch.from_numpy(tokens).float(), torch.arange(tokens.shape[1])[None] < int(lengths[0]),
              torch.from_numpy(np.array(feats.text_pooled[j:j + 1])).float())
    monkeypatch.setattr(cli, "text_features", lambda cfg, text, device: stored)
    assert cli.main(["search", "caption five", "--top", "3", "--params", params]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("champion: contrastive") and out[1] == "query: 'caption five'"
    model, _ = load_aligner(root / "models" / "contrastive" / "final" / "seed-0")
    _, t2i = score_matrices(model, feats)
    expected = np.argsort(-t2i[:, j], kind="stable")[:3]
    for line, row in zip(out[2:], expected):
        rank, score, _, image_id, file_name = line.split()
        assert float(score) == pytest.approx(t2i[row, j], abs=1e-3)
        assert int(image_id) == int(feats.image_ids[row]) and file_name == f"{int(feats.image_ids[row]):012d}.png"
    assert len(out) == 5


def test_image_query_with_a_reranking_champion(project, monkeypatch):
    root, runs = project
    monkeypatch.chdir(root)
    cfg, _ = _params(root, "image-query", "joint", runs)
    feats, i = _test_features(root), 3
    stored = (torch.from_numpy(np.array(feats.image_tokens[i:i + 1])).float(),
              torch.from_numpy(np.array(feats.image_pooled[i:i + 1])).float())
    monkeypatch.setattr(cli, "image_features", lambda cfg, path, device: stored)
    hits = cli.search(cfg, root, image="query.png", top=4)
    model, _ = load_aligner(root / "models" / "joint" / "final" / "seed-0")
    i2t, _ = score_matrices(model, feats)
    assert [h["row"] for h in hits] == np.argsort(-i2t[i], kind="stable")[:4].tolist()
    captions = read_json(root / "data" / "prepared" / "test" / "captions.json")
    assert hits[0]["caption"] == captions[hits[0]["row"]] and hits[0]["method"] == "joint"


def test_query_features_come_from_the_configured_encoders(tmp_path):
    cfg = tiny_config(tmp_path)
    tokens, mask, pooled = cli.text_features(cfg, "a red circle left of a blue square", torch.device("cpu"))
    assert tokens.shape[:2] == mask.shape and mask.all() and pooled.shape == (1, tokens.shape[2])
    path = tmp_path / "q.png"
    Image.new("RGB", (40, 30), (200, 20, 20)).save(path)
    img_tokens, img_pooled = cli.image_features(cfg, path, torch.device("cpu"))
    assert img_tokens.shape[0] == 1 and img_pooled.shape == (1, img_tokens.shape[2])


def test_usage_errors(capsys):
    with pytest.raises(SystemExit):
        cli.main(["search"])
    with pytest.raises(SystemExit):
        cli.main(["search", "text", "--image", "x.png"])
    assert "either a query text or --image" in capsys.readouterr().err
