"""The synthetic binding dataset: schema, determinism, twins, captions, pixels."""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_config, dump_params
from crossalign import config
from crossalign.data import stage as data
from crossalign.data import synthetic
from crossalign.data.captions import CaptionPlan, Described, render
from crossalign.data.render import COLOURS

TINY = {"n_train": 24, "n_val": 8, "n_test": 8, "image_size": 64, "workers": 1}


def _params(**overrides) -> config.SyntheticParams:
    return config.SyntheticParams(**{**TINY, **overrides})


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _words(caption: str) -> list[str]:
    return sorted(re.findall(r"[a-z]+", caption.lower()))


def _load(folder: Path, split: str) -> dict:
    return json.loads((folder / "annotations" / f"captions_{split}.json").read_text())


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(_params(), seed=0, out=out)
    return out


def test_schema_and_files(tiny_set: Path) -> None:
    ids = []
    for split, n in (("train", 24), ("val", 8), ("test", 8)):
        d = _load(tiny_set, split)
        assert list(d) == ["info", "licenses", "images", "annotations"]
        assert len(d["images"]) == n
        per_image = Counter(a["image_id"] for a in d["annotations"])
        assert set(per_image) == {im["id"] for im in d["images"]} and set(per_image.values()) == {5}
        for im in d["images"]:
            assert {"id", "file_name", "width", "height", "license", "twin_id", "swap"} <= set(im)
            assert im["file_name"].startswith(f"{split}/")
            with Image.open(tiny_set / "images" / im["file_name"]) as img:
                assert (img.format, img.mode, img.size) == ("PNG", "RGB", (64, 64))
        assert all(isinstance(a["caption"], str) and a["caption"] for a in d["annotations"])
        ids += [im["id"] for im in d["images"]]
    assert sorted(ids) == list(range(1, 41))


def test_same_seed_same_bytes_any_worker_count(tiny_set: Path, tmp_path: Path) -> None:
    synthetic.generate(_params(workers=2), seed=0, out=tmp_path / "again")
    assert _digest(tmp_path / "again") == _digest(tiny_set)
    synthetic.generate(_params(), seed=1, out=tmp_path / "other")
    other = _digest(tmp_path / "other")
    assert other.keys() == _digest(tiny_set).keys() and other != _digest(tiny_set)


def test_twins_share_split_and_words_not_binding(tiny_set: Path) -> None:
    for split in ("train", "val", "test"):
        d = _load(tiny_set, split)
        images = {im["id"]: im for im in d["images"]}
        caps: dict[int, list[str]] = {}
        for a in d["annotations"]:
            caps.setdefault(a["image_id"], []).append(a["caption"])
        twins = [im for im in images.values() if im["twin_id"] is not None]
        assert len(twins) == 2 * round(len(images) * 0.67 / 2)  # twin_fraction 0.67
        for im in twins:
            other = images[im["twin_id"]]  # KeyError if the twin lies in another split
            assert other["twin_id"] == im["id"] and other["swap"] == im["swap"] in ("colour", "position", "size")
            for mine, theirs in zip(caps[im["id"]], caps[other["id"]]):
                assert _words(mine) == _words(theirs)  # same bag of words ...
            assert caps[im["id"]] != caps[other["id"]]  # ... bound differently
            a, b = im["objects"][:2], other["objects"][:2]
            if im["swap"] == "colour":
                assert (a[0]["colour"], a[1]["colour"]) == (b[1]["colour"], b[0]["colour"])
                assert [o["shape"] for o in a] == [o["shape"] for o in b]
            elif im["swap"] == "size":
                assert {a[0]["size"], a[1]["size"]} == {"small", "large"}
                assert (a[0]["size"], a[1]["size"]) == (b[1]["size"], b[0]["size"])
            else:
                assert (a[0]["shape"], a[1]["shape"]) == (b[1]["shape"], b[0]["shape"])
            assert im["objects"][2:] == other["objects"][2:]
        singles = [im for im in images.values() if im["twin_id"] is None]
        assert all(im["swap"] is None for im in singles)


def test_twin_pixels_differ_only_around_the_focal_pair(tiny_set: Path) -> None:
    d = _load(tiny_set, "train")
    images = {im["id"]: im for im in d["images"]}
    im = next(i for i in d["images"] if i["swap"] == "colour")
    a = np.asarray(Image.open(tiny_set / "images" / im["file_name"]), dtype=np.int16)  # (S, S, 3)
    b = np.asarray(Image.open(tiny_set / "images" / images[im["twin_id"]]["file_name"]), dtype=np.int16)
    changed = np.abs(a - b).sum(-1) > 0  # (S, S)
    inside = np.zeros_like(changed)
    for obj in im["objects"][:2]:
        x, y, w, h = obj["bbox"]
        inside[max(int(y) - 1, 0):int(y + h) + 2, max(int(x) - 1, 0):int(x + w) + 2] = True
    assert changed.any() and not (changed & ~inside).any()


def test_objects_drawn_in_their_colour_where_the_record_says(tmp_path: Path) -> None:
    synthetic.generate(_params(colour_noise=0.0, pixel_noise=0.0, image_size=128, n_train=8, n_val=4, n_test=4),
                       seed=3, out=tmp_path)
    d = _load(tmp_path, "train")
    checked = 0
    for im in d["images"]:
        pixels = np.asarray(Image.open(tmp_path / "images" / im["file_name"]))  # (S, S, 3) uint8
        for obj in im["objects"]:
            if obj["shape"] == "ring":  # hollow centre
                continue
            x, y, w, h = obj["bbox"]
            centre = pixels[int(round(y + h / 2)), int(round(x + w / 2))].astype(int)
            assert np.abs(centre - np.array(COLOURS[obj["colour"]])).max() <= 1, (im["id"], obj)
            checked += 1
        cx = [o["bbox"][0] + o["bbox"][2] / 2 for o in im["objects"][:2]]
        cy = [o["bbox"][1] + o["bbox"][3] / 2 for o in im["objects"][:2]]
        dx, dy = cx[0] - cx[1], cy[0] - cy[1]
        expect = ("left" if dx < 0 else "right") if abs(dx) >= abs(dy) else ("above" if dy < 0 else "below")
        assert im["relation"] == expect
    assert checked >= 16


@pytest.mark.parametrize("plan, relation, expected", [
    (CaptionPlan(0, 0, False, False, False, False), "left", "a red circle to the left of a blue square"),
    (CaptionPlan(1, 1, False, False, False, False), "left", "a blue square is right of a red circle"),
    (CaptionPlan(2, 0, True, False, False, False), "left",
     "two shapes: a small red circle and, to its right, a large blue square"),
    (CaptionPlan(4, 0, False, False, True, True), "below", "At the top a blue square, at the bottom a red circle."),
    (CaptionPlan(7, 2, True, False, False, False), "above", "a huge blue square with a tiny red circle higher up"),
])
def test_caption_templates(plan: CaptionPlan, relation: str, expected: str) -> None:
    objects = [Described("red", "circle", "small"), Described("blue", "square", "large")]
    assert render(plan, objects, relation) == expected


def test_caption_names_distractors_when_planned() -> None:
    objects = [Described("red", "circle", "small"), Described("blue", "square", "large"),
               Described("orange", "star", "small")]
    with_them = render(CaptionPlan(0, 2, False, True, False, False), objects, "above")
    assert with_them == "a red circle higher than a blue square; an orange star is also there"
    assert render(CaptionPlan(0, 0, False, False, False, False), objects, "above") == "a red circle above a blue square"
    assert render(CaptionPlan(2, 0, False, False, False, False), objects, "above") == \
        "three shapes: a red circle and, below it, a blue square, plus an orange star"


def test_swap_kinds_balanced_and_ids_contiguous() -> None:
    groups = synthetic.plan_groups(_params(n_train=63), seed=0)  # round(63 * 0.67 / 2) = 21 pairs
    kinds = Counter(g.swap for g in groups if g.split == "train")
    assert kinds["colour"] == kinds["position"] == kinds["size"] == 7 and kinds[None] == 63 - 2 * 21
    assert [g.first_id for g in groups] == sorted(g.first_id for g in groups)


def test_bad_params_fail_at_load() -> None:
    with pytest.raises(config.ConfigError, match="small_size"):
        config.from_dict({"data": {"synthetic": {"small_size": 0.15, "large_size": 0.1}}})
    with pytest.raises(config.ConfigError, match="min_objects"):
        config.from_dict({"data": {"synthetic": {"min_objects": 1}}})


def test_stage_run_and_entry_point(tmp_path: Path, monkeypatch) -> None:
    cfg = tiny_config(tmp_path, data={"synthetic": {**TINY, "n_train": 8, "n_val": 4, "n_test": 4}})
    dest = data.run(cfg, tmp_path)
    assert dest == tmp_path / "data" / "raw" / "synthetic"
    assert sorted(p.name for p in (dest / "annotations").iterdir()) == [
        "captions_test.json", "captions_train.json", "captions_val.json"]
    assert not [p for p in dest.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    params = tmp_path / "params.yaml"
    params.write_text(dump_params(cfg))
    monkeypatch.chdir(tmp_path)
    from tasks import data as task

    before = _digest(dest)
    assert task.main(["--params", str(params)]) == 0
    assert _digest(dest) == before


def test_splits_disjoint_and_twin_pairs_never_cross(tiny_set: Path) -> None:
    parts = {s: _load(tiny_set, s) for s in ("train", "val", "test")}
    split_of: dict[int, str] = {}
    files: dict[str, str] = {}
    for split, part in parts.items():
        for im in part["images"]:
            assert im["id"] not in split_of, f"image {im['id']} in {split_of.get(im['id'])} and {split}"
            assert im["file_name"] not in files, f"{im['file_name']} in {files.get(im['file_name'])} and {split}"
            split_of[im["id"]], files[im["file_name"]] = split, split
    twins = [(im["id"], im["twin_id"]) for part in parts.values() for im in part["images"] if im["twin_id"] is not None]
    assert twins and all(split_of[a] == split_of[b] for a, b in twins)  # a twin pair lives in one split
    assert {split_of[a] for a, _ in twins} == {"train", "val", "test"}  # and every split has twins
