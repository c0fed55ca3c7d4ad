"""What each method costs to train and to serve, for the report's "which method?" answer.

Two kinds of numbers, kept apart on purpose:

- **deterministic** (a function of the trained model): trainable parameters and how the method
  is served (from an embedding index, an index shortlist re-ranked by a matcher, or scoring every
  pair). These go into the report, a DVC out.
- **measured** (depend on the machine and its load): training seconds per epoch, read from the
  MLflow runs that trained the models, and query latency, timed here with the evaluation's own
  ranking code. These go to ``costs/costs.{json,md}`` (git-ignored, no DVC out: two clones must
  get the same ``dvc.lock``) and to MLflow's ``select`` run.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossalign.tracking import registry
from crossalign.tracking import runs as tracking
from crossalign.config import Config
from crossalign.io import FeatureSplit, atomic_file
from crossalign.methods import load_aligner
from crossalign.methods.base import Aligner, State, index_state
from crossalign.retrieval.scoring import encode_images, encode_texts, score_states

COSTS_DIR = "costs"  # beside reports/, not inside it: reports/ is select's DVC out
QUERY_COUNTS = (1, 1000)  # text queries timed at once against the whole test gallery
REPEATS = {1: 20, 1000: 3}  # at most this many timed calls (median reported), after one warm-up query
BUDGET_S = 5.0  # ... and no new call once one count has taken this long (a matcher on 5K images is slow)
TOP = 10  # images returned per query (R@10 needs the top 10)
EPOCH_SECONDS = "epoch/seconds"  # the per-epoch wall-time metric the tracker logs (crossalign.tracking.runs)


def trainable_params(model: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def serving(model: Aligner) -> str:
    """How a text query is answered at scale: the index column of the cost table."""
    if model.embeds and model.rerank is None:
        return "yes: embedding index"
    if model.embeds:
        return f"shortlist: index top-{model.rerank.k}, then {model.rerank.k} matcher calls per query"
    return "no: the matcher scores every (query, image) pair"


@torch.inference_mode()
def rank_images(model: Aligner, gallery: State, queries: State, cfg: Config) -> torch.Tensor:
    """Top-``TOP`` gallery rows per text query -> (Q, TOP), ranked as evaluation ranks t2i.

    Methods that embed or match only use :func:`crossalign.retrieval.scoring.score_states` as is. A
    re-ranking method gets only the text->image half of its two-stage ranking (``score_states``
    would also re-rank image->text, which a text query does not need): each query's top-k images
    by similarity, re-scored by ``alpha * match + (1 - alpha) * similarity`` in chunks of
    ``evaluate.pair_chunk`` pairs, placed above every other image.
    """
    ev = cfg.evaluate
    if model.rerank is None:
        _, t2i_np = score_states(model, gallery, queries, ev.block_images, ev.block_texts, ev.pair_chunk)  # (N, Q)
        t2i = torch.from_numpy(t2i_np)
    else:
        sim = model.similarity(gallery, queries).float()  # (N, Q)
        k, alpha = min(model.rerank.k, sim.shape[0]), model.rerank.alpha
        ii = sim.topk(k, dim=0).indices.reshape(-1)  # (k*Q,) image rows, row-major over (k, Q)
        tt = torch.arange(sim.shape[1], device=sim.device).repeat(k)  # (k*Q,) query columns
        fused = torch.empty(ii.shape[0], device=sim.device)  # (k*Q,)
        for s in range(0, ii.shape[0], ev.pair_chunk):
            a, b = ii[s:s + ev.pair_chunk], tt[s:s + ev.pair_chunk]
            match = model.match(index_state(gallery, a), index_state(queries, b)).float()  # (p,)
            fused[s:s + ev.pair_chunk] = alpha * match + (1 - alpha) * sim[a, b]
        t2i = sim.clone()
        t2i[ii, tt] = fused - fused.min() + float(sim.max()) + 1.0  # the shortlist above every other image
    return t2i.topk(min(TOP, t2i.shape[0]), dim=0).indices.T.cpu()  # (Q, TOP)


def _first_captions(split: FeatureSplit, n: int) -> FeatureSplit:
    """The split with only its first ``n`` captions (the queries)."""
    return split.select_captions(np.arange(min(n, split.n_captions)))


def query_latency(model: Aligner, split: FeatureSplit, device: torch.device, cfg: Config) -> dict[str, dict]:
    """Median wall time (ms) to answer 1 and 1,000 text queries against every test image.

    The gallery is encoded once beforehand (it is the index); a timed call encodes the query
    captions' frozen features with the method's text side, scores them against the gallery and
    takes the top 10. The frozen text encoder (the same for every method) is not timed.
    """
    model = model.eval().to(device)
    gallery = encode_images(model, split, device)

    def timed(queries: FeatureSplit) -> float:
        start = time.perf_counter()
        rank_images(model, gallery, encode_texts(model, queries, device), cfg)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return 1000 * (time.perf_counter() - start)

    timed(_first_captions(split, 1))  # warm-up (lazy initialisation), not counted
    out = {}
    for n in QUERY_COUNTS:
        queries = _first_captions(split, min(n, split.n_captions))
        times: list[float] = []
        while len(times) < REPEATS[n] and (not times or sum(times) < 1000 * BUDGET_S):
            times.append(timed(queries))
        out[str(n)] = {"queries": queries.n_captions, "gallery_images": split.n_images,
                       "ms": statistics.median(times), "repeats": len(times)}
    return out


def _runs(client: Any, cfg: Config, root: Path, method: str, metrics: dict) -> list:
    """The MLflow runs that trained ``method``'s seeds: found by the sha256 of each seed's weights
    (``results.json``'s ``weights_sha256``, the tag the tracker sets), else the newest finished run
    per seed with the method/seed tags."""
    shas = metrics.get("weights_sha256") or {}
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        return []
    runs = []
    for seed in metrics.get("seeds", []):
        if shas.get(str(seed)):
            run = tracking.find_run(client, exp.experiment_id, method, int(seed), shas[str(seed)])
            if run is not None:
                runs.append(run)
            continue
        found = client.search_runs([exp.experiment_id], f"tags.`crossalign.method` = '{method}' and "
                                   f"tags.`crossalign.seed` = '{seed}' and attributes.status = 'FINISHED'",
                                   order_by=["attributes.start_time DESC"], max_results=1)
        runs.extend(found[:1])
    return runs


def train_seconds(cfg: Config, root: Path, method: str, metrics: dict) -> dict[str, Any] | None:
    """Mean training wall seconds per epoch over the method's seeds and epochs, from the per-epoch
    ``epoch/seconds`` metric of its MLflow runs; None when no run logged it."""
    with registry.using(cfg, root) as client:
        per_epoch, run_ids = [], []
        for run in _runs(client, cfg, root, method, metrics):
            keys = [k for k in run.data.metrics if k == EPOCH_SECONDS]
            if keys:
                per_epoch += [m.value for m in client.get_metric_history(run.info.run_id, keys[0])]
                run_ids.append(run.info.run_id)
    if not per_epoch:
        return None
    return {"s_per_epoch": float(np.mean(per_epoch)), "epochs": len(per_epoch), "mlflow_runs": run_ids}


def load_models(root: Path, metrics: dict[str, dict]) -> dict[str, Aligner]:
    """method -> the model whose test scores were kept (``scores_seed``), on the CPU, eval mode."""
    models = {}
    for m, x in metrics.items():
        seed = x.get("scores_seed", (x.get("seeds") or [0])[0])
        path = Path(root) / "models" / m / "final" / f"seed-{seed}"
        if not (path / "model.json").exists():
            raise FileNotFoundError(f"{path}/model.json: select measures each method's model, and "
                                    f"metrics/{m}.json names seed {seed}; has train@{m} run?")
        models[m] = load_aligner(path)[0]
    return models


def machine(device: torch.device) -> str:
    """The machine the latency was measured on, in words."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    load = ", load average %.1f when measured" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return f"{where}, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads{load}"


def measure(cfg: Config, root: Path, models: dict[str, Aligner], metrics: dict[str, dict],
            test: FeatureSplit, device: torch.device) -> dict[str, dict]:
    """method -> measured costs (training s/epoch, query latency) and the deterministic ones."""
    return {m: {"params": trainable_params(model), "serving": serving(model),
                "train": train_seconds(cfg, root, m, metrics[m]),
                "query_latency": query_latency(model, test, device, cfg)} for m, model in models.items()}


def markdown(costs: dict[str, dict], machine: str) -> str:
    lines = ["# Measured costs (not a DVC out: they depend on the machine)", "",
             f"Machine: {machine}. Training time from the MLflow runs that trained each model "
             "(per-epoch wall time, training and validation); query latency measured by `select`: "
             f"median of up to {REPEATS[1]} (1 query) / {REPEATS[1000]} (1,000 queries) timed calls after a warm-up "
             f"query (no new call once {BUDGET_S:.0f} s are spent; `costs.json` has each count), "
             "text queries ranked against every test image with the evaluation's ranking code (the frozen "
             "text encoder, shared by every method, is not timed).", "",
             "| method | trainable params | train s/epoch | 1 query (ms) | 1,000 queries (ms) | index-able |",
             "|---|---|---|---|---|---|"]
    for m, c in costs.items():
        train = f"{c['train']['s_per_epoch']:.1f}" if c["train"] else "not logged"
        lat = c["query_latency"]
        many = lat["1000"]
        n = "" if many["queries"] == 1000 else f" ({many['queries']} queries)"
        lines.append(f"| {m} | {c['params']:,} | {train} | {lat['1']['ms']:.2f} | {many['ms']:.1f}{n} | {c['serving']} |")
    return "\n".join(lines) + "\n"


def write(root: Path, costs: dict[str, dict], machine: str) -> list[Path]:
    """``costs/costs.json`` and ``costs/costs.md`` (atomic) -> their paths."""
    out = Path(root) / COSTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "costs.json") as fh:
        json.dump({"machine": machine, "methods": costs}, fh, indent=2)
        fh.write("\n")
    with atomic_file(out / "costs.md") as fh:
        fh.write(markdown(costs, machine))
    return [out / "costs.json", out / "costs.md"]


def mlflow_metrics(costs: dict[str, dict]) -> dict[str, float]:
    """Flat metric names for MLflow's ``select`` run."""
    out = {}
    for m, c in costs.items():
        if c["train"]:
            out[f"cost_{m}_train_s_per_epoch"] = c["train"]["s_per_epoch"]
        for n, lat in c["query_latency"].items():
            out[f"cost_{m}_query_{n}_ms"] = lat["ms"]
    return out
