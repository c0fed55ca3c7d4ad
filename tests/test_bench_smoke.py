"""Every bench/ script runs end to end at a tiny size, so no benchmark silently breaks.

Each test runs ``python -m bench.<name>`` in a subprocess (the real exit code, the real argument
parsing) on a tiny project under tmp, with every output file redirected there, and checks the
numbers it promises: the result JSON's keys and finite values, or the JSON line it prints.
Scripts and the test that runs them:

    bench.preprocess        test_preprocess (needs ../shared/coco-sample: real JPEGs)
    bench.features          test_features (random images: runs without the sample)
    bench.train             test_train
    bench.evaluate          test_evaluate
    bench.placement_speed   test_placement_speed
    bench.binding           test_binding
    bench.binding_ablation  test_binding_ablation (tests/test_binding_ablation.py runs one setting in-process)
    bench.cell_probe        test_cell_probe
    bench.text_probe        test_text_probe (captions of the generator's caption code; the real MiniLM)
    bench.recipe_val        test_recipe_val (tests/test_bench_splits.py: --final refuses other arms)
    bench.position          test_position (train twins from the tiny train split's twin_row.npy)
    bench.grounding         test_grounding (hand-made twins with boxes, an untrained late matcher)
    bench.sampler           test_sampler
    bench.scale             test_scale (its caption lengths from a fabricated COCO captions file)
    bench.real_val          test_real_val (a tiny folder of generated photos in COCO caption format)
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, dump_params, make_tiny_features, tiny_config

pytestmark = pytest.mark.slow

RESULTS = REPO / "bench" / "results"


def run_bench(module: str, args: list[str], cwd: Path, shared: Path | None = None,
              timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m bench.<module> args`` from ``cwd``; asserts exit 0 (showing the output if not)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "CROSSALIGN_SHARED": str(shared if shared is not None else cwd / "no-shared"),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", f"bench.{module}", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, \
        f"bench.{module} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def positive(x) -> bool:
    return finite(x) and x > 0


@pytest.fixture(scope="module", autouse=True)
def results_untouched():
    """No script writes into the repo's bench/results/ while these tests run."""
    def snapshot():
        return {p.name: p.stat().st_mtime_ns for p in RESULTS.iterdir()} if RESULTS.exists() else {}
    before = snapshot()
    yield
    assert snapshot() == before, "a bench script wrote into bench/results/ during the tests"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A tiny project: params.yaml (CPU, 1 epoch, a 2-trial tune), data/features/{train,val,test}
    with binding negatives (train: one perturbed caption per caption) and eval/{val,test}_index.json."""
    from crossalign.features import hardneg
    from crossalign.io import load_features
    from eval_helpers import IMAGE_DIM, TEXT_DIM, write_split_features

    root = tmp_path_factory.mktemp("project")
    write_split_features(root)
    train = make_tiny_features(root / "data" / "features" / "train", n_images=32, image_dim=IMAGE_DIM,
                               text_dim=TEXT_DIM)
    feats = load_features(train)
    m = feats.n_captions
    tokens, lengths = feats.text.gather()  # perturbed = the real states reversed
    hardneg.write(train, twin_row=np.arange(32) ^ 1,
                  tokens=np.concatenate([t[:n][::-1] for t, n in zip(tokens, lengths)]),
                  offsets=feats.text.offsets(), pooled=np.asarray(feats.text_pooled), source=np.arange(m),
                  kind=np.zeros(m, np.int8), per_caption=1)
    cfg = tiny_config(root, train={"epochs": 1, "val_images": 16},
                      tune={"trials": 2, "epochs": 1, "pruner_startup_trials": 1, "threads": 1})
    (root / "params.yaml").write_text(dump_params(cfg))
    return root


# ------------------------------------------------------------------ stage benchmarks
def test_preprocess(tmp_path: Path, coco_sample: Path):
    out = tmp_path / "preprocess.json"
    done = run_bench("preprocess", ["--repeat", 1, "--trials", 1, "--workers", 1, "--out", out], tmp_path,
                     shared=coco_sample.parent)
    r = json.loads(out.read_text())
    assert r["images"] == 80 and r["captions"] == 400 and r["trials"] == 1
    assert set(r["rows"]) == {"article", "article_1thread", "article_pool", "ours", "ours_stage_end_to_end"}
    assert all(positive(row["images_per_s"]) for row in r["rows"].values())
    assert positive(r["rows"]["ours"]["captions_per_s"]) and positive(r["rows"]["article"]["captions_per_s"])
    assert positive(r["speedup_images"]) and positive(r["speedup_captions"])
    c = r["content"]
    assert c["images"] == 80
    assert 0 <= c["mad_vs_full_decode"] <= c["mad_vs_full_decode_worst_image"] <= 255
    assert c["mad_vs_full_decode"] <= 2.0  # the draft decode stays within 2 grey levels of a full decode
    assert finite(c["mad_vs_article_pixels"]) and isinstance(r["target"]["met"], bool)
    assert "speed-up vs article" in done.stdout and f"wrote {out}" in done.stdout


def test_features(tmp_path: Path):
    out = tmp_path / "features.json"
    done = run_bench("features", ["--images", 2, "--captions", 3, "--batch-sizes", 2, "--text-batch", 2,
                                  "--naive-images", 1, "--naive-captions", 1, "--rss-sizes", 2, "--trials", 1,
                                  "--threads", 1, "--out", out], tmp_path)
    r = json.loads(out.read_text())
    assert r["inputs"] == "random images (coco-sample absent)" and r["image_size"] == 224
    assert set(r["images"]) == {"naive_per_image_fp32", "ours_batch2"}
    assert set(r["captions"]) == {"naive_per_caption_fp32", "ours_batch2"}
    assert r["images"]["ours_batch2"]["n"] == 2 and r["captions"]["ours_batch2"]["n"] == 3
    for row in [*r["images"].values(), *r["captions"].values()]:
        assert positive(row["seconds"]) and positive(row["per_s"]) and positive(row["speedup_vs_naive"])
    (rss,) = r["peak_rss"]  # one --rss-sizes value: one child encoding a 2-image split from disk
    assert (rss["images"], rss["captions"], rss["batch"]) == (2, 10, 2)
    assert 0 < rss["rss_after_models_mb"] <= rss["peak_rss_mb"]
    assert f"wrote {out}" in done.stdout


def test_train(tmp_path: Path):
    from crossalign.config import METHOD_NAMES

    params, out = tmp_path / "params.yaml", tmp_path / "train.json"
    params.write_text(dump_params(tiny_config(tmp_path, train={"val_images": 4})))
    run_bench("train", ["--params", params, "--max-steps", 1, "--n-train", 4, "--n-val", 4, "--threads", 1,
                        "--out", out], tmp_path)
    r = json.loads(out.read_text())
    assert r["n_train_pairs"] == 20 and r["n_val"] == [4, 20] and r["batch_size"] == 16
    assert [row["method"] for row in r["methods"]] == list(METHOD_NAMES)
    for row in r["methods"]:
        assert row["steps_timed"] == 1 and row["params"] > 0
        assert positive(row["pairs_per_s"]) and finite(row["val_scoring_s"]) and row["val_scoring_s"] >= 0
        assert abs(row["epoch_train_s"] - 16 / row["pairs_per_s"]) <= 0.006  # an epoch (1 step of 16) at that rate
        assert abs(row["epoch_total_s"] - row["epoch_train_s"] - row["val_scoring_s"]) <= 0.011


def test_evaluate(tmp_path: Path):
    out = tmp_path / "evaluate.json"
    # blocks smaller than the gallery: all_pairs tiles it, and the script asserts every loop ranks alike
    run_bench("evaluate", ["--images", 4, "--captions-per-image", 2, "--block-images", 3, "--block-texts", 5,
                           "--trials", 1, "--pair-loop-images", 1, "--threads", 1, "--out", out], tmp_path)
    r = json.loads(out.read_text())
    assert (r["images"], r["captions"], r["pairs"], r["blocks"]) == (4, 8, 32, [3, 5])
    assert r["rankings_equal"] is True
    assert set(r["results"]) == {"all_pairs", "query_loop", "albef_loop", "pair_loop"}
    for name, row in r["results"].items():
        assert positive(row["seconds"]) and positive(row["pairs_per_s"])
        assert 0 <= row["max_abs_diff_vs_all_pairs"] < 1e-3
        assert name == "all_pairs" or positive(row["all_pairs_speedup"])


def test_placement_speed(tmp_path: Path):
    params = tmp_path / "params.yaml"
    params.write_text(dump_params(tiny_config(tmp_path)))
    done = run_bench("placement_speed", [1, "--n-train", 32, "--params", params], tmp_path)
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(r) == {"concat_mlp", "cross_attention", "contrastive", "joint"}
    for row in r.values():
        assert positive(row["old_step_s"]) and positive(row["new_step_s"]) and positive(row["new/old"])


# ------------------------------------------------------------------ binding and recipe benchmarks
def probe_cells_ok(cells: dict, kinds: set[str]) -> None:
    """``bench.binding``'s probe cells: kind -> [i2t, t2i, mean, [lo, hi]], percentages."""
    assert set(cells) == {"overall", *kinds}
    for i2t, t2i, mean, (lo, hi) in cells.values():
        assert all(0 <= v <= 100 for v in (i2t, t2i, mean, lo, hi)) and lo <= mean <= hi


def test_binding(project: Path):
    done = run_bench("binding", ["--method", "contrastive", "--root", project, "--max-steps", 2], project)
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert (r["method"], r["split"], r["epochs"], r["threads"]) == ("contrastive", "val", 1, 1)
    assert not any("test" in key for key in r)  # val only without --final
    assert 0 < r["val_rsum"] <= 600 and 0 < r["early_stopping_val_rsum"] <= 600 and r["params"] > 0
    probe_cells_ok(r["binding"], {"size", "colour"})  # the twin kinds of the tiny eval/val_index.json


def test_binding_ablation(project: Path, tmp_path: Path):
    out = tmp_path / "ablation.json"
    done = run_bench("binding_ablation", ["--params", project / "params.yaml", "--root", project,
                                          "--methods", "contrastive", "--grid", "steps", "--out", out], project)
    runs = json.loads(out.read_text())["runs"]
    assert [run["label"] for run in runs] == ["none", "all", "+positions", "+twin", "+caption"]
    for run in runs:
        assert run["method"] == "contrastive" and run["split"] == "val" and 0 < run["val_rsum"] <= 600
        assert run["probe"]["overall"]["pairs"] == 7 and finite(run["probe"]["overall"]["mean"])
    all_on = runs[1]["setting"]
    assert all_on == {"image_positions": "sincos", "twin_negatives": True, "caption_negatives": 1}
    table = done.stdout.strip().splitlines()[-7:]  # the final table: header, rule, five rows
    assert table[0].endswith("| val RSUM |") and len([line for line in table if "| contrastive |" in line]) == 5


def test_cell_probe(tmp_path: Path):
    """Objects whose grid cell holds their colour (one-hot) and noise otherwise: the probe reads
    colour from the cell (shape and size are noise there)."""
    rng = np.random.default_rng(0)
    colours, shapes, sizes = ("red", "green", "blue", "yellow"), ("circle", "square"), ("small", "large")
    for split, n in (("train", 48), ("val", 16)):
        feat = tmp_path / "data" / "features" / split
        feat.mkdir(parents=True)
        tokens = rng.normal(scale=0.1, size=(n, 4, 8)).astype(np.float16)  # 2x2 grid, 8 dims
        images = []
        for i in range(n):
            objects = []
            for cell in rng.choice(4, size=2, replace=False):
                c = int(rng.integers(4))
                tokens[i, cell, c] += 1.0
                row, col = divmod(int(cell), 2)
                objects.append({"bbox": [col * 32 + 8, row * 32 + 8, 16, 16], "colour": colours[c],
                                "shape": str(rng.choice(shapes)), "size": str(rng.choice(sizes))})
            images.append({"id": 100 + i, "file_name": f"{i}.png", "objects": objects})
        np.save(feat / "image_tokens.npy", tokens)
        np.save(feat / "image_ids.npy", np.arange(100, 100 + n))
        (feat / "meta.json").write_text(json.dumps({"image_encoder": {"grid": [2, 2]}, "image_size": 64}))
        ann = tmp_path / "data" / "raw" / "synthetic" / "annotations" / f"captions_{split}.json"
        ann.parent.mkdir(parents=True, exist_ok=True)
        ann.write_text(json.dumps({"images": images, "annotations": []}))
    out = tmp_path / "cell_probe.json"
    run_bench("cell_probe", ["--root", tmp_path, "--out", out], tmp_path)
    r = json.loads(out.read_text())
    assert r["split"] == "val" and r["objects"] == {"train": 96, "val": 32}
    assert set(r["probe"]) == {"colour", "shape", "size"}
    for k, n_classes in (("colour", 4), ("shape", 2), ("size", 2)):
        p = r["probe"][k]
        assert p["classes"] == n_classes and set(p) == {"classes", "train_acc", "val_acc", "val_majority"}
        assert all(0 <= p[key] <= 100 for key in ("train_acc", "val_acc", "val_majority"))
    assert r["probe"]["colour"]["val_acc"] >= 90 > r["probe"]["colour"]["val_majority"] + 20


def write_captioned_scenes(root: Path, split: str, n: int, seed: int) -> list[tuple[str, int, str]]:
    """``n`` scenes (twin pairs: the focal objects' attributes swapped, as a position twin reads)
    with captions from the generator's caption code, in the synthetic annotations layout; returns
    (relation, template, subject named first or second) per caption, from the templates' wording
    (crossalign.data.captions.render: templates 1 and 7 name object 1 first; 4 names the left or
    top object first)."""
    from crossalign.data.captions import Described, plan_captions, render

    rng = np.random.default_rng(seed)
    colours, shapes = ["red", "green", "blue", "yellow", "purple"], ["circle", "square", "triangle", "star"]
    images, anns, truth = [], [], []
    for i in range(0, n, 2):
        cs, ss = rng.choice(colours, 3, replace=False), rng.choice(shapes, 3, replace=False)
        objects = [Described(str(c), str(s), str(rng.choice(["small", "large"]))) for c, s in zip(cs, ss)]
        rel = str(rng.choice(["left", "right", "above", "below"]))
        plans = plan_captions(rng, 5, always_sizes=False, size_prob=0.5, distractor_prob=0.75)
        twin = [objects[1], objects[0], objects[2]]
        for k, scene in enumerate((objects, twin)):
            image_id = 1000 * seed + i + k + 1
            images.append({"id": image_id, "twin_id": image_id + (1 if k == 0 else -1), "relation": rel,
                           "objects": [{"colour": o.colour, "shape": o.shape, "size": o.size, "bbox": [0, 0, 1, 1]}
                                       for o in scene]})
            for plan in plans:
                anns.append({"id": len(anns) + 1, "image_id": image_id, "caption": render(plan, scene, rel)})
                first = rel in ("left", "above") if plan.template == 4 else plan.template not in (1, 7)
                truth.append((rel, plan.template, "first" if first else "second"))
    ann = root / "data" / "raw" / "synthetic" / "annotations" / f"captions_{split}.json"
    ann.parent.mkdir(parents=True, exist_ok=True)
    ann.write_text(json.dumps({"images": images, "annotations": anns}))
    return truth


def test_text_probe(tmp_path: Path):
    """Labels of a hand-written caption, then the script on 60 train / 20 val generated scenes
    (5 captions each) with the real frozen MiniLM: the subject noun's state knows whether it is
    named first, the relation word's state knows the subject's side, and the bag of words (every
    word, no order) cannot tell which noun is on which side."""
    from collections import Counter

    from bench.text_probe import INVERSE, read_captions

    hand = tmp_path / "hand"
    ann = hand / "data" / "raw" / "synthetic" / "annotations" / "captions_val.json"
    ann.parent.mkdir(parents=True)
    ann.write_text(json.dumps({"images": [{"id": 7, "twin_id": None, "relation": "left", "objects": [
        {"colour": "red", "shape": "circle", "size": "small"}, {"colour": "blue", "shape": "square", "size": "large"}]}],
        "annotations": [{"id": 1, "image_id": 7, "caption": "A blue square is right of a red circle."},
                        {"id": 2, "image_id": 7, "caption": "a red circle left of a square"}]}))
    caps = read_captions(hand, "val", None)
    text = "A blue square is right of a red circle."
    assert caps.texts == [text] and caps.skipped == {"focal pair not named once each": 1}
    assert (caps.subject, caps.side, caps.group) == (["second"], ["left"], [7])
    assert [text[a:b] for a, b in caps.nouns[0]] == ["circle", "square"]
    assert text[caps.relation_at[0]:].startswith("right of")

    truth = {split: write_captioned_scenes(tmp_path, split, n, seed)
             for split, n, seed in (("train", 60, 1), ("val", 20, 2))}
    out = tmp_path / "text_probe.json"
    done = run_bench("text_probe", ["--root", tmp_path, "--out", out, "--limit", 0, "--bootstrap", 200], tmp_path)
    r = json.loads(out.read_text())
    assert r["split"] == "val" and r["captions"] == {"train": 300, "val": 100} and r["images"] == {"train": 60, "val": 20}
    assert r["scene_groups"] == {"train": 30, "val": 10} and r["skipped"] == {"train": {}, "val": {}}

    def majority(ys) -> float:
        return round(100 * Counter(ys).most_common(1)[0][1] / len(ys), 1)

    val = truth["val"]
    assert r["chance"] == {"subject": majority([t[2] for t in val]), "side": majority([t[0] for t in val]),
                           "own_side": majority([t[0] for t in val] + [INVERSE[t[0]] for t in val])}
    assert [row["layer"] for row in r["layers"]] == list(range(7))  # embeddings + MiniLM's 6 layers
    cells = [r["bag_of_words"]] + [row[f] for row in r["layers"] for f in ("mean", "relation", "noun")]
    for cell in cells:
        for v in cell.values():
            assert 0 <= v["ci"][0] <= v["acc"] <= v["ci"][1] <= 100
    assert set(r["layers"][0]["noun"]) == {"subject", "side", "own_side"} and set(r["layers"][0]["mean"]) == {"subject", "side"}
    assert max(row["noun"]["subject"]["acc"] for row in r["layers"]) >= 90
    assert max(row["relation"]["side"]["acc"] for row in r["layers"]) >= r["chance"]["side"] + 25
    assert r["bag_of_words"]["own_side"]["acc"] <= 70
    assert len(done.stdout.strip().splitlines()) == 2 + 7 and done.stdout.splitlines()[-1].startswith("layer 6")


def test_recipe_val(project: Path, tmp_path: Path):
    out = tmp_path / "recipe.json"
    done = run_bench("recipe_val", ["--arms", "joint", "--epochs", 1, "--root", project, "--threads", 1,
                                    "--out", out], project)
    r = json.loads(out.read_text())
    assert r["split"] == "val"
    (run,) = r["runs"]
    assert (run["arm"], run["method"], run["set"], run["split"]) == ("joint", "joint", ["train.epochs=1"], "val")
    assert 0 < run["val_rsum"] <= 600 and run["best_epoch"] == 1
    probe_cells_ok(run["binding"], {"size", "colour"})
    for alpha in ("alpha_0.75", "alpha_1.0"):  # joint re-ranks: the fusion knob scored on the same weights
        assert 0 < run[alpha]["val_rsum"] <= 600
        probe_cells_ok({k: v for k, v in run[alpha].items() if k != "val_rsum"}, {"size", "colour"})
    assert done.stdout.startswith("joint") and "val RSUM" in done.stdout
    again = run_bench("recipe_val", ["--arms", "joint", "--epochs", 1, "--root", project, "--threads", 1,
                                     "--out", out], project)
    assert again.stdout == "" and json.loads(out.read_text())["runs"] == r["runs"]  # resumes: arm already done


def test_position(project: Path, tmp_path: Path):
    out = tmp_path / "position.json"
    arms = ["joint-before+relation+text-learned", "cross_attention-before", "joint-L3", "joint-LiT3"]
    done = run_bench("position", ["--arms", *arms, "--epochs", 1, "--max-steps", 2, "--fit-images", 16,
                                  "--root", project, "--out", out], project)
    runs = json.loads(out.read_text())["runs"]
    assert [r["arm"] for r in runs] == arms[:2]  # the tiny features are last-layer ones: joint-L3 needs others
    assert "joint-L3: skipped (no features at its features.text_token_layer" in done.stdout
    assert "joint-LiT3: skipped (no features at its features.text_token_layer and text_trainable_layers" in done.stdout
    for r in runs:
        assert r["split"] == "val" and not any(k.startswith("test") for k in r)  # val only without --final
        assert r["train_fit"]["images"] == 16 and 0 < r["train_fit"]["rsum"] <= 600
        probe_cells_ok({k: v for k, v in r["train_fit"].items() if k not in ("images", "rsum")}, {"twin"})
    scored = [k for k in runs[0] if k.startswith("val_alpha_")]
    assert len(scored) == 4  # joint: the shipped alpha, then 0, 0.5 and 1
    for k in scored:
        assert 0 < runs[0][k]["rsum"] <= 600
        probe_cells_ok({c: v for c, v in runs[0][k].items() if c != "rsum"}, {"size", "colour"})
    assert 0 < runs[1]["val"]["rsum"] <= 600 and "val_alpha_0.0" not in runs[1]  # no re-ranking: one score
    assert runs[0]["set"] == ["features.text_token_layer=-1", "methods.text_positions=learned",
                              "methods.relation_geometry=true", "train.epochs=1"]


def _grounding_project(root: Path) -> Path:
    """data/prepared/train (word pieces, records with boxes: images 0 and 1 are position twins whose
    records list their objects by place, 2 and 3 colour twins), data/features/train over a 2x2
    grid, and an untrained joint with the late matcher and relation geometry."""
    from transformers import AutoTokenizer

    from crossalign.features.encoders.text import resolve_source
    from crossalign.io import write_features
    from crossalign.methods import build_aligner, method_params, save_aligner

    red = {"colour": "red", "shape": "circle", "size": "small"}
    blue = {"colour": "blue", "shape": "square", "size": "large"}
    left, right = [10.0, 20.0, 20.0, 20.0], [40.0, 20.0, 20.0, 20.0]
    records = [{"id": 10, "twin_id": 11, "swap": "position", "objects": [{**red, "bbox": left}, {**blue, "bbox": right}]},
               {"id": 11, "twin_id": 10, "swap": "position", "objects": [{**blue, "bbox": left}, {**red, "bbox": right}]},
               {"id": 12, "twin_id": 13, "swap": "colour", "objects": [{**red, "bbox": left}, {**blue, "bbox": right}]},
               {"id": 13, "twin_id": 12, "swap": "colour", "objects": [{**blue, "shape": "circle", "bbox": left},
                                                                      {**red, "shape": "square", "bbox": right}]}]
    captions = ["a red circle left of a blue square", "a blue square right of a red circle",
                "a blue square left of a red circle", "a square and a square",
                "a red circle and a blue square", "a red circle", "a blue circle and a red square", "shapes"]
    ids = AutoTokenizer.from_pretrained(resolve_source("offline"))(captions)["input_ids"]
    prepared = root / "data" / "prepared" / "train"
    prepared.mkdir(parents=True)
    np.save(prepared / "tokens.npy", np.concatenate([np.asarray(x, np.int32) for x in ids]))
    np.save(prepared / "offsets.npy", np.cumsum([0] + [len(x) for x in ids]).astype(np.int64))
    (prepared / "images.json").write_text(json.dumps(records))
    (prepared / "meta.json").write_text(json.dumps({"image_size": 64}))
    rng = np.random.default_rng(0)
    lengths = np.array([len(x) for x in ids])
    tokens = rng.normal(size=(8, lengths.max(), 12)).astype(np.float32)
    tokens[np.arange(lengths.max())[None, :] >= lengths[:, None]] = 0
    write_features(root / "data" / "features" / "train", image_tokens=rng.normal(size=(4, 4, 10)),
                   image_pooled=rng.normal(size=(4, 10)), text_tokens=tokens, text_lengths=lengths,
                   text_pooled=rng.normal(size=(8, 12)), image_ids=np.arange(10, 14),
                   caption_image_index=np.repeat(np.arange(4), 2), caption_ids=np.arange(8), meta={})
    cfg = tiny_config(root, methods={"embed_dim": 8, "relation_geometry": True, "joint": {"matcher": "late"}})
    model = build_aligner(cfg, "joint", 10, 12)
    return save_aligner(model, root / "model", {"method": "joint", "image_dim": 10, "text_dim": 12,
                                                "methods": method_params(cfg, "joint")})


def test_grounding_pairs_objects_by_what_they_are():
    """A twin lists its objects by place: the red circle is object 0 of one record and object 1 of
    the other, and both moved; a pair is listed once, a colour twin not at all."""
    from bench.grounding import twin_pairs

    red, blue = {"colour": "red", "shape": "circle", "size": "small"}, {"colour": "blue", "shape": "square", "size": "large"}
    a, b = [10.0, 0, 20, 20], [40.0, 0, 20, 20]
    records = [{"id": 1, "twin_id": 2, "swap": "position", "objects": [{**red, "bbox": a}, {**blue, "bbox": b}]},
               {"id": 2, "twin_id": 1, "swap": "position", "objects": [{**blue, "bbox": a}, {**red, "bbox": b}]},
               {"id": 3, "twin_id": 4, "swap": "colour", "objects": [{**red, "bbox": a}]},
               {"id": 4, "twin_id": 3, "swap": "colour", "objects": [{**blue, "bbox": a}]}]
    assert twin_pairs(records, 4) == [(0, 1, [0, 1])]
    assert twin_pairs(records, 1) == []  # the twin lies beyond the first image


def test_grounding(tmp_path: Path):
    model = _grounding_project(tmp_path)
    out = tmp_path / "grounding.json"
    done = run_bench("grounding", ["--models", model, "--root", tmp_path, "--images", 4, "--out", out], tmp_path)
    (run,) = json.loads(out.read_text())["runs"]
    assert json.loads(done.stdout) == run
    # image 0's two captions name the circle and the square once each; image 1 is its twin
    assert (run["method"], run["split"], run["captions"], run["words"]) == ("joint", "train", 2, 4)
    for key in ("place_follows_object", "best_cell_follows_object", "best_cell_on_object", "two_words_same_cell",
                "offset_order", "geometry_prefers_image"):
        assert 0 <= run[key] <= 100, key
    assert 0 <= run["object_cell_rank"] <= 3 and 0 < run["place_entropy"] <= math.log(4) + 1e-6


def test_sampler(project: Path, tmp_path: Path):
    out = tmp_path / "sampler.json"
    run_bench("sampler", ["--methods", "contrastive", "--samplers", "tpe-1", "--seeds", 0, 1, "--root", project,
                          "--params", project / "params.yaml", "--threads", 1, "--out", out], project)
    r = json.loads(out.read_text())
    assert r["split"] == "val" and r["budget"] == {"trials": 2, "epochs": 1}
    studies = r["studies"]
    assert [(s["method"], s["sampler"], s["seed"]) for s in studies] == [("contrastive", "tpe-1", 0),
                                                                         ("contrastive", "tpe-1", 1)]
    for s in studies:
        assert len(s["trials"]) == 2 and 0 < s["defaults_val_rsum"] <= s["tuned_val_rsum"] <= 600
    assert studies[0]["defaults_val_rsum"] == studies[1]["defaults_val_rsum"]  # trial 0 replayed
    summary = r["summary"]["contrastive"]["tpe-1"]
    tuned = [s["tuned_val_rsum"] for s in studies]
    assert summary["min"] == round(min(tuned), 1) and summary["max"] == round(max(tuned), 1)
    assert finite(summary["mean"]) and finite(summary["std"]) and finite(summary["gain_over_defaults_mean"])


# ------------------------------------------------------------------ scale
def test_scale(tmp_path: Path):
    """The smallest Karpathy-shaped cache (11 train, 10 val/test images), trained with params.yaml's
    binding negatives on, so the cache must carry them as the features stage writes them, and
    evaluated as the evaluate stage does: val (a re-ranker's alpha grid) and test, each with the
    caption-swap probe on its perturbed captions."""
    from crossalign.features.perturb import perturb_all

    texts = ["a dog " + "and a cat " * (j % 7) for j in range(25)] + ["a dog on a red table " * (j + 1) for j in range(5)]
    captions = [{"id": j, "image_id": 1, "caption": text} for j, text in enumerate(texts)]
    perturbed = len(perturb_all(texts, 1)[0])
    assert 0 < perturbed < len(texts)  # some sample captions have a perturbation, some none
    sample = tmp_path / "captions.json"
    sample.write_text(json.dumps({"images": [{"id": 1}], "annotations": captions}))
    params, out, cache = tmp_path / "params.yaml", tmp_path / "scale.json", tmp_path / "cache"
    params.write_text(dump_params(tiny_config(tmp_path, train={"twin_negatives": True, "caption_negatives": 1},
                                              evaluate={"fusion_alphas": [0.0, 0.5, 1.0]})))
    done = run_bench("scale", ["--fraction", 0.0001, "--eval-fraction", 0.002, "--cache", cache, "--sample", sample,
                               "--params", params, "--methods", "contrastive", "cross_attention", "joint",
                               "--steps", 1, "--val-images", 4, "--pair-images", 4, "--out", out], tmp_path)
    r = json.loads(out.read_text())
    assert r["sizes"]["train"]["images"] == 11 and r["sizes"]["train"]["captions"] == 55
    assert r["sizes"]["test"]["images"] == 10 and r["sizes"]["test"]["captions"] == 50
    assert all(positive(s["disk_mb"]) for s in r["sizes"].values())
    for split in ("val", "test"):  # perturbed captions drawn at the sample's rate: some captions have none
        assert 0 < r["sizes"][split]["perturbed_captions"] < r["sizes"][split]["captions"]
    stages = {row["stage"]: row for row in r["stages"]}
    assert list(stages) == ["build cache", "train contrastive", "train cross_attention", "train joint",
                            "evaluate contrastive (val + test)", "evaluate joint (val + test)",
                            "evaluate cross_attention (first 4 val + test)"]
    for row in stages.values():
        assert positive(row["wall_s"]) and positive(row["peak_rss_mb"])
    for method in ("contrastive", "cross_attention", "joint"):
        row = stages[f"train {method}"]
        assert row["steps"] == 1 and row["pairs"] == 16 and positive(row["pairs_per_s"])
    for method in ("contrastive", "joint"):
        row = stages[f"evaluate {method} (val + test)"]
        assert row["ranked_pairs"] == 2 * 10 * 50  # val and test, all images
        for split in ("val", "test"):
            assert row[split]["images"] == 10 and row[split]["captions"] == 50
            assert row[split]["swap_probe_pairs"] == r["sizes"][split]["perturbed_captions"]
            assert row[split]["binding_probe_pairs"] == 5  # twins 0-1, 2-3, ..., 8-9
    assert "fusion" not in stages["evaluate contrastive (val + test)"]
    fusion = stages["evaluate joint (val + test)"]["fusion"]
    assert fusion["grid"] == [0.0, 0.5, 1.0] and fusion["alpha"] in fusion["grid"]
    pair = stages["evaluate cross_attention (first 4 val + test)"]
    assert pair["val"]["images"] == pair["test"]["images"] == 4 and positive(pair["ranked_pairs_per_s"])
    assert pair["ranked_pairs"] == 4 * pair["val"]["captions"] + 4 * pair["test"]["captions"]
    assert 0 < pair["test"]["swap_probe_pairs"] < r["sizes"]["test"]["perturbed_captions"]
    assert positive(pair["extrapolated_full_test_all_pairs_s"])
    assert list(cache.iterdir()) == [cache / "logs"]  # everything else removed without --keep
    assert "build cache" in done.stdout


# ------------------------------------------------------------------ real_val
def coco_folder(root: Path, sizes: dict[str, int]) -> Path:
    """A COCO-caption-format folder of small generated JPEGs, two captions each."""
    from PIL import Image

    rng = np.random.default_rng(0)
    words = ["a dog on a red couch", "two people walking near a lake", "a cat under a wooden table",
             "a man riding a blue bike", "children playing in the snow", "a bird above the water"]
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    next_id = 1
    for split, n in sizes.items():
        images, anns = [], []
        for _ in range(n):
            name = f"{next_id:04d}.jpg"
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(root / "images" / name)
            images.append({"id": next_id, "file_name": name, "width": 64, "height": 48})
            for k in range(2):
                anns.append({"id": 10 * next_id + k, "image_id": next_id,
                             "caption": words[(next_id + 3 * k) % len(words)]})
            next_id += 1
        (root / "annotations" / f"captions_{split}.json").write_text(
            json.dumps({"images": images, "annotations": anns}))
    return root


def test_real_val(tmp_path: Path):
    folder = coco_folder(tmp_path / "photos", {"train": 8, "val": 4, "test": 4})
    out, work = tmp_path / "real.json", tmp_path / "work"
    arms = ["contrastive", "joint-real"]
    done = run_bench("real_val", ["--arms", *arms, "--epochs", 1, "--folder", folder, "--work", work,
                                  "--alphas", 0.0, 1.0, "--out", out], tmp_path, timeout=600)
    r = json.loads(out.read_text())
    assert r["split"] == "val"
    assert [run["arm"] for run in r["runs"]] == arms
    plain, real = r["runs"]
    assert plain["set"] == ["train.epochs=1"] and plain["folder"] == "photos"
    profile = yaml.safe_load((REPO / "params-real.yaml").read_text())
    assert "train.caption_negatives=%d" % profile["train"]["caption_negatives"] in real["set"]
    assert real["set"][-1] == "train.epochs=1"
    for run in r["runs"]:
        assert 0 < run["val_rsum"] <= 600 and run["best_epoch"] == 1
    assert "by_alpha" not in plain and set(real["by_alpha"]) == {"0.0", "1.0"}
    assert all(0 < v <= 600 for v in real["by_alpha"].values())
    assert (work / "data/features/val/format.json").exists()  # --work keeps the features
    assert done.stdout.splitlines()[0].startswith("contrastive") and "val RSUM" in done.stdout
