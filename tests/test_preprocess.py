"""The preprocess stage end to end on small real files: outputs, bad input, atomicity, the pool."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crossalign.preprocess.images import decode_image
from crossalign.preprocess.stage import BadInputError, compact_rows, run, truncate_npy
from tasks import preprocess as task
from conftest import tiny_config, dump_params

SIZES = {"train": 6, "val": 3, "test": 3}


def colour(image_id: int) -> tuple[int, int, int]:
    return (image_id * 37 % 256, image_id * 91 % 256, image_id * 13 % 256)


def write_split(raw: Path, split: str, images: list[dict], annotations: list[dict]) -> None:
    doc = {"info": {"description": "test"}, "licenses": [], "images": images, "annotations": annotations}
    (raw / "annotations").mkdir(parents=True, exist_ok=True)
    (raw / "annotations" / f"captions_{split}.json").write_text(json.dumps(doc))


def make_raw(root: Path, sizes: dict[str, int] = SIZES) -> Path:
    """``root/data/raw/synthetic``: solid-colour PNGs (colour from the id), two captions each,
    and the synthetic extra keys ``twin_id`` / ``swap`` on every image record."""
    raw = root / "data" / "raw" / "synthetic"
    (raw / "images").mkdir(parents=True)
    next_id = 1
    for split, n in sizes.items():
        images, anns = [], []
        for _ in range(n):
            iid, name = next_id, f"{split}_{next_id:04d}.png"
            next_id += 1
            Image.new("RGB", (40, 30), colour(iid)).save(raw / "images" / name)
            images.append({"id": iid, "file_name": name, "width": 40, "height": 30, "twin_id": iid + 1, "swap": "colour"})
            anns += [{"id": iid * 10 + k, "image_id": iid, "caption": f"image {iid} caption {k}"} for k in range(2)]
        write_split(raw, split, images, anns)
    return raw


def load_split(root: Path, split: str) -> dict:
    d = root / "data" / "prepared" / split
    out = {p.stem: np.load(p) for p in d.glob("*.npy")}
    out.update(records=json.loads((d / "images.json").read_text()),
               captions=json.loads((d / "captions.json").read_text()), meta=json.loads((d / "meta.json").read_text()))
    return out


def add_to_split(raw: Path, split: str, images: list[dict], anns: list[dict]) -> None:
    path = raw / "annotations" / f"captions_{split}.json"
    doc = json.loads(path.read_text())
    doc["images"] += images
    doc["annotations"] += anns
    path.write_text(json.dumps(doc))


def add_bad_inputs(raw: Path) -> set[tuple[str, str, object]]:
    """One real file / record of every bad kind -> the set of (split, kind, id) expected as bad."""
    img = raw / "images"
    rng = np.random.default_rng(0)
    (img / "zero.jpg").write_bytes(b"")
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(img / "whole.jpg", quality=90)
    data = (img / "whole.jpg").read_bytes()
    (img / "cut.jpg").write_bytes(data[: len(data) // 2])
    (img / "text.jpg").write_text("not an image\n")
    Image.new("RGB", (100, 100), (9, 9, 9)).save(img / "huge.png")  # 10,000 px > max_pixels = 5,000
    bad_files = {101: "gone.jpg", 102: "zero.jpg", 103: "cut.jpg", 104: "text.jpg", 105: "huge.png"}
    images = [{"id": i, "file_name": f} for i, f in bad_files.items()]
    images.append({"id": 106, "file_name": "train_0001.png"})  # an image with no caption at all
    anns = [{"id": 1000 + i, "image_id": i, "caption": "a caption of a bad file"} for i in bad_files]
    anns += [{"id": 9001, "image_id": 9999, "caption": "points at nothing"},
             {"id": 9002, "image_id": 1, "caption": ""},
             {"id": 9003, "image_id": 2, "caption": "  \n\t"}]
    add_to_split(raw, "train", images, anns)
    add_to_split(raw, "val", [{"id": 201, "file_name": "val_0007.png"}],  # its only caption is empty
                 [{"id": 2010, "image_id": 201, "caption": " "}])
    Image.new("RGB", (40, 30), (1, 2, 3)).save(img / "val_0007.png")
    return ({("train", "image", i) for i in [*bad_files, 106]} | {("val", "image", 201)}
            | {("train", "annotation", a) for a in (9001, 9002, 9003)} | {("val", "annotation", 2010)})


def test_outputs_follow_the_contract(tmp_path: Path) -> None:
    make_raw(tmp_path)
    out = run(tiny_config(tmp_path), tmp_path)
    assert out == tmp_path / "data" / "prepared"
    assert json.loads((out / "skipped.json").read_text()) == []
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["prepared", "raw"]  # no temp dirs left
    for split, n in SIZES.items():
        s = load_split(tmp_path, split)
        assert s["images"].shape == (n, 3, 32, 32) and s["images"].dtype == np.uint8
        assert s["image_ids"].dtype == np.int64 and s["tokens"].dtype == np.int32
        assert s["offsets"].dtype == np.int64 and s["offsets"].shape == (2 * n + 1,)
        assert s["offsets"][-1] == s["tokens"].size
        for row, iid in enumerate(s["image_ids"]):
            assert tuple(s["images"][row, :, 5, 5]) == colour(int(iid))  # row order follows image_ids
        assert [r["twin_id"] for r in s["records"]] == [int(i) + 1 for i in s["image_ids"]]  # extra keys kept
        for j, (cid, img_row) in enumerate(zip(s["caption_ids"], s["caption_image_index"])):
            iid = int(s["image_ids"][img_row])
            assert cid // 10 == iid and s["captions"][j] == f"image {iid} caption {cid % 10}"
            ids = s["tokens"][s["offsets"][j]:s["offsets"][j + 1]]
            assert ids[0] == 101 and ids[-1] == 102
        meta = s["meta"]
        assert (meta["n_images"], meta["n_captions"], meta["image_size"], meta["resize"]) == (n, 2 * n, 32, "squash")
        assert meta["tokenizer"] == "offline" and meta["max_length"] == 128


def test_bad_input_stops_with_one_message_listing_every_record(tmp_path: Path) -> None:
    raw = make_raw(tmp_path)
    expected = add_bad_inputs(raw)
    cfg = tiny_config(tmp_path, preprocess={"max_pixels": 5000})
    with pytest.raises(BadInputError) as err:
        run(cfg, tmp_path)
    msg = str(err.value)
    assert f"{len(expected)} bad input record(s)" in msg
    for split, kind, rid in expected:
        assert any(re.split(r"[\s:(]+", line.strip())[:3] == [split, kind, str(rid)]
                   for line in msg.splitlines()), (split, kind, rid)
    for reason in ("missing file", "empty file", "truncated", "not an image", "too many pixels", "no caption",
                   "unknown image id 9999", "empty caption", "whitespace-only caption", "no valid caption"):
        assert reason in msg, reason
    assert "preprocess.on_bad_input: skip" in msg
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["raw"]  # nothing that looks whole


def test_skip_writes_skipped_json_and_leaves_bad_records_out(tmp_path: Path) -> None:
    raw = make_raw(tmp_path)
    expected = add_bad_inputs(raw)
    cfg = tiny_config(tmp_path, preprocess={"max_pixels": 5000, "on_bad_input": "skip", "batch_size": 4})
    out = run(cfg, tmp_path)
    skipped = json.loads((out / "skipped.json").read_text())
    bad = {(s["split"], s["kind"], s["id"]) for s in skipped if "is bad" not in s["reason"]}
    assert bad == expected
    dropped = {s["id"] for s in skipped if s["reason"].startswith("its image")}
    assert dropped == {1101, 1102, 1103, 1104, 1105}  # captions of the bad files, listed too
    train = load_split(tmp_path, "train")
    assert train["image_ids"].tolist() == [1, 2, 3, 4, 5, 6] and train["images"].shape == (6, 3, 32, 32)
    assert set(train["caption_ids"].tolist()) == {i * 10 + k for i in range(1, 7) for k in range(2)}
    assert tuple(train["images"][5, :, 5, 5]) == colour(6)
    assert load_split(tmp_path, "val")["image_ids"].tolist() == [7, 8, 9]


def test_failed_run_keeps_previous_output(tmp_path: Path) -> None:
    raw = make_raw(tmp_path)
    out = run(tiny_config(tmp_path), tmp_path)
    before = (out / "train" / "images.npy").read_bytes()
    add_bad_inputs(raw)
    with pytest.raises(BadInputError):
        run(tiny_config(tmp_path, preprocess={"max_pixels": 5000}), tmp_path)
    assert (out / "train" / "images.npy").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["prepared", "raw"]


def test_exotic_modes_pass_through_the_stage(tmp_path: Path) -> None:
    """CMYK, RGBA, palette+transparency, 16-bit and EXIF-rotated files are images, not bad input."""
    raw = make_raw(tmp_path, {"train": 1, "val": 1, "test": 1})
    img = raw / "images"
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(img / "cmyk.jpg")
    Image.new("RGBA", (40, 30), (0, 0, 255, 0)).save(img / "rgba.png")
    pal = Image.new("P", (40, 30), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.save(img / "pal.png", transparency=0)
    Image.fromarray(np.full((30, 40), 65535, dtype=np.uint16)).save(img / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("L", (40, 30), 200).save(img / "rot.jpg", exif=exif)
    names = ["cmyk.jpg", "rgba.png", "pal.png", "deep.png", "rot.jpg"]
    add_to_split(raw, "train", [{"id": 50 + k, "file_name": n} for k, n in enumerate(names)],
                 [{"id": 500 + k, "image_id": 50 + k, "caption": f"exotic {n}"} for k, n in enumerate(names)])
    run(tiny_config(tmp_path), tmp_path)
    train = load_split(tmp_path, "train")
    centre = [tuple(int(v) for v in train["images"][r, :, 16, 16]) for r in range(1, 6)]
    assert abs(centre[0][0] - 255) < 10 and centre[0][1] < 10  # red ink
    assert centre[1] == centre[2] == (255, 255, 255) and centre[3] == (255, 255, 255)  # transparent -> white
    assert all(abs(v - 200) <= 2 for v in centre[4])


def test_pool_gives_the_same_bytes_as_one_process(tmp_path: Path) -> None:
    a, b = tmp_path / "one", tmp_path / "pool"
    make_raw(a)
    make_raw(b)
    run(tiny_config(a, preprocess={"workers": 1}), a)
    run(tiny_config(b, preprocess={"workers": 2, "batch_size": 2}), b)  # chunks of 1, 4 in flight
    for split in SIZES:
        for name in ("images", "image_ids", "tokens", "offsets", "caption_image_index", "caption_ids"):
            assert np.array_equal(np.load(a / "data/prepared" / split / f"{name}.npy"),
                                  np.load(b / "data/prepared" / split / f"{name}.npy")), (split, name)


def test_truncate_npy(tmp_path: Path) -> None:
    for rows in (100000, 7):  # header length unchanged / changed digit count
        path = tmp_path / f"a{rows}.npy"
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(rows, 3, 2, 2))
        arr[:] = (np.arange(rows) % 251).astype(np.uint8)[:, None, None, None]
        arr.flush()
        del arr
        truncate_npy(path, 5)
        got = np.load(path)
        assert got.shape == (5, 3, 2, 2) and got[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]


def test_compact_rows_keeps_flagged_rows_in_order(tmp_path: Path) -> None:
    path = tmp_path / "rows.npy"
    np.save(path, np.arange(20, dtype=np.uint8).reshape(10, 2))
    ok = np.array([0, 1, 1, 0, 0, 1, 1, 1, 0, 1], dtype=bool)
    assert compact_rows(path, ok, block=2) == 6
    assert np.load(path)[:, 0].tolist() == [2, 4, 10, 12, 14, 18]


def test_missing_raw_dataset_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data/raw/synthetic"):
        run(tiny_config(tmp_path), tmp_path)


def test_stage_entry_point_exit_codes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    raw = make_raw(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(dump_params(tiny_config(tmp_path)))
    assert task.main(["--params", "params.yaml"]) == 0
    assert (tmp_path / "data/prepared/test/images.npy").exists()
    add_bad_inputs(raw)
    assert task.main(["--params", "params.yaml"]) == 2
    err = capsys.readouterr().err
    assert "missing file" in err and "preprocess.on_bad_input: skip" in err and "Traceback" not in err


def _coco_sample_raw(tmp_path: Path, coco_sample: Path) -> tuple[Path, dict]:
    """A raw dataset of the shared sample's first 16 real COCO images (8 / 4 / 4) and their captions."""
    raw = tmp_path / "data" / "raw" / "synthetic"
    (raw / "annotations").mkdir(parents=True)
    (raw / "images").symlink_to(coco_sample / "train2017")
    doc = json.loads((coco_sample / "annotations" / "captions_train2017.json").read_text())
    for split, part in zip(SIZES, (doc["images"][:8], doc["images"][8:12], doc["images"][12:16])):
        ids = {r["id"] for r in part}
        write_split(raw, split, part, [a for a in doc["annotations"] if a["image_id"] in ids])
    return raw, doc


def test_real_coco_sample_center_crop(tmp_path: Path, coco_sample: Path) -> None:
    _, doc = _coco_sample_raw(tmp_path, coco_sample)
    run(tiny_config(tmp_path, preprocess={"image_size": 64, "resize": "center_crop"}), tmp_path)
    train = load_split(tmp_path, "train")
    assert train["images"].shape == (8, 3, 64, 64) and len(train["captions"]) == train["caption_ids"].size >= 40
    first = doc["images"][0]
    assert np.array_equal(train["images"][0], decode_image(coco_sample / "train2017" / first["file_name"], 64, "center_crop"))
    assert train["images"][0].std() > 10  # a photo, not a blank


def test_many_bad_records_give_counts_the_first_20_and_the_full_list(tmp_path: Path, coco_sample: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        capsys: pytest.CaptureFixture) -> None:
    """A COCO caption file whose images are mostly absent (once 4,841 of 5,000 missing printed
    4,841 lines): 16 real COCO images, 300 records of absent files, 25 captions of unknown images."""
    raw, doc = _coco_sample_raw(tmp_path, coco_sample)
    absent = [{"id": 10**9 + k, "file_name": f"absent_{k:04d}.jpg"} for k in range(300)]
    anns = [{"id": 10**9 + k, "image_id": r["id"], "caption": "a photo that is not there"} for k, r in enumerate(absent)]
    anns += [{"id": 2 * 10**9 + k, "image_id": 7 * 10**9 + k, "caption": "points at nothing"} for k in range(25)]
    add_to_split(raw, "train", absent, anns)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(dump_params(tiny_config(tmp_path, preprocess={"image_size": 32})))
    assert task.main(["--params", "params.yaml"]) == 2
    err = capsys.readouterr().err
    assert "325 bad input record(s)" in err
    assert re.search(r"^\s+300\s+image: missing file$", err, re.M), err
    assert re.search(r"^\s+25\s+annotation: points at unknown image id N$", err, re.M), err
    listed = [ln for ln in err.splitlines() if re.match(r"\s+train (image|annotation) \d+", ln)]
    assert len(listed) == 20  # the first 20, not 325
    assert "... and 305 more: every record is listed in" in err and "data/bad-input.txt" in err
    full = (tmp_path / "data" / "bad-input.txt").read_text().splitlines()
    assert len([ln for ln in full if not ln.startswith("#")]) == 325
    assert sum("absent_" in ln and "missing file" in ln for ln in full) == 300
    assert not (tmp_path / "data" / "prepared").exists()
    assert len(err.splitlines()) < 40


def test_a_few_bad_records_are_all_listed_and_no_list_file(tmp_path: Path) -> None:
    raw = make_raw(tmp_path)
    expected = add_bad_inputs(raw)  # 13 records: at most 20, so each is in the message
    with pytest.raises(BadInputError) as err:
        run(tiny_config(tmp_path, preprocess={"max_pixels": 5000}), tmp_path)
    assert "by reason" not in str(err.value) and len(expected) <= 20
    assert not (tmp_path / "data" / "bad-input.txt").exists()
