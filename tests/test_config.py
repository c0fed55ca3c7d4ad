"""The shipped params.yaml loads; broken ones fail at load naming the key, value and what is allowed."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import dump_params
from crossalign import config


def test_shipped_params_load(repo_root: Path) -> None:
    cfg = config.load(repo_root / "params.yaml")
    assert cfg.data.dataset == "synthetic"
    assert cfg.train.methods == ["concat_mlp", "cross_attention", "contrastive", "joint"]
    assert cfg.select.baseline in cfg.train.methods
    # the shipped file spells out every key: nothing is left to a silent default
    shipped = yaml.safe_load((repo_root / "params.yaml").read_text())
    assert set(config.Config().flat()) == set(config.from_dict(shipped).flat())
    assert _keys(shipped) == set(config.Config().flat())


def _keys(tree: dict, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else k
        out |= _keys(v, key) if isinstance(v, dict) else {key}
    return out


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"train": {"epochs": 0}}, ["train.epochs", "0", "greater than or equal to 1"]),
        ({"train": {"epoch": 3}}, ["train.epoch", "unknown key"]),
        ({"trian": {}}, ["trian", "unknown key"]),
        ({"preprocess": {"resize": "stretch"}}, ["preprocess.resize", "'stretch'", "squash", "center_crop"]),
        ({"preprocess": {"on_bad_input": "ignore"}}, ["preprocess.on_bad_input", "'error'", "'skip'"]),
        ({"data": {"dataset": "imagenet"}}, ["data", "imagenet", "synthetic", "coco2017"]),
        ({"data": {"dataset": "coco-folder"}}, ["data.folder"]),
        ({"data": {"synthetic": {"min_objects": 5, "max_objects": 2}}}, ["min_objects", "max_objects"]),
        ({"train": {"methods": ["contrastive", "clip"]}}, ["train.methods", "clip", "concat_mlp"]),
        ({"train": {"methods": ["contrastive"]}}, ["select.baseline", "concat_mlp"]),
        ({"train": {"lr": "fast"}}, ["train.lr", "'fast'", "number"]),
        ({"methods": {"contrastive": {"temperature": -1}}}, ["methods.contrastive.temperature", "-1"]),
        ({"train": {"seeds": []}}, ["train.seeds", "at least 1"]),
        ({"tune": {"sampler": "grid"}}, ["tune.sampler", "'grid'", "'tpe'", "'random'", "'qmc'"]),
        ({"tune": {"sampler": "TPE"}}, ["tune.sampler", "'TPE'", "'tpe'"]),
        ({"tune": {"n_startup_trials": 0}}, ["tune.n_startup_trials", "0", "greater than or equal to 1"]),
        ({"tune": {"n_startup_trials": 2.5}}, ["tune.n_startup_trials", "2.5"]),
        ({"tune": {"startup_trials": 2}}, ["tune.startup_trials", "unknown key"]),  # now pruner_startup_trials
    ],
)
def test_broken_params_name_key_value_and_allowed(tmp_path: Path, raw: dict, expected: list[str]) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    message = str(err.value)
    assert str(path) in message
    for fragment in expected:
        assert fragment in message, f"{fragment!r} missing from:\n{message}"


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [epochs: 3\n")
    with pytest.raises(config.ConfigError, match="not valid YAML"):
        config.load(bad)
    with pytest.raises(config.ConfigError, match="not found"):
        config.load(tmp_path / "absent.yaml")
    bad.write_text("- just\n- a list\n")
    with pytest.raises(config.ConfigError, match="expected a mapping"):
        config.load(bad)


def test_flat_and_roundtrip() -> None:
    cfg = config.Config()
    flat = cfg.flat()
    assert flat["methods.joint.shortlist_k"] == 16
    assert flat["train.seeds"] == [0]
    again = config.from_dict(yaml.safe_load(dump_params(cfg)))
    assert again == cfg


def test_unknown_keys_get_the_closest_allowed_key() -> None:
    with pytest.raises(config.ConfigError) as err:
        config.from_dict({"train": {"epoch": 3}, "trian": {}, "tracking": {"uri": "x"}})
    msg = str(err.value)
    assert "train.epoch: unknown key (value 3); did you mean `epochs`?" in msg
    assert "trian: unknown key (value {}); did you mean `train`?" in msg
    # nothing close: the allowed keys instead
    assert "tracking.uri: unknown key ('x'); allowed: tracking_uri, artifact_location" in msg.replace("(value ", "(")


def test_validator_messages_lose_pydantics_prefix() -> None:
    with pytest.raises(config.ConfigError) as err:
        config.from_dict({"train": {"methods": ["clip"]}})
    assert "train.methods = ['clip']: unknown methods ['clip']" in str(err.value) and "Value error" not in str(err.value)


def test_missing_keys_with_the_likely_typo() -> None:
    raw = {"train": {"epoch": 3, "lr": 0.1}, "data": {"dataset": "synthetic"}}
    assert config.missing_keys(raw, ["train.epochs", "train.lr", "data", "evaluate.device", "data.dataset.x"]) == [
        ("train.epochs", "train.epoch"), ("evaluate.device", None), ("data.dataset.x", None)]


@pytest.mark.parametrize(("value", "shown"), [
    ("http://user:p@ss/w:rd@host:5000/x", "'http://<credentials>@host:5000/x'"),
    ("postgresql://u:pw@db/x?password=s3cret&sslmode=require", "'postgresql://<credentials>@db/x?password=<password>&sslmode=require'"),
    ("sqlite:////srv/a@b/mlflow.db", "'sqlite:////srv/a@b/mlflow.db'"),  # a path, no authority: nothing to hide
    ("http://host:5000", "'http://host:5000'"),
    ({"uri": ["http://u:p/w@h"]}, "{'uri': ['http://<credentials>@h']}"),  # inside a section given whole
])
def test_bad_values_are_shown_with_the_whole_userinfo_hidden(value, shown) -> None:
    assert config._shown(value) == shown


def test_an_unknown_key_holding_a_url_shows_no_password() -> None:
    with pytest.raises(config.ConfigError, match="unknown key") as err:
        config.from_dict({"tracking": {"trackng_uri": "http://user:p@ss/w:rd@host:5000"}})
    assert "<credentials>@host:5000" in str(err.value)
    assert not any(part in str(err.value) for part in ("p@s", "ss/w", "w:rd", "user:"))


@pytest.mark.parametrize("raw_dir", ["/srv/raw", "../raw", "data/../../raw", ""])
def test_raw_dir_stays_inside_the_project(raw_dir: str) -> None:
    with pytest.raises(config.ConfigError, match="data.raw_dir.*relative path inside the project"):
        config.from_dict({"data": {"raw_dir": raw_dir}})
    assert config.from_dict({"data": {"raw_dir": "data/raw2"}}).data.raw_dir == "data/raw2"
