"""flickr8k / flickr30k: Karpathy's dataset_flickr*.json from caption_datasets.zip (served by a
real HTTP server on 127.0.0.1), images from data.folder. The flickr8k fixture is written here in
Karpathy's format from ../shared/flickr8k-dev (753 real photos, 553 / 100 / 100); every expected
value comes from that fixture, not from the builder."""
from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import SHARED, tiny_config
from crossalign import config
from crossalign.cli import input_problems
from crossalign.data import download, flickr
from crossalign.data import stage as data
from test_data_download import ArchiveServer, checksum_of, make_zip

FLICKR8K_DEV = SHARED / "flickr8k-dev"
ZIP = "/karpathy/caption_datasets.zip"


@pytest.fixture(scope="module")
def flickr8k_dev() -> Path:
    if not (FLICKR8K_DEV / "annotations" / "captions_test.json").exists():
        pytest.skip(f"{FLICKR8K_DEV} is absent: the Flickr8k tests need the shared photos beside the repo")
    return FLICKR8K_DEV


def karpathy_flickr8k(dev: Path) -> dict:
    """``dataset_flickr8k.json`` as Karpathy writes it (keys filename, imgid, sentences, split,
    sentids; sentences with tokens, raw, imgid, sentid), the dev set's split kept in ``split``.
    Records are sorted by file name, so the splits interleave; imgid and sentid count from 0."""
    rows = []
    for split in ("train", "val", "test"):
        ds = json.loads((dev / "annotations" / f"captions_{split}.json").read_text())
        caps: dict[int, list[str]] = {}
        for ann in sorted(ds["annotations"], key=lambda a: a["id"]):
            caps.setdefault(ann["image_id"], []).append(ann["caption"])
        rows += [(img["file_name"], split, caps[img["id"]]) for img in ds["images"]]
    images, sentid = [], 0
    for imgid, (name, split, raws) in enumerate(sorted(rows)):
        ids = list(range(sentid, sentid + len(raws)))
        sentid += len(raws)
        images.append({"sentids": ids, "imgid": imgid, "split": split, "filename": name, "sentences": [
            {"tokens": raw.lower().strip(" .").split(), "raw": raw, "imgid": imgid, "sentid": s}
            for s, raw in zip(ids, raws)]})
    return {"images": images, "dataset": "flickr8k"}


@pytest.fixture(scope="module")
def karpathy8k(flickr8k_dev: Path) -> dict:
    return karpathy_flickr8k(flickr8k_dev)


def serve(monkeypatch, members: dict[str, bytes]) -> ArchiveServer:
    """A loopback server with ``caption_datasets.zip`` holding ``members``; the zip's checksum is
    registered under its name, as the real one is."""
    body = make_zip(members)
    monkeypatch.setitem(download.CHECKSUMS, "caption_datasets.zip", checksum_of(body))
    return ArchiveServer({ZIP: body})


def cfg_for(tmp_path: Path, dataset: str, folder: str | Path, url: str) -> config.Config:
    return tiny_config(tmp_path, data={"dataset": dataset, "folder": str(folder), "coco": {
        "karpathy_url": f"{url}{ZIP}", "retry_wait_s": 0, "retries": 0, "download_dir": "dl"}})


def captions(dest: Path, split: str) -> dict:
    return json.loads((dest / "annotations" / f"captions_{split}.json").read_text())


def copy_to_official_layout(dev: Path, folder: Path) -> Path:
    """The dev photos under ``Flicker8k_Dataset/`` (the official zip's spelling), as a user who
    unzipped Flickr8k_Dataset.zip into ``folder`` has them."""
    shutil.copytree(dev / "images", folder / "Flicker8k_Dataset")
    return folder


def test_flickr8k_karpathy_splits_captions_and_linked_images(flickr8k_dev, karpathy8k, tmp_path, monkeypatch):
    folder = copy_to_official_layout(flickr8k_dev, tmp_path / "my-flickr8k")
    members = {"dataset_flickr8k.json": json.dumps(karpathy8k).encode(),
               "dataset_flickr30k.json": json.dumps({"images": [], "dataset": "flickr30k"}).encode(),
               "dataset_coco.json": b"{}"}
    with serve(monkeypatch, members) as srv:
        dest = data.run(cfg_for(tmp_path, "flickr8k", folder, srv.url), tmp_path)
        assert [p for p, _ in srv.requests] == [ZIP]
    assert dest == tmp_path / "data" / "raw" / "flickr8k"
    parts = {s: captions(dest, s) for s in ("train", "val", "test")}
    assert [len(parts[s]["images"]) for s in ("train", "val", "test")] == [553, 100, 100]

    expected = {rec["filename"]: rec for rec in karpathy8k["images"]}
    for split, part in parts.items():
        by_image: dict[int, list[tuple[int, str]]] = {}
        for ann in part["annotations"]:
            by_image.setdefault(ann["image_id"], []).append((ann["id"], ann["caption"]))
        assert sorted(by_image) == sorted(img["id"] for img in part["images"])
        for img in part["images"]:
            rec = expected[img["file_name"]]
            assert rec["split"] == split and img["id"] == rec["imgid"]
            assert sorted(by_image[img["id"]]) == [(s["sentid"], s["raw"]) for s in rec["sentences"]]
            assert len(by_image[img["id"]]) == 5
            original = flickr8k_dev / "images" / img["file_name"]
            placed = dest / "images" / img["file_name"]
            assert placed.read_bytes() == original.read_bytes()
            assert os.path.samefile(placed, folder / "Flicker8k_Dataset" / img["file_name"])  # a hard link
            with Image.open(original) as im:
                assert (img["width"], img["height"]) == im.size
    assert sum(len(p["annotations"]) for p in parts.values()) == 5 * 753
    assert len(list((dest / "images").iterdir())) == 753
    # one spot check written out by hand from the shared dev set's captions_val.json
    val = {img["file_name"]: img["id"] for img in parts["val"]["images"]}
    first = [a["caption"] for a in parts["val"]["annotations"] if a["image_id"] == val["1019077836_6fc9b15408.jpg"]]
    assert "A brown dog chases the water from a sprinkler on a lawn ." in first


def test_flickr8k_missing_images_stop_the_stage_naming_the_first(flickr8k_dev, karpathy8k, tmp_path, monkeypatch):
    folder = copy_to_official_layout(flickr8k_dev, tmp_path / "my-flickr8k")
    names = [rec["filename"] for rec in karpathy8k["images"]]
    for k in (700, 10, 200):  # the JSON lists names[10] first
        (folder / "Flicker8k_Dataset" / names[k]).unlink()
    with serve(monkeypatch, {"dataset_flickr8k.json": json.dumps(karpathy8k).encode()}) as srv, \
            pytest.raises(FileNotFoundError) as err:
        data.run(cfg_for(tmp_path, "flickr8k", folder, srv.url), tmp_path)
    message = str(err.value)
    assert f"first missing: {names[10]}" in message
    assert "3 of the 753 images dataset_flickr8k.json lists" in message
    assert f"data.folder = '{folder}'" in message and str(folder / "Flicker8k_Dataset") in message
    assert "licence form" in message and "set data.folder" in message
    assert not (tmp_path / "data" / "raw").exists() or list((tmp_path / "data" / "raw").iterdir()) == []


def _jpeg(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (30, 120, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def test_flickr30k_name_and_split_mapping_with_restval(tmp_path, monkeypatch):
    entries = [("1000092795.jpg", "train", (60, 40)), ("10002456.jpg", "restval", (50, 30)),
               ("1000268201.jpg", "val", (40, 44)), ("1000344755.jpg", "test", (33, 21)),
               ("100197432.jpg", "train", (20, 20))]
    imgids = [31, 4, 17, 3, 12]  # not the records' positions
    images = [{"sentids": [10 * n + k for k in range(5)], "imgid": n, "split": split, "filename": name,
               "sentences": [{"tokens": [], "raw": f"person {n} says {k}", "imgid": n, "sentid": 10 * n + k}
                             for k in range(5)]} for n, (name, split, _) in zip(imgids, entries)]
    folder = tmp_path / "f30k"
    for name, _, size in entries:
        path = folder / "flickr30k-images" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_jpeg(size))
    decoy = {"images": [dict(images[0], split="test")], "dataset": "flickr8k"}  # the wrong file must not be read
    members = {"dataset_flickr30k.json": json.dumps({"images": images, "dataset": "flickr30k"}).encode(),
               "dataset_flickr8k.json": json.dumps(decoy).encode()}
    with serve(monkeypatch, members) as srv:
        dest = data.run(cfg_for(tmp_path, "flickr30k", "f30k", srv.url), tmp_path)  # relative to the root
    parts = {s: captions(dest, s) for s in ("train", "val", "test")}
    assert {s: [(im["id"], im["file_name"]) for im in p["images"]] for s, p in parts.items()} == {
        "train": [(31, "1000092795.jpg"), (4, "10002456.jpg"), (12, "100197432.jpg")],
        "val": [(17, "1000268201.jpg")], "test": [(3, "1000344755.jpg")]}
    assert [(im["width"], im["height"]) for im in parts["train"]["images"]] == [(60, 40), (50, 30), (20, 20)]
    assert [(a["id"], a["image_id"], a["caption"]) for a in parts["test"]["annotations"]] == \
        [(30 + k, 3, f"person 3 says {k}") for k in range(5)]
    assert sorted(a["id"] for a in parts["train"]["annotations"]) == [40, 41, 42, 43, 44, 120, 121, 122, 123, 124,
                                                                      310, 311, 312, 313, 314]
    placed = dest / "images" / "10002456.jpg"
    assert placed.read_bytes() == (folder / "flickr30k-images" / "10002456.jpg").read_bytes()
    assert "Flickr30k" in parts["val"]["info"]["description"]


@pytest.mark.parametrize("dataset", ["flickr8k", "flickr30k"])
def test_flickr_without_data_folder_is_a_config_error_naming_the_key(tmp_path, dataset):
    path = tmp_path / "params.yaml"
    path.write_text(f"data:\n  dataset: {dataset}\n")
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert "data.folder" in str(err.value) and dataset in str(err.value)
    cfg = tiny_config(tmp_path, data={"dataset": dataset, "folder": "nowhere"})
    expected = (f"data.folder = 'nowhere': {tmp_path / 'nowhere'} is not a folder "
                f"(data.dataset {dataset} reads the {dataset.capitalize()} images there)")
    assert input_problems(cfg, tmp_path) == [expected]


GOOD = {"filename": "1.jpg", "imgid": 0, "split": "train", "sentences": [{"raw": "a dog", "sentid": 0}]}


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "not valid JSON"),
    ('{"dataset": "flickr8k"}', "key 'images' is missing or not a list"),
    ('{"images": {}}', "key 'images' is missing or not a list"),
    ('[1, 2]', "key 'images' is missing or not a list"),
    ('{"images": []}', "key 'images' is an empty list"),
    (json.dumps({"images": [GOOD, {k: v for k, v in GOOD.items() if k != "filename"}]}),
     "images[1] lacks key(s) ['filename']"),
    (json.dumps({"images": [{k: v for k, v in GOOD.items() if k != "sentences"}]}),
     "images[0] (1.jpg) lacks key(s) ['sentences']"),
    (json.dumps({"images": [GOOD, dict(GOOD, filename="2.jpg", imgid=1), {k: v for k, v in GOOD.items()
                                                                          if k != "split"}]}),
     "images[2] (1.jpg) lacks key(s) ['split']"),
    (json.dumps({"images": [dict(GOOD, split="dev")]}), "images[0] (1.jpg): split 'dev'"),
    (json.dumps({"images": [dict(GOOD, sentences=[{"raw": "a dog"}])]}), "images[0] (1.jpg): sentences[0] lacks"),
    (json.dumps({"images": [dict(GOOD, filename="../1.jpg")]}), "images[0] (../1.jpg): filename '../1.jpg'"),
    (json.dumps({"images": [GOOD, dict(GOOD, filename="2.jpg")]}), "images[1] has the imgid 0 of images[0]"),
    (json.dumps({"images": [GOOD], "dataset": "flickr30k"}), "'dataset' is 'flickr30k', expected 'flickr8k'"),
])
def test_malformed_karpathy_json_is_named_with_its_record(tmp_path, content, message):
    path = tmp_path / "dataset_flickr8k.json"
    path.write_text(content)
    with pytest.raises(ValueError) as err:
        flickr.read_flickr(path, "flickr8k")
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_archive_without_the_flickr_json_names_it(tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    with serve(monkeypatch, {"dataset_coco.json": b"{}"}) as srv, pytest.raises(FileNotFoundError) as err:
        data.run(cfg_for(tmp_path, "flickr30k", tmp_path / "imgs", srv.url), tmp_path)
    assert "dataset_flickr30k.json: not found in caption_datasets.zip" in str(err.value)
    assert zipfile.is_zipfile(tmp_path / "dl" / "caption_datasets.zip")  # the download itself is kept
