"""params-coco-gpu.yaml (the real-COCO GPU params set) applied the way `dvc exp run -S` applies it."""
from __future__ import annotations

import shutil

import pytest
import yaml

from conftest import REPO
from crossalign import config
from crossalign.cli import main, overrides

OVERLAY = REPO / "params-coco-gpu.yaml"


def test_overrides_are_dotted_hydra_values():
    got = overrides({"data": {"dataset": "coco-karpathy"}, "train": {"seeds": [0, 1], "epochs": 10, "lr": 0.0005},
                     "methods": {"joint": {"learnable_temperature": True}}, "data2": {"folder": None}})
    assert got == ["data.dataset=coco-karpathy", "train.seeds=[0,1]", "train.epochs=10", "train.lr=0.0005",
                   "methods.joint.learnable_temperature=true", "data2.folder=null"]
    with pytest.raises(ValueError, match="'a b'"):
        overrides({"data": {"folder": "a b"}})


def test_cli_prints_set_param_flags(capsys, tmp_path):
    path = tmp_path / "o.yaml"
    path.write_text("train:\n  epochs: 3\n  device: cuda\n")
    assert main(["overlay", str(path), "--flag=-S"]) == 0
    assert capsys.readouterr().out.split() == ["-S", "train.epochs=3", "-S", "train.device=cuda"]


def test_coco_gpu_overlay_applied_by_dvc_set_param_loads_and_reaches_stages(tmp_path):
    """DVC's own --set-param code (dvc.utils.hydra.apply_overrides, what `dvc exp run -S` calls) on a
    copy of params.yaml: the config loads, carries every overlay value, keeps every other value,
    and each overlay key is a param of some stage in dvc.yaml (so `dvc exp run` reruns it)."""
    from dvc.utils.hydra import apply_overrides

    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    items = overrides(yaml.safe_load(OVERLAY.read_text()))
    apply_overrides(params, items)
    cfg = config.load(params).model_dump(mode="json")
    base = config.load(REPO / "params.yaml").model_dump(mode="json")
    expected = {"data.dataset": "coco-karpathy", "methods.embed_dim": 256, "train.device": "cuda",
                "train.placement": "auto", "features.image_batch_size": 256, "evaluate.device": "cuda"}
    for key, value in expected.items():  # hand-picked from the overlay file
        section, *rest = key.split(".")
        node = cfg[section]
        for part in rest:
            node = node[part]
        assert node == value, key
    changed = {item.partition("=")[0] for item in items}

    def leaves(tree, prefix=""):
        for k, v in tree.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]

    after = dict(leaves(cfg))
    for key, value in leaves(base):
        if key not in changed:
            assert after[key] == value, key  # nothing else moved
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    declared = set()
    for stage in stages.values():
        body = stage.get("do", stage)
        for entry in body.get("params", []):
            names = [entry] if isinstance(entry, str) else list(entry)
            for name in names:
                declared.update(name.replace("${item}", m) for m in base["train"]["methods"])
    for key in changed:
        parts = key.split(".")
        assert any(".".join(parts[:i]) in declared for i in range(1, len(parts) + 1)), f"{key}: no stage reads it"


def test_verdict_overlay_gives_three_seeds_and_a_real_tuning_budget(tmp_path):
    """params-verdict.yaml through DVC's --set-param: 3 seeds, 20 trials as long as the final
    training (tune.epochs = train.epochs), nothing else moved, and each key is a param of a stage
    (select's included: the report's first table names the seeds and the budget)."""
    from dvc.utils.hydra import apply_overrides

    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    items = overrides(yaml.safe_load((REPO / "params-verdict.yaml").read_text()))
    apply_overrides(params, items)
    cfg = config.load(params)
    base = config.load(REPO / "params.yaml")
    assert cfg.train.seeds == [0, 1, 2] and cfg.tune.trials == 20
    assert cfg.tune.epochs == cfg.train.epochs == base.train.epochs == 8
    assert sorted(item.partition("=")[0] for item in items) == ["train.seeds", "tune.epochs", "tune.trials"]
    before, after = base.model_dump(mode="json"), cfg.model_dump(mode="json")
    for section in before:
        for key in before[section]:
            if f"{section}.{key}" not in {"train.seeds", "tune.epochs", "tune.trials"}:
                assert after[section][key] == before[section][key], f"{section}.{key}"
    select = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["select"]
    assert {"train.seeds", "tune.trials", "tune.epochs"} <= set(select["params"])


def test_real_overlay_loads_and_every_key_differs_from_params_yaml(tmp_path):
    """params-real.yaml through DVC's --set-param: the config loads with the real-caption recipe
    (hand-picked keys), and every key it holds differs from params.yaml (an overlay of a value that
    is already the default would hide which choices the profile makes)."""
    from dvc.utils.hydra import apply_overrides

    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    items = overrides(yaml.safe_load((REPO / "params-real.yaml").read_text()))
    apply_overrides(params, items)
    cfg, base = config.load(params), config.load(REPO / "params.yaml")
    assert (cfg.train.caption_negatives, cfg.train.binding_rank_weight) == (0, 0.0)
    assert (cfg.methods.cross_attention.matcher, cfg.methods.joint.matcher, cfg.methods.joint.itc_input) == (
        "cross", "cross", "pooled")
    assert cfg.data.dataset == base.data.dataset  # the profile names no dataset: it goes with any real one
    after, before = cfg.model_dump(mode="json"), base.model_dump(mode="json")
    for item in items:
        node_a, node_b = after, before
        for part in item.partition("=")[0].split("."):
            node_a, node_b = node_a[part], node_b[part]
        assert node_a != node_b, f"{item}: params.yaml already has this value"


def test_lit_gpu_overlay_trains_the_top_three_layers_and_reaches_stages(tmp_path):
    """params-lit-gpu.yaml through DVC's --set-param: the methods read the last layer computed by
    three trained layers over cached layer-3 states, every key differs from params.yaml, and each
    key is a param of a stage (so `dvc exp run` reruns what it changes)."""
    from dvc.utils.hydra import apply_overrides

    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    items = overrides(yaml.safe_load((REPO / "params-lit-gpu.yaml").read_text()))
    apply_overrides(params, items)
    cfg, base = config.load(params), config.load(REPO / "params.yaml")
    assert (cfg.features.text_token_layer, cfg.features.text_trainable_layers) == (-1, 3)
    assert base.features.text_trainable_layers == 0 and cfg.train.device == cfg.features.device == "cuda"
    after, before = cfg.model_dump(mode="json"), base.model_dump(mode="json")
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    declared = {name.replace("${item}", m) for stage in stages.values()
                for entry in stage.get("do", stage).get("params", [])
                for name in ([entry] if isinstance(entry, str) else list(entry)) for m in base.train.methods}
    for item in items:
        key = item.partition("=")[0]
        node_a, node_b = after, before
        for part in key.split("."):
            node_a, node_b = node_a[part], node_b[part]
        assert node_a != node_b, f"{item}: params.yaml already has this value"
        parts = key.split(".")
        assert any(".".join(parts[:i]) in declared for i in range(1, len(parts) + 1)), f"{key}: no stage reads it"
