"""``crossalign search`` against a tiny registered champion in a real sqlite MLflow store."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
import torch
from PIL import Image

from conftest import REPO, tiny_config, dump_params
from crossalign import cli
from crossalign.tracking import registry
from crossalign.select import search
from crossalign.io import load_features, read_json
from crossalign.methods import load_aligner
from crossalign.retrieval.scoring import score_matrices
from eval_helpers import run_of, save_model, write_prepared_test, write_split_features

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Features, prepared test split and a logged contrastive and joint model."""
    root = tmp_path_factory.mktemp("project")
    cfg = tiny_config(root)
    write_split_features(root)
    write_prepared_test(root)
    for m in ("contrastive", "joint"):
        save_model(cfg, root, m, 0)
    runs = {m: run_of(cfg, root, m, 0) for m in ("contrastive", "joint")}
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
    layers = []  # the token layer the query is encoded at: the gallery features' own (meta.json)
    monkeypatch.setattr(search, "text_features", lambda cfg, text, device, layer: (layers.append(layer), stored)[1])
    images = root / "data" / "raw" / cfg.data.dataset / "images"  # where the data stage puts them
    images.mkdir(parents=True, exist_ok=True)
    for image_id in feats.image_ids:
        (images / f"{int(image_id):012d}.png").write_bytes(b"png")
    assert cli.main(["search", "caption five", "--top", "3", "--params", params]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("champion: contrastive") and out[1] == "query: 'caption five'"
    assert out[2].split() == ["rank", "score", "image_id", "path", "(from", "the", "project", "root)"]
    model, _ = load_aligner(root / "models" / "contrastive" / "final" / "seed-0")
    _, t2i = score_matrices(model, feats)
    expected = np.argsort(-t2i[:, j], kind="stable")[:3]
    for line, row in zip(out[3:], expected):
        rank, score, image_id, path = line.split()
        assert float(score) == pytest.approx(t2i[row, j], abs=1e-3)
        assert int(image_id) == int(feats.image_ids[row])
        assert path == f"data/raw/synthetic/images/{int(feats.image_ids[row]):012d}.png" and (root / path).is_file()
    assert len(out) == 6 and layers == [-1]


def test_text_query_refuses_a_gallery_whose_token_layer_is_not_a_layer(project, monkeypatch):
    import crossalign.io

    root, runs = project
    monkeypatch.chdir(root)
    cfg, _ = _params(root, "bad-layer", "contrastive", runs)
    real = crossalign.io.load_features

    def tampered(path, *args, **kwargs):
        split = real(path, *args, **kwargs)
        split.meta = {**split.meta, "text_encoder": {**split.meta.get("text_encoder", {}), "token_layer": "3"}}
        return split

    monkeypatch.setattr(crossalign.io, "load_features", tampered)
    monkeypatch.setattr(search, "text_features", lambda *a: pytest.fail("encoded a query at an unchecked layer"))
    with pytest.raises(ValueError, match=r"test/meta.json: text_encoder.token_layer = '3', expected an integer"):
        search.search(cfg, root, text="a red circle")


def test_image_query_with_a_reranking_champion(project, monkeypatch):
    root, runs = project
    monkeypatch.chdir(root)
    cfg, _ = _params(root, "image-query", "joint", runs)
    feats, i = _test_features(root), 3
    stored = (torch.from_numpy(np.array(feats.image_tokens[i:i + 1])).float(),
              torch.from_numpy(np.array(feats.image_pooled[i:i + 1])).float())
    monkeypatch.setattr(search, "image_features", lambda cfg, path, device: stored)
    hits = search.search(cfg, root, image="query.png", top=4)
    model, _ = load_aligner(root / "models" / "joint" / "final" / "seed-0")
    i2t, _ = score_matrices(model, feats)
    assert [h["row"] for h in hits] == np.argsort(-i2t[i], kind="stable")[:4].tolist()
    captions = read_json(root / "data" / "prepared" / "test" / "captions.json")
    assert hits[0]["caption"] == captions[hits[0]["row"]] and hits[0]["method"] == "joint"


def test_query_features_come_from_the_configured_encoders(tmp_path):
    cfg = tiny_config(tmp_path)
    tokens, mask, pooled = search.text_features(cfg, "a red circle left of a blue square", torch.device("cpu"))
    assert tokens.shape[:2] == mask.shape and mask.all() and pooled.shape == (1, tokens.shape[2])
    path = tmp_path / "q.png"
    Image.new("RGB", (40, 30), (200, 20, 20)).save(path)
    img_tokens, img_pooled = search.image_features(cfg, path, torch.device("cpu"))
    assert img_tokens.shape[0] == 1 and img_pooled.shape == (1, img_tokens.shape[2])


def test_usage_errors(capsys):
    with pytest.raises(SystemExit):
        cli.main(["search"])
    with pytest.raises(SystemExit):
        cli.main(["search", "text", "--image", "x.png"])
    assert "either a query text or --image" in capsys.readouterr().err


@pytest.mark.parametrize("query", ["", "   ", "\t\n"])
def test_empty_query_is_a_usage_error(query, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["search", query])
    assert exit_.value.code == 2 and "query text is empty" in capsys.readouterr().err


def test_missing_image_is_named(tmp_path, capsys):
    missing = tmp_path / "nope.png"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["search", "--image", str(missing)])
    assert exit_.value.code == 2 and f"--image {missing}: no such file" in capsys.readouterr().err


def test_unreadable_image_is_named(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match=f"{bad}: not an image"):
        search.image_features(tiny_config(tmp_path), bad, torch.device("cpu"))


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_check_accepts_the_shipped_params(repo_root, capsys):
    assert cli.main(["check", "--params", str(repo_root / "params.yaml"), "--dvc-yaml", str(repo_root / "dvc.yaml")]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "param keys" in out


def test_check_suggests_the_key_a_typo_meant(repo_root, tmp_path, capsys):
    text = (repo_root / "params.yaml").read_text()
    assert "  epochs: 8" in text
    params = _write(tmp_path / "params.yaml", text.replace("  epochs: 8", "  epoch: 3"))
    assert cli.main(["check", "--params", params, "--dvc-yaml", str(repo_root / "dvc.yaml")]) == 2
    err = capsys.readouterr().err
    assert "train.epoch: unknown key (value 3); did you mean `epochs`?" in err
    assert ("train.epochs (read by tune@concat_mlp, tune@cross_attention, tune@contrastive, tune@joint, "
            "train@concat_mlp, train@cross_attention, train@contrastive, train@joint, select)") in err
    assert "Nothing was run" in err


def test_check_finds_a_key_dvc_reads_that_the_file_lacks(repo_root, tmp_path, capsys):
    """A deleted key is valid for the typed config (it has a default) but DVC needs it written."""
    text = (repo_root / "params.yaml").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("  patience:"))
    params = _write(tmp_path / "params.yaml", text.replace(line + "\n", ""))
    assert cli.main(["check", "--params", params, "--dvc-yaml", str(repo_root / "dvc.yaml")]) == 2
    err = capsys.readouterr().err
    assert "train.patience (read by tune@concat_mlp" in err and "train@joint)" in err and "invalid configuration" not in err


def test_check_says_which_side_of_a_section_typo_to_fix(repo_root, tmp_path, capsys):
    """A misspelt section key: the file has the typo, the stage's key is right."""
    text = (repo_root / "params.yaml").read_text()
    assert "\n  cross_attention:\n" in text
    params = _write(tmp_path / "params.yaml", text.replace("\n  cross_attention:\n", "\n  cross_atention:\n"))
    assert cli.main(["check", "--params", params, "--dvc-yaml", str(repo_root / "dvc.yaml")]) == 2
    err = capsys.readouterr().err
    assert "methods.cross_atention: unknown key" in err and "did you mean `cross_attention`?" in err
    assert ("methods.cross_attention (read by tune@cross_attention, train@cross_attention); params.yaml has "
            "`methods.cross_atention` instead: rename it to `methods.cross_attention`") in err
    assert "did you mean `methods.cross_atention`" not in err


def test_check_says_which_side_of_a_list_typo_to_fix(repo_root, tmp_path, capsys):
    """A misspelt name in train.methods: the stage's key (built from it) is the typo, not the file's."""
    text = (repo_root / "params.yaml").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("  methods: [") and "cross_attention" in ln)
    params = _write(tmp_path / "params.yaml", text.replace(line, line.replace("cross_attention", "cross_atention")))
    assert cli.main(["check", "--params", params, "--dvc-yaml", str(repo_root / "dvc.yaml")]) == 2
    err = capsys.readouterr().err
    assert "unknown methods ['cross_atention']" in err
    assert ("methods.cross_atention (read by tune@cross_atention, train@cross_atention); `cross_atention` is not a "
            "key of `methods` (did you mean `cross_attention`?): fix the list in params.yaml that names it") in err
    assert "did you mean `methods.cross_atention`" not in err


def test_check_fails_on_a_coco_folder_that_does_not_exist(repo_root, tmp_path, capsys):
    text = (repo_root / "params.yaml").read_text()
    dataset = next(ln for ln in text.splitlines() if ln.startswith("  dataset: synthetic"))
    folder = next(ln for ln in text.splitlines() if ln.startswith("  folder: null"))
    text = text.replace(dataset, "  dataset: coco-folder").replace(folder, "  folder: my-coco")
    params = _write(tmp_path / "params.yaml", text)
    argv = ["check", "--params", params, "--dvc-yaml", str(repo_root / "dvc.yaml")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"data.folder = 'my-coco': {tmp_path / 'my-coco'} is not a folder" in err  # relative to the project
    (tmp_path / "my-coco").mkdir()
    assert cli.main(argv) == 0, capsys.readouterr().err


def test_dvc_param_keys_expands_foreach_and_reports_unknown_vars(tmp_path):
    dvc_yaml = tmp_path / "dvc.yaml"
    dvc_yaml.write_text(
        "stages:\n"
        "  a:\n    cmd: x\n    params:\n      - s.k\n      - params.yaml:\n          - s.j\n"
        "  b:\n    foreach: ${s.items}\n    do:\n      cmd: y ${item}\n      params:\n        - m.${item}\n        - m.${s.name}\n"
        "  c:\n    foreach: ${nope.items}\n    do:\n      cmd: z\n")
    raw = {"s": {"items": ["p", "q"], "name": "n", "k": 1, "j": 2}}
    stages, problems = cli.dvc_param_keys(dvc_yaml, raw)
    assert stages == {"a": ["s.k", "s.j"], "b@p": ["m.p", "m.n"], "b@q": ["m.q", "m.n"]}
    assert problems == [f"{dvc_yaml}: stage c: foreach ${{nope.items}} is not in params.yaml"]


def test_help_and_a_real_query_print_nothing_else(project, tmp_path):
    """``--help``, and the MLflow import plus the real offline text encoder a query goes through:
    no MLflow UserWarning and no "Loading weights" bar on stderr. (The toy champion here was trained
    on 10-wide features, not MiniLM's 384; a whole query on a real pipeline: tests/test_dayone.py.)"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    help_ = subprocess.run([sys.executable, "-m", "crossalign.cli", "--help"], capture_output=True, text=True,
                           env=env, cwd=tmp_path, timeout=120)
    assert help_.returncode == 0 and help_.stderr == "" and "check" in help_.stdout and "search" in help_.stdout
    code = ("import sys, torch; from crossalign import cli, config; cli._quiet(); "
            "from crossalign.tracking import registry, runs; from crossalign.select import search; "
            "t, m, p = search.text_features(config.Config(), 'a red circle', torch.device('cpu')); "
            "print(tuple(p.shape))")
    query = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=300)
    assert query.returncode == 0, query.stderr
    assert query.stdout.strip() == "(1, 384)" and query.stderr == "", query.stderr


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """A tiny synthetic project through the real data, preprocess and features stages (48 px
    scenes written as PNG files, resized to 32 px by preprocess as a query image is by search)."""
    from crossalign.data import stage as data
    from crossalign.features import stage as features
    from crossalign.preprocess import stage as preprocess

    root = tmp_path_factory.mktemp("staged")
    cfg = tiny_config(root, data={"synthetic": {"n_train": 4, "n_val": 4, "n_test": 6, "image_size": 48}})
    data.run(cfg, root)
    preprocess.run(cfg, root)
    features.run(cfg, root, progress=False)
    return cfg, root


def test_query_features_equal_the_features_stage_for_the_same_image_and_caption(staged):
    """What ``crossalign search`` encodes for a query is what the features stage stored for that
    test image file / caption (fp16 storage both ways, fp32 CPU encoders): the champion compares
    like with like."""
    cfg, root = staged
    feats = load_features(root / "data" / "features" / "test")
    records = read_json(root / "data" / "prepared" / "test" / "images.json")
    captions = read_json(root / "data" / "prepared" / "test" / "captions.json")
    cpu = torch.device("cpu")
    for i in (0, len(records) - 1):
        tokens, pooled = search.image_features(cfg, root / search.image_path(cfg, records[i]["file_name"]), cpu)
        torch.testing.assert_close(tokens[0], torch.from_numpy(np.array(feats.image_tokens[i])).float(), atol=2e-3, rtol=1e-2)
        torch.testing.assert_close(pooled[0], torch.from_numpy(np.array(feats.image_pooled[i])).float(), atol=2e-3, rtol=1e-2)
    for j in (0, 3, len(captions) - 1):
        tokens, mask, pooled = search.text_features(cfg, captions[j], cpu)
        stored, lengths = feats.text.gather([j])  # (1, L, Dt)
        assert int(mask.sum()) == int(lengths[0]), captions[j]
        torch.testing.assert_close(tokens[0], torch.from_numpy(stored[0]).float(), atol=2e-3, rtol=1e-2)
        torch.testing.assert_close(pooled[0], torch.from_numpy(np.array(feats.text_pooled[j])).float(), atol=2e-3, rtol=1e-2)


def test_summary_names_the_report_the_runs_table_and_the_metrics(tmp_path):
    from crossalign.select import summary
    from crossalign.tracking import runs as tracking

    cfg = tiny_config(tmp_path)
    before = summary.lines(cfg, tmp_path, 5.4)
    assert before[0] == "Finished in 5 s. Where to look:" and "no experiment 'crossalign' yet" in before[3]
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()  # the summary creates no store
    exp_id = tracking.setup(cfg, tmp_path)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "comparison.md").write_text("# Method comparison\n")
    (tmp_path / "reports" / "selection.json").write_text('{"champion": "joint"}')
    text = "\n".join(summary.lines(cfg, tmp_path, 582))
    assert text.startswith("Finished in 9 min 42 s. Where to look:")
    assert "\nreport:  reports/comparison.md (champion: joint)\n" in text
    assert (f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={tracking.SHARED_VIEW_KEY}") in text
    assert f"\nMLflow:  .venv/bin/mlflow ui --backend-store-uri {cfg.tracking.tracking_uri}, then open\n" in text
    assert text.endswith("\nmetrics: .venv/bin/dvc metrics show")
    assert summary.elapsed_text(3725) == "1 h 02 min" and summary.elapsed_text(60) == "1 min 0 s"


def test_make_run_ends_with_the_summary_and_its_time(repo_root):
    recipe = (repo_root / "Makefile").read_text().split("\nrun:", 1)[1].split("\n\n", 1)[0]
    steps = [step for step in ("crossalign check", "dvc repro", "crossalign summary --elapsed") if step in recipe]
    assert steps == ["crossalign check", "dvc repro", "crossalign summary --elapsed"]
    assert recipe.index("crossalign check") < recipe.index("dvc repro") < recipe.index("crossalign summary")


def test_check_notes_a_real_dataset_run_without_the_real_profile(repo_root, tmp_path, capsys):
    """A dataset of real photos with the synthetic recipe: check passes and names each key where
    params-real.yaml differs; with the profile's values written in, or on synthetic data, no note."""
    text = (repo_root / "params.yaml").read_text()
    dataset = next(ln for ln in text.splitlines() if ln.startswith("  dataset: synthetic"))
    folder = next(ln for ln in text.splitlines() if ln.startswith("  folder: null"))
    (tmp_path / "photos").mkdir()
    (tmp_path / "params-real.yaml").write_text("train:\n  caption_negatives: 0\nmethods:\n  joint:\n    matcher: cross\n")
    argv = ["check", "--params", str(tmp_path / "params.yaml"), "--dvc-yaml", str(repo_root / "dvc.yaml")]
    _write(tmp_path / "params.yaml", text)
    assert cli.main(argv) == 0 and "note:" not in capsys.readouterr().out  # synthetic: the shipped recipe
    real = text.replace(dataset, "  dataset: coco-folder").replace(folder, "  folder: photos")
    _write(tmp_path / "params.yaml", real)
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "note: data.dataset coco-folder holds real photos" in out
    assert "train.caption_negatives (1 -> 0), methods.joint.matcher (late -> cross)." in out
    assert "dvc exp run $(crossalign overlay params-real.yaml --flag=-S)" in out
    applied = yaml.safe_load(real)
    applied["train"]["caption_negatives"], applied["methods"]["joint"]["matcher"] = 0, "cross"
    _write(tmp_path / "params.yaml", yaml.safe_dump(applied, sort_keys=False))
    assert cli.main(argv) == 0 and "note:" not in capsys.readouterr().out
