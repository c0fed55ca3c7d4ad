"""coco2017 / coco-karpathy end to end against a local HTTP server, and coco-folder (shared sample,
bad records passed through, malformed files refused)."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image
from pycocotools.coco import COCO

from conftest import tiny_config
from crossalign.data import stage as data
from crossalign.data import download
from crossalign.data.download import ChecksumError
from test_data_download import ArchiveServer, checksum_of, make_zip


def _jpeg(size=(40, 30), colour=(200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def _caption_json(ids: list[int], folderless: bool = True) -> bytes:
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 40, "height": 30, "license": 1} for i in ids]
    anns = [{"id": 100 * i + k, "image_id": i, "caption": f"photo {i} caption {k}"} for i in ids for k in range(5)]
    return json.dumps({"info": {"year": 2017}, "licenses": [], "images": images, "annotations": anns}).encode()


TRAIN_IDS, VAL_IDS = [1, 2, 3, 4, 5, 6], [7, 8, 9]


@pytest.fixture
def coco2017_server(monkeypatch):
    files = {
        "/zips/train2017.zip": make_zip({f"train2017/{i:012d}.jpg": _jpeg() for i in TRAIN_IDS}),
        "/zips/val2017.zip": make_zip({f"val2017/{i:012d}.jpg": _jpeg() for i in VAL_IDS}),
        "/annotations/annotations_trainval2017.zip": make_zip({
            "annotations/captions_train2017.json": _caption_json(TRAIN_IDS),
            "annotations/captions_val2017.json": _caption_json(VAL_IDS)}),
    }
    for path, body in files.items():
        monkeypatch.setitem(download.CHECKSUMS, path.rsplit("/", 1)[1], checksum_of(body))
    with ArchiveServer(files) as srv:
        yield srv


def _cfg(tmp_path: Path, dataset: str, url: str, **coco):
    return tiny_config(tmp_path, data={"dataset": dataset, "coco": {
        "base_url": url, "val_images": 2, "retry_wait_s": 0, "download_dir": "dl", **coco}})


def _split(dest: Path, split: str) -> dict:
    return json.loads((dest / "annotations" / f"captions_{split}.json").read_text())


def test_coco2017_download_extract_convert(coco2017_server: ArchiveServer, tmp_path: Path) -> None:
    coco2017_server.cut_once["/zips/train2017.zip"] = 500  # the connection drops once mid-file
    dest = data.run(_cfg(tmp_path, "coco2017", coco2017_server.url), tmp_path)
    assert dest == tmp_path / "data" / "raw" / "coco2017"
    assert ("/zips/train2017.zip", "bytes=500-") in coco2017_server.requests
    parts = {s: _split(dest, s) for s in ("train", "val", "test")}
    assert [len(parts[s]["images"]) for s in ("train", "val", "test")] == [4, 2, 3]
    assert sorted(im["id"] for s in ("train", "val") for im in parts[s]["images"]) == TRAIN_IDS
    assert sorted(im["id"] for im in parts["test"]["images"]) == VAL_IDS
    for split, part in parts.items():
        ids = {im["id"] for im in part["images"]}
        assert {a["image_id"] for a in part["annotations"]} == ids and len(part["annotations"]) == 5 * len(ids)
        folder = "val2017" if split == "test" else "train2017"
        for im in part["images"]:
            assert im["file_name"] == f"{folder}/{im['id']:012d}.jpg"
            assert (dest / "images" / im["file_name"]).read_bytes()[:2] == b"\xff\xd8"
        coco = COCO(str(dest / "annotations" / f"captions_{split}.json"))
        assert len(coco.imgs) == len(ids)
    # the carve-out is fixed by split_seed: a rebuild from the cached archives gives the same split
    before = [len(coco2017_server.requests), parts["val"]["images"]]
    data.run(_cfg(tmp_path, "coco2017", coco2017_server.url), tmp_path)
    assert [len(coco2017_server.requests), _split(dest, "val")["images"]] == before


def test_coco2017_wrong_checksum_stops_and_keeps_nothing(coco2017_server: ArchiveServer, tmp_path: Path,
                                                         monkeypatch) -> None:
    good = download.CHECKSUMS["val2017.zip"]
    monkeypatch.setitem(download.CHECKSUMS, "val2017.zip", download.Checksum("f" * 32, good.size))
    with pytest.raises(ChecksumError) as err:
        data.run(_cfg(tmp_path, "coco2017", coco2017_server.url), tmp_path)
    assert "val2017.zip" in str(err.value) and "f" * 32 in str(err.value) and good.md5 in str(err.value)
    assert not (tmp_path / "dl" / "val2017.zip").exists() and not (tmp_path / "dl" / "val2017.zip.part").exists()
    assert not (tmp_path / "data" / "raw").exists() or not list((tmp_path / "data" / "raw").iterdir())


def test_coco_karpathy(tmp_path: Path, monkeypatch) -> None:
    entries = [("train", "train2014", 11), ("restval", "val2014", 12), ("val", "val2014", 13), ("test", "val2014", 14)]
    karpathy = {"dataset": "coco", "images": [
        {"split": s, "filepath": fp, "filename": f"COCO_{fp}_{i:012d}.jpg", "cocoid": i, "imgid": n,
         "sentids": [10 * i, 10 * i + 1],
         "sentences": [{"raw": f"raw caption {i}.{k}", "tokens": [], "sentid": 10 * i + k} for k in range(2)]}
        for n, (s, fp, i) in enumerate(entries)]}
    files = {
        "/karpathy/caption_datasets.zip": make_zip({"dataset_coco.json": json.dumps(karpathy).encode(),
                                                    "dataset_flickr8k.json": b"{}"}),
        "/zips/train2014.zip": make_zip({"train2014/COCO_train2014_000000000011.jpg": _jpeg((50, 20))}),
        "/zips/val2014.zip": make_zip({f"val2014/COCO_val2014_{i:012d}.jpg": _jpeg() for i in (12, 13)}),
    }  # image 14 is absent from the archive: passed through for preprocess to report
    for path, body in files.items():
        monkeypatch.setitem(download.CHECKSUMS, path.rsplit("/", 1)[1], checksum_of(body))
    with ArchiveServer(files) as srv:
        cfg = _cfg(tmp_path, "coco-karpathy", srv.url, karpathy_url=f"{srv.url}/karpathy/caption_datasets.zip")
        dest = data.run(cfg, tmp_path)
    parts = {s: _split(dest, s) for s in ("train", "val", "test")}
    assert {s: sorted(im["id"] for im in p["images"]) for s, p in parts.items()} == \
        {"train": [11, 12], "val": [13], "test": [14]}
    train = {im["id"]: im for im in parts["train"]["images"]}
    assert train[11]["file_name"] == "train2014/COCO_train2014_000000000011.jpg"
    assert (train[11]["width"], train[11]["height"]) == (50, 20)
    assert parts["test"]["images"][0]["width"] is None
    assert sorted(a["id"] for a in parts["train"]["annotations"]) == [110, 111, 120, 121]
    assert parts["val"]["annotations"][0]["caption"] == "raw caption 13.0"
    assert (dest / "images" / train[11]["file_name"]).is_file()
    assert not (dest / "images" / parts["test"]["images"][0]["file_name"]).exists()


def test_coco_folder_on_shared_sample(coco_sample: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, data={"dataset": "coco-folder", "folder": str(coco_sample)})
    dest = data.run(cfg, tmp_path)
    assert dest == tmp_path / "data" / "raw" / "coco-folder"
    source = json.loads((coco_sample / "annotations" / "captions_train2017.json").read_text())
    parts = {s: _split(dest, s) for s in ("train", "val", "test")}
    assert [len(parts[s]["images"]) for s in ("train", "val", "test")] == [64, 8, 8]
    assert sorted(im["id"] for p in parts.values() for im in p["images"]) == sorted(im["id"] for im in source["images"])
    assert sum(len(p["annotations"]) for p in parts.values()) == len(source["annotations"])
    for part in parts.values():
        assert part["info"] == source["info"]
        for im in part["images"]:
            assert (dest / "images" / im["file_name"]).read_bytes() == \
                (coco_sample / "train2017" / im["file_name"]).read_bytes()
    again = data.run(tiny_config(tmp_path, data={"dataset": "coco-folder", "folder": str(coco_sample)}), tmp_path)
    assert _split(again, "val") == parts["val"]  # the carve is seeded


def _folder_with_splits(root: Path) -> Path:
    folder = root / "mycoco"
    (folder / "images" / "sub").mkdir(parents=True)
    (folder / "images" / "sub" / "a.jpg").write_bytes(_jpeg())
    (folder / "images" / "b.jpg").write_bytes(_jpeg())
    (root / "outside.jpg").write_bytes(_jpeg())  # what images/../../outside.jpg would reach
    (folder / "annotations").mkdir()
    bad = {"info": {}, "licenses": [],
           "images": [{"id": 1, "file_name": "sub/a.jpg", "width": 40, "height": 30},
                      {"id": 2, "file_name": "missing.jpg", "width": 40, "height": 30},
                      {"id": 4, "file_name": "../../outside.jpg", "width": 40, "height": 30}],
           "annotations": [{"id": 1, "image_id": 1, "caption": ""},
                           {"id": 2, "image_id": 99, "caption": "points at nothing"}]}
    (folder / "images" / "c.jpg").write_bytes(_jpeg())
    val = {"images": [{"id": 3, "file_name": "b.jpg"}], "annotations": [{"id": 3, "image_id": 3, "caption": "b"}]}
    test = {"images": [{"id": 5, "file_name": "c.jpg"}], "annotations": [{"id": 5, "image_id": 5, "caption": "c"}]}
    for split, content in (("train", bad), ("val", val), ("test", test)):
        (folder / "annotations" / f"captions_{split}.json").write_text(json.dumps(content))
    return folder


def test_coco_folder_with_splits_links_and_passes_bad_records_through(tmp_path: Path) -> None:
    folder = _folder_with_splits(tmp_path)
    dest = data.run(tiny_config(tmp_path, data={"dataset": "coco-folder", "folder": "mycoco"}), tmp_path)
    train = _split(dest, "train")
    assert [im["id"] for im in train["images"]] == [1, 2, 4]  # no file / escaping file_name: kept
    assert [a["caption"] for a in train["annotations"]] == ["", "points at nothing"]  # empty + orphan kept
    linked = dest / "images" / "sub" / "a.jpg"
    assert os.path.samefile(linked, folder / "images" / "sub" / "a.jpg")  # a hard link, not a copy
    assert not (dest / "images" / "missing.jpg").exists()
    assert sorted(p.name for p in (dest / "images").rglob("*")) == ["a.jpg", "b.jpg", "c.jpg", "sub"]  # nothing outside
    assert _split(dest, "val")["images"] == [{"id": 3, "file_name": "b.jpg"}]


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    (json.dumps([1, 2]), "not a JSON object"),
    (json.dumps({"images": []}), "key 'annotations' is missing"),
    (json.dumps({"images": {}, "annotations": []}), "key 'images' is a dict"),
    (json.dumps({"images": [{"id": 1}], "annotations": []}), r"images\[0\] lacks key\(s\) \['file_name'\]"),
    (json.dumps({"images": [], "annotations": [{"id": 1, "image_id": 1}]}), r"lacks key\(s\) \['caption'\]"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}), "cannot carve 1 val"),
])
def test_coco_folder_malformed_file_is_named(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "bad" / "annotations").mkdir(parents=True)
    path = tmp_path / "bad" / "annotations" / "captions_all.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        data.run(tiny_config(tmp_path, data={"dataset": "coco-folder", "folder": "bad"}), tmp_path)
    assert "captions_all.json" in str(err.value)
    assert not (tmp_path / "data" / "raw" / "coco-folder").exists()


def test_coco_folder_ambiguous_caption_files(tmp_path: Path) -> None:
    (tmp_path / "two").mkdir()
    for name in ("captions_a.json", "captions_b.json"):
        (tmp_path / "two" / name).write_text("{}")
    with pytest.raises(FileNotFoundError, match="captions_a.json.*captions_b.json"):
        data.run(tiny_config(tmp_path, data={"dataset": "coco-folder", "folder": "two"}), tmp_path)


def test_split_leaks_named_by_id_and_by_file() -> None:
    from crossalign.data.cocofmt import split_leaks
    img = lambda i, f: {"id": i, "file_name": f}  # noqa: E731
    parts = {"train": {"images": [img(1, "a.jpg"), img(2, "b.jpg")]},
             "val": {"images": [img(3, "c.jpg")]},
             "test": {"images": [img(1, "a.jpg"), img(4, "c.jpg")]}}
    assert split_leaks(parts) == ["image id 1 (a.jpg) in train and test", "file a.jpg in train and test",
                                  "file c.jpg in val and test"]
    assert split_leaks({"train": {"images": [img(1, "a.jpg")]}, "val": {"images": [img(2, "b.jpg")]},
                        "test": {"images": []}}) == []


@pytest.mark.parametrize("leak, message", [
    ({"id": 3, "file_name": "other.jpg"}, r"image id 3 \(b.jpg\) in val and test"),  # same id in two splits
    ({"id": 7, "file_name": "b.jpg"}, r"file b.jpg in val and test"),  # same file under another id
])
def test_coco_folder_image_in_two_splits_stops_naming_it(tmp_path: Path, leak: dict, message: str) -> None:
    folder = _folder_with_splits(tmp_path)
    test = {"images": [leak], "annotations": [{"id": 9, "image_id": leak["id"], "caption": "x"}]}
    (folder / "annotations" / "captions_test.json").write_text(json.dumps(test))
    with pytest.raises(ValueError, match=message) as err:
        data.run(tiny_config(tmp_path, data={"dataset": "coco-folder", "folder": "mycoco"}), tmp_path)
    assert "mycoco" in str(err.value) and "more than one split" in str(err.value)
    assert not (tmp_path / "data" / "raw" / "coco-folder").exists()  # nothing half-written


def test_coco2017_carve_out_is_disjoint(coco2017_server: ArchiveServer, tmp_path: Path) -> None:
    dest = data.run(_cfg(tmp_path, "coco2017", coco2017_server.url, val_images=3), tmp_path)
    ids = {s: [im["id"] for im in _split(dest, s)["images"]] for s in ("train", "val", "test")}
    files = {s: {im["file_name"] for im in _split(dest, s)["images"]} for s in ("train", "val", "test")}
    assert sorted(ids["train"] + ids["val"]) == TRAIN_IDS and len(ids["val"]) == 3  # each train2017 image once
    assert not set(ids["train"]) & set(ids["val"]) and not (set(ids["train"]) | set(ids["val"])) & set(ids["test"])
    assert not files["train"] & files["val"] and not files["val"] & files["test"] and not files["train"] & files["test"]
    for split in ("train", "val"):  # captions follow their image into its split
        assert {a["image_id"] for a in _split(dest, split)["annotations"]} == set(ids[split])
