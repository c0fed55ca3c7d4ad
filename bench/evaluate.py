"""Evaluation benchmark: exact all-pairs scoring of a pair scorer, against per-query loops.

Scorer: the real ``cross_attention`` method (``methods`` defaults: embed_dim 256, 4 heads,
1 layer), randomly initialised, on random features shaped like the offline encoders'
(image: 7x7 = 49 grid tokens of 1280 dims, EfficientNet-Lite0 at 224 px; text: 16 tokens of 384
dims, MiniLM). Every image is scored against every caption (5 per image), as the COCO
protocol needs for a method that only scores pairs.

- ``all_pairs`` (ours): :func:`crossalign.retrieval.scoring.score_states` -- states encoded once per
  image / caption, then ``match_block`` tiles of ``--block-images x --block-texts``.
- ``albef_loop`` (the reference): ALBEF's ``evaluation()`` in ``Retrieval.py`` -- for each query
  image, its features repeated over a batch of ``k_test`` = 256 candidates and the fusion run on
  every (query, candidate) pair, so the query's cross-attention inputs are re-projected per pair.
- ``query_loop``: the same per-query loop over candidates, but reusing the encoded states (what
  the reference would do with cached states): isolates the batching gain.
- ``pair_loop``: the literal loop over candidates, one pair per call (timed on the first
  ``--pair-loop-images`` queries, seconds extrapolated).

The score matrices must give the same rankings (asserted, both directions): identical on CPU; on a
GPU, where batch shape changes float summation order, every rank must lie within the range that
a perturbation of the scores by the observed max difference allows (near-ties may swap). Reports
pairs/s, best of ``--trials`` after a warm-up, and the speed-up. Writes
``bench/results/evaluate.json`` (or ``--out``).

    python -m bench.evaluate                      # CPU, ~1 minute
    python -m bench.evaluate --device cuda --images 500 --pair-loop-images 1 --out bench/results/evaluate_cuda.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from bench import entry
from crossalign import config
from crossalign.methods import build_aligner
from crossalign.methods.base import Aligner, State, index_state
from crossalign.retrieval.protocol import i2t_ranks, t2i_ranks
from crossalign.retrieval.scoring import score_states

RESULTS = Path(__file__).resolve().parent / "results"
K_TEST = 256  # ALBEF's k_test: candidates per forward pass of one query


def inputs(n_images: int, per_image: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m = n_images * per_image
    lengths = torch.randint(6, 17, (m,), generator=g)  # (M,)
    mask = torch.arange(16)[None, :] < lengths[:, None]  # (M, 16)
    out = {"img_tok": torch.randn(n_images, 49, 1280, generator=g), "img_pool": torch.randn(n_images, 1280, generator=g),
           "txt_tok": torch.randn(m, 16, 384, generator=g) * mask[..., None], "txt_mask": mask,
           "txt_pool": torch.randn(m, 384, generator=g)}
    return {k: v.to(device) for k, v in out.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def all_pairs(model: Aligner, x: dict, blocks: tuple[int, int]) -> np.ndarray:
    images = model.encode_images(x["img_tok"], x["img_pool"])
    texts = model.encode_texts(x["txt_tok"], x["txt_mask"], x["txt_pool"])
    return score_states(model, images, texts, *blocks)[0]


def query_loop(model: Aligner, x: dict, reencode: bool) -> np.ndarray:
    """For each image: score candidates K_TEST at a time (ALBEF); ``reencode`` re-projects the
    repeated query features per pair as the reference does."""
    texts: State = model.encode_texts(x["txt_tok"], x["txt_mask"], x["txt_pool"])
    images: State | None = None if reencode else model.encode_images(x["img_tok"], x["img_pool"])
    n, m = x["img_tok"].shape[0], x["txt_tok"].shape[0]
    out = torch.empty(n, m)
    for i in range(n):
        for s in range(0, m, K_TEST):
            cand = torch.arange(s, min(s + K_TEST, m), device=x["img_tok"].device)  # (k,)
            if reencode:
                query = model.encode_images(x["img_tok"][i].expand(len(cand), -1, -1),
                                            x["img_pool"][i].expand(len(cand), -1))  # (k, ...)
            else:
                query = index_state(images, torch.full_like(cand, i))  # (k, ...)
            out[i, s:s + len(cand)] = model.match(query, index_state(texts, cand)).float().cpu()
    return out.numpy()


def pair_loop(model: Aligner, x: dict, n_queries: int) -> np.ndarray:
    """The literal loop: one (image, caption) pair per call, for the first ``n_queries`` images."""
    texts: State = model.encode_texts(x["txt_tok"], x["txt_mask"], x["txt_pool"])
    images: State = model.encode_images(x["img_tok"][:n_queries], x["img_pool"][:n_queries])
    m = x["txt_tok"].shape[0]
    out = torch.empty(n_queries, m)
    for i in range(n_queries):
        for j in range(m):
            out[i, j] = model.match(index_state(images, slice(i, i + 1)), index_state(texts, slice(j, j + 1)))[0]
    return out.numpy()


def rank_brackets(scores: np.ndarray, caption_image: np.ndarray, tol: float) -> tuple[np.ndarray, ...]:
    """Per query, the range of ranks consistent with ``scores`` perturbed by at most ``tol``:
    (i2t low, i2t high, t2i low, t2i high). Rankings of two computations of the same function
    agree when each one's ranks lie in the other's brackets (float summation order differs
    between batch shapes on a GPU, which can swap near-ties)."""
    n, m = scores.shape
    false = caption_image[None, :] != np.arange(n)[:, None]  # (N, M)
    best = np.where(~false, scores, -np.inf).max(1)[:, None]  # (N, 1)
    i_lo, i_hi = (false & (scores > best + tol)).sum(1), (false & (scores >= best - tol)).sum(1)
    true = scores[caption_image, np.arange(m)][None, :]  # (1, M)
    t_lo, t_hi = (false & (scores > true + tol)).sum(0), (false & (scores >= true - tol)).sum(0)
    return i_lo, i_hi, t_lo, t_hi


def same_rankings(scores: np.ndarray, reference: np.ndarray, caption_image: np.ndarray) -> tuple[bool, int, float]:
    """(rankings agree up to float noise, queries whose rank differs exactly, max |diff|)."""
    diff = float(np.abs(scores - reference).max())
    ranks = np.concatenate([i2t_ranks(scores, caption_image), t2i_ranks(scores, caption_image)])
    ref = np.concatenate([i2t_ranks(reference, caption_image), t2i_ranks(reference, caption_image)])
    i_lo, i_hi, t_lo, t_hi = rank_brackets(reference, caption_image, 2 * diff + 1e-7)
    lo, hi = np.concatenate([i_lo, t_lo]), np.concatenate([i_hi, t_hi])
    return bool(diff < 1e-3 and ((ranks >= lo) & (ranks <= hi)).all()), int((ranks != ref).sum()), diff


def timed(fn, device: torch.device, trials: int) -> tuple[float, np.ndarray]:
    best, result = float("inf"), None
    for _ in range(trials):
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            result = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--block-images", type=int, default=256)
    p.add_argument("--block-texts", type=int, default=1024)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--pair-loop-images", type=int, default=2, help="query images of the one-pair-per-call loop (0: skip)")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_aligner(config.from_dict({}), "cross_attention", 1280, 384).eval().to(device)
    x = inputs(args.images, args.captions_per_image, device)
    caption_image = np.repeat(np.arange(args.images), args.captions_per_image)
    pairs = args.images * len(caption_image)
    with torch.inference_mode():  # warm-up (allocator, kernels)
        all_pairs(model, {k: v[:8] if k.startswith("img") else v[:40] for k, v in x.items()}, (8, 40))

    rows, reference = {}, None
    for name, fn in (("all_pairs", lambda: all_pairs(model, x, (args.block_images, args.block_texts))),
                     ("query_loop", lambda: query_loop(model, x, reencode=False)),
                     ("albef_loop", lambda: query_loop(model, x, reencode=True))):
        seconds, scores = timed(fn, device, args.trials)
        if reference is None:
            reference = (scores,)
        same, moved, diff = same_rankings(scores, reference[0], caption_image)
        assert same, f"{name}: rankings differ from all_pairs beyond float noise (max |diff| {diff:.2e})"
        rows[name] = {"seconds": seconds, "pairs_per_s": pairs / seconds, "max_abs_diff_vs_all_pairs": diff,
                      "queries_with_other_rank": moved}
    if args.pair_loop_images:  # too slow for every query: timed on the first images, compared there
        q = min(args.pair_loop_images, args.images)
        seconds, scores = timed(lambda: pair_loop(model, x, q), device, 1)
        ref = reference[0][:q]
        assert np.abs(scores - ref).max() < 1e-3, "pair_loop: scores differ from all_pairs beyond float noise"
        rows["pair_loop"] = {"seconds": seconds * args.images / q, "pairs_per_s": q * len(caption_image) / seconds,
                             "max_abs_diff_vs_all_pairs": float(np.abs(scores - ref).max()),
                             "note": f"timed on {q} query images, seconds extrapolated to all"}
    for name in rows:
        if name != "all_pairs":
            rows[name]["all_pairs_speedup"] = rows[name]["seconds"] / rows["all_pairs"]["seconds"]

    print(f"cross_attention scoring, {args.images} images x {len(caption_image)} captions = {pairs:,} pairs "
          f"on {device} ({torch.get_num_threads()} threads)")
    print(f"{'path':<12} {'seconds':>9} {'pairs/s':>12} {'all_pairs speed-up':>19} {'max |diff|':>11} {'rank moved':>10}")
    for name, r in rows.items():
        print(f"{name:<12} {r['seconds']:9.3f} {r['pairs_per_s']:12,.0f} "
              f"{r.get('all_pairs_speedup', 1.0):18.1f}x {r['max_abs_diff_vs_all_pairs']:11.2e} "
              f"{r.get('queries_with_other_rank', 0):10d}")
    result = {"benchmark": "evaluate: exact all-pairs scoring vs per-query loops (cross_attention)",
              "device": str(device), "torch": torch.__version__, "platform": platform.platform(),
              "threads": torch.get_num_threads(), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "images": args.images, "captions": len(caption_image), "pairs": pairs,
              "blocks": [args.block_images, args.block_texts], "k_test": K_TEST, "trials": args.trials,
              "rankings_equal": True, "results": rows}
    out = args.out or RESULTS / "evaluate.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    entry(main)
