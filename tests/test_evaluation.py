"""evaluate@<method> on tiny features with real (randomly initialised) method models."""
from __future__ import annotations

import mlflow
import numpy as np
import pytest
import torch

from conftest import tiny_config, dump_params
from crossalign.evaluate import stage as evaluation
from crossalign.tracking import registry
from crossalign.io import load_features, read_json, write_json
from crossalign.methods import load_aligner, save_aligner
from crossalign.retrieval.protocol import METRIC_KEYS
from crossalign.retrieval.scoring import score_matrices
from eval_helpers import run_of, save_model, write_split_features

torch.set_num_threads(1)


@pytest.mark.parametrize("method, protocol", [("contrastive", "embedding similarity"),
                                              ("cross_attention", "exact all-pairs (blocks 8x16)"),
                                              ("joint", "shortlist k=12 re-rank alpha=0.9"),
                                              ("concat_mlp", "exact all-pairs (blocks 8x16)")])
def test_evaluate_writes_metrics_scores_ranks(tmp_path, method, protocol):
    # joint: the matcher re-ranks a deep shortlist (12 of 32 captions, where true captions of this
    # untrained model lie), mostly by its own score: a wrong shortlist or fusion changes ranks.
    # evaluate.fusion_alphas [] is the fixed-alpha switch: joint ranks at its own fusion_alpha
    cfg = tiny_config(tmp_path, methods={"joint": {"fusion_alpha": 0.9, "shortlist_k": 12}},
                      evaluate={"fusion_alphas": []})
    write_split_features(tmp_path)
    path = save_model(cfg, tmp_path, method, 0, mlflow_run=False)
    if method == "joint":  # a freshly initialised matcher scores every pair about the same: spread it
        model, meta = load_aligner(path)
        with torch.no_grad():
            if hasattr(model.encoder, "head"):  # matcher: cross
                model.encoder.head[-1].weight.mul_(1000.0)
            else:  # matcher: late (the default): its logit scale
                model.encoder.log_scale.add_(float(np.log(1000.0)))
        save_aligner(model, path, meta)
    result = evaluation.run(cfg, method, tmp_path)

    assert read_json(evaluation.results_path(tmp_path, method)) == result and result["method"] == method
    assert read_json(tmp_path / "metrics" / f"{method}.json") == evaluation.metrics_summary(result)
    assert not (tmp_path / "mlruns").exists()  # trained without tracking: no store is created
    assert result["protocol"].startswith(protocol) and "full split" in result["protocol"]
    assert "fusion" not in result and "chosen on val" not in result["protocol"]  # fixed alpha: nothing chosen
    for split in ("val", "test"):
        assert set(METRIC_KEYS) <= set(result[split])
    # the written numbers against an independent computation: every pair scored on its own (no
    # blocks, no tiling), ranks counted by brute force, the re-rank and the probe written out here
    model, _ = load_aligner(path)
    test = load_features(tmp_path / "data" / "features" / "test")
    sim, match = _pairwise(model, test)  # (N, M) each; None where the method lacks it
    cap_img = np.asarray(test.caption_image_index)
    i2t_s, t2i_s = _brute_rank_scores(model, sim, match)
    r_i2t, r_t2i = _brute_ranks(i2t_s, t2i_s, cap_img)
    for name, want in (("test_i2t", r_i2t), ("test_t2i", r_t2i)):  # every query's rank, not only R@K
        np.testing.assert_array_equal(np.load(tmp_path / "eval" / method / "ranks" / "seed-0" / f"{name}.npy"), want)
    want = {f"{d}_r{k}": 100.0 * np.mean(r < k) for d, r in (("i2t", r_i2t), ("t2i", r_t2i)) for k in (1, 5, 10)}
    want["rsum"] = sum(want.values())
    assert {k: result["test"][k] for k in want} == pytest.approx(want, abs=1e-9)
    scores = np.load(tmp_path / "eval" / method / "test_scores.npy")
    assert scores.dtype == np.float32 and scores.shape == (16, 32)
    assert (tmp_path / "eval" / method / "test_scores_t2i.npy").exists() == (method == "joint")
    ranks = np.load(tmp_path / "eval" / method / "ranks" / "seed-0" / "test_t2i.npy")
    assert ranks.shape == (32,) and result["test"]["t2i_r1"] == pytest.approx(100 * (ranks < 1).mean())
    probe = result["test"]["binding_probe"]
    assert probe["overall"]["pairs"] == 8 and set(probe["per_swap"]) == {"colour", "position"}
    twins = read_json(tmp_path / "eval" / "test_index.json")["twins"]
    assert probe["overall"]["i2t"] == pytest.approx(_brute_probe(i2t_s, t2i_s, cap_img, twins)[0], abs=1e-9)
    assert probe["overall"]["t2i"] == pytest.approx(_brute_probe(i2t_s, t2i_s, cap_img, twins)[1], abs=1e-9)
    # the probe on val: val's own twins, scored on the val split (what a recipe choice may read)
    val = load_features(tmp_path / "data" / "features" / "val")
    v_sim, v_match = _pairwise(model, val)
    v_i2t_s, v_t2i_s = _brute_rank_scores(model, v_sim, v_match)
    v_twins = read_json(tmp_path / "eval" / "val_index.json")["twins"]
    v_probe = result["val"]["binding_probe"]
    assert v_probe["overall"]["pairs"] == 7 and set(v_probe["per_swap"]) == {"size", "colour"}
    want_val = _brute_probe(v_i2t_s, v_t2i_s, np.asarray(val.caption_image_index), v_twins)
    assert (v_probe["overall"]["i2t"], v_probe["overall"]["t2i"]) == pytest.approx(want_val, abs=1e-9)
    assert read_json(tmp_path / "metrics" / f"{method}.json")["val_bind"] == pytest.approx(sum(want_val) / 2, abs=0.006)


def _pairwise(model, split):
    """Similarity and match score of every (image, caption) pair, one pair per call."""
    from crossalign.retrieval.scoring import encode_images, encode_texts

    with torch.inference_mode():
        im, tx = encode_images(model, split, "cpu"), encode_texts(model, split, "cpu")
        n, m = split.n_images, split.n_captions
        one = lambda st, i: {k: v[i:i + 1] for k, v in st.items()}  # noqa: E731
        sim = np.array([[float(model.similarity(one(im, i), one(tx, j))[0, 0]) for j in range(m)]
                        for i in range(n)]) if model.embeds else None
        match = np.array([[float(model.match(one(im, i), one(tx, j))[0]) for j in range(m)]
                          for i in range(n)]) if model.matches else None
    return sim, match


def _brute_rank_scores(model, sim, match):
    """Per-direction ranking keys: higher ranks first. Re-rank (ALBEF): a query's top-k by
    similarity come first, ordered by alpha*match + (1-alpha)*sim; the rest follow by similarity."""
    if model.rerank is None:
        s = sim if model.embeds else match
        return s, s
    k, alpha = model.rerank.k, model.rerank.alpha
    fused = alpha * match + (1 - alpha) * sim
    lift = np.abs(fused).max() + np.abs(sim).max() + 1.0  # puts any shortlisted key above every other
    i2t, t2i = sim.copy(), sim.copy()
    for i in range(sim.shape[0]):
        top = np.argsort(-sim[i], kind="stable")[:k]
        i2t[i, top] = fused[i, top] + 2 * lift
    for j in range(sim.shape[1]):
        top = np.argsort(-sim[:, j], kind="stable")[:k]
        t2i[top, j] = fused[top, j] + 2 * lift
    return i2t, t2i


def _brute_ranks(i2t, t2i, cap_img):
    """0-based ranks by counting, ties against the query: i2t ranks an image's best true caption."""
    n, m = i2t.shape
    r_i2t = []
    for i in range(n):
        true = cap_img == i
        best = i2t[i, true].max()
        r_i2t.append(int((i2t[i] > best).sum() + ((i2t[i] == best) & ~true).sum()))
    r_t2i = [int((t2i[:, j] > t2i[cap_img[j], j]).sum() + (t2i[:, j] == t2i[cap_img[j], j]).sum() - 1)
             for j in range(m)]
    return np.array(r_i2t), np.array(r_t2i)


def _brute_probe(i2t, t2i, cap_img, twins):
    """Share of (true, twin) comparisons the true item wins (ties half), both sides of each pair."""
    wins = {"i2t": [], "t2i": []}
    for t in twins:
        for x, y in ((t["image"], t["twin"]), (t["twin"], t["image"])):
            for c in np.flatnonzero(cap_img == x):
                for d in np.flatnonzero(cap_img == y):
                    a, b = i2t[x, c], i2t[x, d]
                    wins["i2t"].append(1.0 if a > b else 0.5 if a == b else 0.0)
                a, b = t2i[x, c], t2i[y, c]
                wins["t2i"].append(1.0 if a > b else 0.5 if a == b else 0.0)
    return 100 * np.mean(wins["i2t"]), 100 * np.mean(wins["t2i"])


def test_several_seeds_mean_std_and_mlflow_logging(tmp_path):
    cfg = tiny_config(tmp_path, train={"seeds": [0, 1]})
    write_split_features(tmp_path)
    for seed in (0, 1):
        save_model(cfg, tmp_path, "contrastive", seed)
    result = evaluation.run(cfg, "contrastive", tmp_path)
    per = result["test"]["per_seed"]
    assert set(per) == {"0", "1"}
    assert result["test"]["rsum"] == pytest.approx((per["0"]["rsum"] + per["1"]["rsum"]) / 2)
    assert result["test"]["std"]["rsum"] == pytest.approx(abs(per["0"]["rsum"] - per["1"]["rsum"]) / 2 ** 0.5)  # ddof=1
    best = max((0, 1), key=lambda s: result["val"]["per_seed"][str(s)]["rsum"])
    assert result["scores_seed"] == best
    # the probe pools each twin pair's comparisons over the seeds: still 8 pairs (the CI's unit), and
    # with equal comparisons per seed the pooled rate is the mean of the seeds' rates
    probe, seeds = result["test"]["binding_probe"], [per[s]["binding_probe"] for s in ("0", "1")]
    assert probe["overall"]["pairs"] == seeds[0]["overall"]["pairs"] == 8
    assert probe["overall"]["i2t_comparisons"] == 2 * seeds[0]["overall"]["i2t_comparisons"]
    assert probe["overall"]["mean"] == pytest.approx((seeds[0]["overall"]["mean"] + seeds[1]["overall"]["mean"]) / 2)
    lo, hi = probe["overall"]["ci95"]["mean"]
    assert lo <= probe["overall"]["mean"] <= hi
    with registry.using(cfg, tmp_path) as client:
        run = client.get_run(run_of(cfg, tmp_path, "contrastive", 1))
    assert run.data.metrics["eval_test_rsum"] == pytest.approx(per["1"]["rsum"])
    assert mlflow.get_tracking_uri() != registry.tracking_uri(cfg, tmp_path)  # global URI restored


def test_val_score_matrices_are_freed_before_test_is_scored(tmp_path, monkeypatch):
    """At 5K a re-ranker's val i2t and t2i are 1 GB of float32: the stage must not hold them while
    it scores test (bench/scale.py measures the peak)."""
    cfg = tiny_config(tmp_path, methods={"joint": {"shortlist_k": 4}}, evaluate={"fusion_alphas": [0.0, 1.0]})
    write_split_features(tmp_path)
    save_model(cfg, tmp_path, "joint", 0, mlflow_run=False)
    scored, held = [], []
    real = evaluation.evaluate_split

    def recording(model, split, *args, **kwargs):
        held.append([(e.i2t is not None, e.t2i is not None) for e in scored])  # what earlier splits still hold
        scored.append(real(model, split, *args, **kwargs))
        return scored[-1]

    monkeypatch.setattr(evaluation, "evaluate_split", recording)
    result = evaluation.run(cfg, "joint", tmp_path)
    assert [e.metrics["n_images"] for e in scored] == [result["val"]["n_images"], result["test"]["n_images"]]
    assert held == [[], [(False, False)]]  # val's matrices gone when test is scored
    assert result["val"]["binding_probe"]["overall"]["pairs"] > 0  # read from them first
    assert np.load(tmp_path / "eval" / "joint" / "test_scores.npy").shape == (result["test"]["n_images"],
                                                                            result["test"]["n_captions"])


def test_missing_seed_and_mismatched_index_fail_clearly(tmp_path):
    cfg = tiny_config(tmp_path, train={"seeds": [0, 3]})
    write_split_features(tmp_path)
    save_model(cfg, tmp_path, "contrastive", 0, mlflow_run=False)
    with pytest.raises(FileNotFoundError, match="seed-3/model.json.*seed 3"):
        evaluation.run(cfg, "contrastive", tmp_path)
    index = read_json(tmp_path / "eval" / "test_index.json")
    index["image_ids"] = index["image_ids"][::-1]
    write_json(tmp_path / "eval" / "test_index.json", index)
    with pytest.raises(ValueError, match="test_index.json: image_ids"):
        evaluation.run(tiny_config(tmp_path), "contrastive", tmp_path)
    assert not (tmp_path / "metrics" / "contrastive.json").exists()  # nothing half-written


def test_model_without_a_run_is_evaluated_and_not_logged(tmp_path, caplog):
    cfg = tiny_config(tmp_path)
    write_split_features(tmp_path)
    save_model(cfg, tmp_path, "contrastive", 0)  # a run exists, but for other weights
    save_model(cfg, tmp_path, "contrastive", 0, mlflow_run=False, init_seed=7)
    result = evaluation.run(cfg, "contrastive", tmp_path)
    assert "no finished MLflow run with these weights" in caplog.text
    with registry.using(cfg, tmp_path) as client:
        (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert "eval_test_rsum" not in run.data.metrics
    assert read_json(evaluation.results_path(tmp_path, "contrastive")) == result  # the outputs are still written


def test_stage_entry_point_exits_2_with_the_reason(tmp_path, monkeypatch, capsys):
    from tasks import evaluate as stage

    (tmp_path / "params.yaml").write_text(dump_params(tiny_config(tmp_path)))
    monkeypatch.chdir(tmp_path)
    assert stage.main(["--method", "joint"]) == 2
    assert "data/features/val" in capsys.readouterr().err


def _fold_alone(split, rows: slice):
    """The fold as its own split: its images and only their captions (rows re-based)."""
    from crossalign.io import FeatureSplit

    cols = np.flatnonzero((split.caption_image_index >= rows.start) & (split.caption_image_index < rows.stop))
    sub = split.select_captions(cols)
    return FeatureSplit(root=split.root, meta=split.meta, image_tokens=split.image_tokens[rows],
                        image_pooled=split.image_pooled[rows], text=sub.text, text_pooled=sub.text_pooled,
                        image_ids=split.image_ids[rows], caption_image_index=sub.caption_image_index - rows.start,
                        caption_ids=sub.caption_ids)


@pytest.mark.parametrize("method", ["joint", "contrastive"])
def test_each_fold_equals_evaluating_that_fold_alone(tmp_path, monkeypatch, method):
    """The 1K numbers are the mean over folds of each fold evaluated as a split of its own. For the
    re-ranking method the shortlists must come from the fold: the old cut of the full matrices (a
    fold re-ranking only its members of the full top-k) gives other numbers here."""
    from conftest import make_tiny_features
    from crossalign.retrieval import protocol
    from crossalign.methods import build_aligner

    monkeypatch.setattr(protocol, "FOLD_IMAGES", 8)  # five folds of 8 images in a 40-image split
    # re-rank by the match score alone over a shortlist of 6 of a fold's 16 captions
    cfg = tiny_config(tmp_path, methods={"embed_dim": 16, "joint": {"heads": 2, "hard_k": 4, "shortlist_k": 6,
                                                                    "fusion_alpha": 1.0}})
    split = load_features(make_tiny_features(tmp_path / "split", n_images=40, seed=3))
    torch.manual_seed(0)
    model = build_aligner(cfg, method, split.image_dim, split.text_dim).eval()
    metrics, *_ = evaluation.evaluate_model(model, split, cfg, torch.device("cpu"))
    folds = protocol.fold_slices(40)
    alone = [evaluation.evaluate_model(model, _fold_alone(split, rows), cfg, torch.device("cpu"))[0] for rows in folds]
    for key in METRIC_KEYS:
        assert metrics["1k"][key] == pytest.approx(np.mean([a[key] for a in alone])), key
    if method == "joint":  # the old protocol (cut out of the full re-ranked matrices) differs
        i2t, t2i = score_matrices(model, split, "cpu", 8, 16)
        cut = protocol.coco_metrics(i2t, t2i, split.caption_image_index)[0]["1k"]
        assert cut["rsum"] != pytest.approx(metrics["1k"]["rsum"])


def test_registered_reranker_ranks_at_the_alpha_chosen_on_val(tmp_path):
    """joint trained with fusion_alpha 0.9, evaluated over the grid [0.25, 0.5]: its run gets a
    model ranking at the chosen alpha, select registers that one, and the champion loaded from the
    registry (what `crossalign search` and a served pyfunc use) ranks at it, same weights."""
    from crossalign.select import stage as selection
    from crossalign.select.search import load_champion

    cfg = tiny_config(tmp_path, methods={"joint": {"fusion_alpha": 0.9}}, evaluate={"fusion_alphas": [0.25, 0.5]})
    write_split_features(tmp_path)
    path = save_model(cfg, tmp_path, "joint", 0)  # with its training run (which registered version 1 at 0.9)
    result = evaluation.run(cfg, "joint", tmp_path)
    alpha = result["fusion"]["alpha"]
    name = {0.25: "model-alpha-0p25", 0.5: "model-alpha-0p5"}[alpha]  # MLflow refuses "." in a model name
    assert result["fusion"]["per_seed"]["0"]["mlflow_model"] == name
    evaluation.run(cfg, "joint", tmp_path)  # a rerun logs no second copy of that model

    candidate = selection._candidate(cfg, tmp_path, "joint", result)
    versions = registry.register_versions(cfg, tmp_path, {"joint": candidate})
    registry.set_champion(cfg, tmp_path, versions["joint"])
    champion, _ = load_champion(cfg, tmp_path)  # what `crossalign search` ranks with
    assert champion.rerank.alpha == alpha and champion.rerank.k == cfg.methods.joint.shortlist_k
    trained, _ = load_aligner(path)
    assert trained.rerank.alpha == 0.9  # the DVC out is untouched
    assert all(torch.equal(a, b) for a, b in zip(champion.state_dict().values(), trained.state_dict().values()))
    with registry.using(cfg, tmp_path) as client:
        version = client.get_model_version(cfg.tracking.registered_model, versions["joint"])
        assert version.tags["fusion_alpha"] == f"{alpha:.4f}" and "chosen on val" in version.description
        exp = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
        (run,) = client.search_runs([exp])
        assert run.info.status == "FINISHED" and run.data.metrics["eval_fusion_alpha"] == alpha
        assert len(registry.logged_model_ids(client, run.info.run_id, name)) == 1
    # registering again reuses that version
    assert registry.register_versions(cfg, tmp_path, {"joint": candidate}) == versions


@pytest.mark.parametrize("method", ["contrastive", "cross_attention"])
def test_train_twin_fit_scores_the_first_training_images_twins(tmp_path, method):
    """evaluate.fit_images: the binding probe on the twin pairs among the first N train images (the
    train features' twin_row.npy, kinds from the prepared train records), each pair once."""
    from conftest import make_tiny_features
    from eval_helpers import IMAGE_DIM, TEXT_DIM

    cfg = tiny_config(tmp_path, evaluate={"fit_images": 8})
    write_split_features(tmp_path)
    train_dir = make_tiny_features(tmp_path / "data" / "features" / "train", n_images=12, image_dim=IMAGE_DIM,
                                   text_dim=TEXT_DIM)  # twins: images 2k and 2k+1
    kinds = ["colour", "position", "size", "position", "colour", "size"]  # of pairs (0, 1), (2, 3), ...
    write_json(tmp_path / "data" / "prepared" / "train" / "images.json",
               [{"id": i, "swap": kinds[i // 2]} for i in range(12)])
    path = save_model(cfg, tmp_path, method, 0, mlflow_run=False)
    fit = evaluation.run(cfg, method, tmp_path)["train_fit"]
    assert (fit["images"], fit["captions"]) == (8, 16)
    probe = fit["binding_probe"]
    assert probe["overall"]["pairs"] == 4  # (0, 1), (2, 3), (4, 5), (6, 7): 8 and 9 lie beyond 8 images
    assert {k: v["pairs"] for k, v in probe["per_swap"].items()} == {"colour": 1, "position": 2, "size": 1}
    model, _ = load_aligner(path)
    train = load_features(train_dir)
    sim, match = _pairwise(model, train)  # every pair of the 12 images and 24 captions, one call each
    cap_img = np.asarray(train.caption_image_index)
    keep = np.flatnonzero(cap_img < 8)
    i2t_s, t2i_s = (s[:8][:, keep] for s in _brute_rank_scores(model, sim, match))
    twins = [{"image": 2 * k, "twin": 2 * k + 1} for k in range(4)]
    want = _brute_probe(i2t_s, t2i_s, cap_img[keep], twins)
    assert (probe["overall"]["i2t"], probe["overall"]["t2i"]) == pytest.approx(want, abs=1e-9)
    position = _brute_probe(i2t_s, t2i_s, cap_img[keep], [twins[1], twins[3]])
    assert (probe["per_swap"]["position"]["i2t"], probe["per_swap"]["position"]["t2i"]) == pytest.approx(position)
    none = evaluation.run(tiny_config(tmp_path, evaluate={"fit_images": 0}), method, tmp_path)
    assert "train_fit" not in none
