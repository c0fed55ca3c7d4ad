"""What each method costs to train and to serve, for the report's "which method?" answer.

Two kinds of numbers, kept apart on purpose:

- **deterministic** (a function of the trained model and the test split's shapes): trainable
  parameters, how the method is served (from an embedding index, an index shortlist re-ranked by
  a matcher, or scoring every pair), the pair-scorer calls and the multiply-accumulates one text
  query costs against the test gallery (:func:`query_costs`). These go into the report, a DVC out.
- **measured** (depend on the machine and its load): training seconds per epoch, read from the
  MLflow runs that trained the models, and query latency, timed here with the evaluation's own
  ranking code. These go to ``costs/costs.{json,md}`` (git-ignored, no DVC out: two clones must
  get the same ``dvc.lock``) and to MLflow's ``select`` run.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossalign.tracking import registry
from crossalign.tracking import runs as tracking
from crossalign.config import Config
from crossalign.io import FeatureSplit, atomic_file
from crossalign.methods import load_aligner
from crossalign.evaluate.ensemble import Ensemble
from crossalign.methods.base import Aligner, State, index_state
from crossalign.methods.common import CrossEncoder, EmbeddingHead
from crossalign.methods.concat_mlp import ConcatMlp
from crossalign.methods.contrastive import Contrastive
from crossalign.methods.cross_attention import CrossAttention
from crossalign.methods.joint import Joint
from crossalign.methods.late import LateEncoder
from crossalign.methods.text_layers import WithTextLayers
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


def serving_kind(model: Aligner) -> str:
    """``index`` (embedding similarity only), ``shortlist`` (index top-k re-ranked by a matcher)
    or ``pairs`` (a matcher scores every gallery image): what :func:`serving` says in words."""
    if model.embeds:
        return "index" if model.rerank is None else "shortlist"
    return "pairs"


# ------------------------------------------------------------------ what one text query costs
@dataclass(frozen=True)
class QueryShape:
    """The shapes one text query is costed at: the gallery it ranks (``gallery`` images of
    ``regions`` tokens each, already encoded: the index) and the query caption's ``tokens``."""

    gallery: int
    regions: int
    tokens: int

    def text(self) -> str:
        return (f"{self.gallery:,} gallery images of {self.regions} image tokens, a query caption of "
                f"{self.tokens} tokens")


def query_shape(split: FeatureSplit) -> QueryShape:
    """The test split's shapes: every image is the gallery; the query caption has the split's mean
    caption length (token states kept per caption, rounded; at least 1)."""
    lengths = np.asarray(split.text_lengths)
    mean = float(lengths.mean()) if lengths.size else 1.0
    return QueryShape(gallery=split.n_images, regions=int(split.image_tokens.shape[1]),
                      tokens=max(1, math.floor(mean + 0.5)))


def _lin(layer: torch.nn.Linear) -> int:
    """Multiply-accumulates of one row through a linear layer."""
    return int(layer.in_features * layer.out_features)


def _head(head: EmbeddingHead) -> int:
    return _lin(head.proj.linear) + _lin(head.mlp[1])


def _embed_dim(model: Aligner) -> int:
    """Width of the similarity dot product (the embedding heads' output)."""
    return int(model.text_head.mlp[1].out_features)


def _encoder_text(enc: torch.nn.Module, length: int) -> int:
    """MACs of a matching encoder's caption side (``text_state``), once per query of ``length`` tokens."""
    if isinstance(enc, LateEncoder):
        blk, dim = enc.text, enc.text.out.out_features
        per_token = _lin(blk.qkv) + _lin(blk.out) + _lin(blk.mlp[0]) + _lin(blk.mlp[2]) + _lin(enc.weight)
        return length * per_token + 2 * length * length * dim  # + scores q.k and the weighted sum of values
    if isinstance(enc, CrossEncoder):
        return length * (_lin(enc.t2i[0].q) + sum(_lin(b.k) + _lin(b.v) for b in enc.i2t))
    raise TypeError(type(enc).__name__)


def _encoder_pair(enc: torch.nn.Module, length: int, regions: int) -> int:
    """MACs of scoring one (query, image) pair with a matching encoder (image side precomputed)."""
    if isinstance(enc, LateEncoder):
        return length * regions * enc.weight.in_features  # every token against every cell
    if isinstance(enc, CrossEncoder):
        macs = 0
        for side, (q_len, k_len) in ((enc.t2i, (length, regions)), (enc.i2t, (regions, length))):
            for layer, blk in enumerate(side):
                dim = blk.o.out_features
                macs += (q_len * _lin(blk.q) if layer else 0) + 2 * q_len * k_len * dim + q_len * _lin(blk.o)
        return macs + _lin(enc.head[0]) + _lin(enc.head[3])
    raise TypeError(type(enc).__name__)


def _text_side(model: Aligner, length: int) -> int:
    """MACs of encoding one query caption of ``length`` tokens with the method's text side."""
    if isinstance(model, WithTextLayers):  # the trained encoder layers run per query, then the method's side
        return model.text_layers.macs(length) + _text_side(model.inner, length)
    if isinstance(model, Ensemble):
        return _text_side(model.embedder, length) + _text_side(model.matcher, length)
    if isinstance(model, Contrastive):
        return _head(model.text_head)  # the pooled feature only
    if isinstance(model, ConcatMlp):
        return _lin(model.text_proj.linear) + model.dim * model.hidden.out_features  # + the text half of the MLP's first layer
    if isinstance(model, CrossAttention):
        return length * _lin(model.text_proj.linear) + _encoder_text(model.encoder, length)
    if isinstance(model, Joint):
        own = 0 if model.shared else length * _lin(model.match_text_proj[1])
        return length * _lin(model.text_proj.linear) + _head(model.text_head) + own + _encoder_text(model.encoder, length)
    raise TypeError(type(model).__name__)


def _pair(model: Aligner, length: int, regions: int) -> int:
    """MACs of one pair-scorer call (the gallery image's side precomputed in the index)."""
    if isinstance(model, WithTextLayers):
        return _pair(model.inner, length, regions)
    if isinstance(model, Ensemble):
        return _pair(model.matcher, length, regions)
    if isinstance(model, ConcatMlp):
        return _lin(model.out[2])  # the image and text halves of the first layer are per image / per query
    return _encoder_pair(model.encoder, length, regions)


def _similarity(model: Aligner) -> int:
    if isinstance(model, WithTextLayers):
        return _similarity(model.inner)
    return _embed_dim(model.embedder if isinstance(model, Ensemble) else model)


def query_costs(model: Aligner, shape: QueryShape) -> dict[str, int | None]:
    """What one text query costs against an already encoded gallery, from the module shapes:
    ``pairs`` (pair-scorer calls: 0 for an embedding index, the shortlist ``k`` for a re-ranker,
    every gallery image for a matcher) and ``macs`` (multiply-accumulates of the matrix products:
    linear layers, attention scores and values, similarities; element-wise work, norms, softmax,
    top-k and the image side, computed once per gallery image, are not counted; attention heads
    split the width and do not change the count). ``macs`` is None for a model of an unknown kind.
    """
    n, length, regions = shape.gallery, shape.tokens, shape.regions
    kind = serving_kind(model)
    pairs = {"index": 0, "pairs": n}.get(kind) if kind != "shortlist" else min(model.rerank.k, n)
    try:
        macs = _text_side(model, length)
        macs += n * _similarity(model) if kind != "pairs" else 0
        macs += pairs * _pair(model, length, regions) if pairs else 0
    except TypeError:  # a method this count does not know: said as unknown, never guessed
        macs = None
    return {"pairs": pairs, "macs": macs}


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
