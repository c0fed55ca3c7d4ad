"""Scale benchmark: COCO Karpathy-sized features through the real train and evaluate code.

Builds what the features stage writes, with COCO's shapes, through its writers
(:class:`crossalign.io.FeatureWriter`, :class:`crossalign.features.hardneg.NegTextWriter`):
Karpathy sizes 113,287 / 5,000 / 5,000 images (or ``--fraction`` of them), 5 captions per image
with a few 6s and 7s so the totals match Karpathy's (566,747 / 25,010 / 25,010 captions),
EfficientNet-Lite0 grids (49 x 1280) and MiniLM states (384), seeded random fp16 values; in every
split the binding negatives (twins 2k <-> 2k+1, an upper bound: COCO has none; the perturbed
captions) and ``eval/{val,test}_index.json``. Each caption copies a random ``../shared/coco-sample``
caption's token length (offline tokenizer) and its perturbations (``features.perturbations`` of
``--params``, :func:`crossalign.features.perturb.perturb_all`: how many, their lengths and kinds),
so the caption-swap probe scores as many pairs as on COCO. Then, each in its own subprocess:
``train`` for every method (``crossalign.train.stage.run`` capped at ``--steps`` steps, one epoch,
early-stopping validation on the first ``--val-images`` val images) and the ``evaluate`` stage
(``crossalign.evaluate.stage.run``: val, with a re-ranker's fusion alpha grid, then test, each
with the binding and caption-swap probes; 1K folds on 5K) for ``contrastive`` and ``joint`` on the
whole splits and for ``cross_attention`` on the first ``--pair-images`` val and test images, whose
rate gives the 5K all-pairs time by extrapolation. Per stage: wall time, peak RSS of the process
tree (psutil, sampled every 0.1 s), pairs/s; per split: disk used.

    python -m bench.scale --fraction 0.05            # quick check
    python -m bench.scale --cache /big/disk/scale-cache  # full Karpathy size (~22 GB of disk)

Writes ``bench/results/scale.json`` (or ``--out``); deletes the cache unless ``--keep``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from bench import coco_sample, entry, need
from crossalign.features.perturb import KINDS

KARPATHY = {"train": (113_287, 566_747), "val": (5_000, 25_010), "test": (5_000, 25_010)}  # images, captions
REGIONS, IMAGE_DIM, TEXT_DIM = 49, 1280, 384  # EfficientNet-Lite0 7x7 grid, MiniLM-L6
SAMPLE = coco_sample() / "annotations" / "captions_train2017.json"
METHODS = ("concat_mlp", "cross_attention", "contrastive", "joint")
EVALS = (("contrastive", 0), ("joint", 0), ("cross_attention", None))  # (method, images: 0 = all, None = --pair-images)
OUTPUTS = ("data", "models", "eval", "metrics", "plots", "mlruns")  # what the runs write under the cache


# ------------------------------------------------------------------------------------- build
@dataclass
class CaptionPool:
    """What a fabricated caption copies from a drawn sample caption: its token length and its
    perturbed captions (:func:`crossalign.features.perturb.perturb_all`, as the features stage
    makes them: their token lengths and kinds; many captions have none)."""

    lengths: np.ndarray  # (S,) tokens of each sample caption
    neg_offsets: np.ndarray  # (S + 1,) sample caption s's perturbations are rows neg_offsets[s]:neg_offsets[s+1]
    neg_lengths: np.ndarray  # (Q,) tokens of each perturbed sample caption
    neg_kind: np.ndarray  # (Q,) int8 kind code

    def draw(self, m: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``m`` captions -> (lengths (M,), perturbed captions' source rows (P,) ascending, lengths (P,), kinds (P,))."""
        pick = rng.integers(0, len(self.lengths), size=m)  # (M,) sample caption each copies
        first, counts = self.neg_offsets[pick], np.diff(self.neg_offsets)[pick]  # (M,), (M,)
        source = np.repeat(np.arange(m), counts)  # (P,)
        rows = first[source] + np.arange(source.size) - (np.cumsum(counts) - counts)[source]  # (P,) pool rows
        return self.lengths[pick], source, self.neg_lengths[rows], self.neg_kind[rows]


def caption_pool(sample: Path, per_caption: int) -> CaptionPool:
    """Token lengths ([CLS] + WordPiece + [SEP], offline tokenizer, max 128) of the sample captions
    and of their up to ``per_caption`` perturbations each (``features.perturbations``)."""
    from crossalign.features.perturb import perturb_all
    from crossalign.preprocess.tokenize import OFFLINE, load_tokenizer, tokenize

    captions = [a["caption"] for a in json.loads(sample.read_text())["annotations"]]
    tokenizer = load_tokenizer(OFFLINE)
    _, offsets = tokenize(tokenizer, captions, 128)
    texts, source, kind = perturb_all(captions, per_caption)
    neg_offsets = tokenize(tokenizer, texts, 128)[1] if texts else np.zeros(1, np.int64)
    return CaptionPool(np.diff(offsets), np.searchsorted(source, np.arange(len(captions) + 1)),
                       np.diff(neg_offsets), kind)


def captions_per_image(n: int, total: int, rng: np.random.Generator) -> np.ndarray:
    """5 per image, extras as 6th (and every tenth extra image a 7th) caption, summing to ``total``."""
    counts = np.full(n, 5, np.int64)
    extra = max(0, total - 5 * n)
    sevens = extra // 11
    chosen = rng.choice(n, size=min(n, extra - sevens), replace=False)
    counts[chosen] += 1
    counts[chosen[:sevens]] += 1
    return counts


def random_fp16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Seeded random finite fp16 in (-1, 1) (random bits with exponent bits masked; fast)."""
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    bits &= 0xBBFF  # clear exponent bits 14 and 10: |x| < 1, never inf / NaN
    return bits.view(np.float16)


def build(root: Path, fraction: float, seed: int, sample: Path = SAMPLE, eval_fraction: float | None = None,
          per_caption: int = 1, pair_images: int = 0, log=print) -> dict:
    """Write what the features stage writes, with COCO Karpathy shapes: ``root/data/features/
    {train,val,test}`` (features, binding negatives) and ``root/eval/{test,val}_index.json``
    -> sizes. ``pair_images`` (0: none): also a cache of the first that many val and test images
    under ``root/pairs-<n>/`` (:func:`write_subset`), for the pair scorer's evaluation."""
    from crossalign.io import FeatureWriter, atomic_dir, write_json

    pool = caption_pool(sample, per_caption)
    sizes = {}
    for s, (split, (n_full, m_full)) in enumerate(KARPATHY.items()):
        rng = np.random.default_rng(seed + s)
        share = fraction if split == "train" else (eval_fraction if eval_fraction is not None else min(1.0, 20 * fraction))
        n = max(10, round(n_full * share))
        counts = captions_per_image(n, round(m_full * n / n_full), rng)
        cap_img = np.repeat(np.arange(n), counts)  # (M,) ascending: an image's captions are consecutive
        m = cap_img.size
        lengths, neg_source, neg_lengths, neg_kind = pool.draw(m, rng)
        twin_row = np.arange(n) ^ 1  # binding twins 0<->1, 2<->3, ...
        twin_row[twin_row >= n] = -1
        with atomic_dir(root / "data" / "features" / split) as tmp:
            w = FeatureWriter(tmp, n, REGIONS, IMAGE_DIM, lengths, TEXT_DIM)
            for i in range(0, n, 512):
                b = min(512, n - i)
                w.write_images(i, random_fp16(rng, (b, REGIONS, IMAGE_DIM)), random_fp16(rng, (b, IMAGE_DIM)))
            for j in range(0, m, 4096):
                rows = np.arange(j, min(m, j + 4096))
                states = random_fp16(rng, (len(rows), int(lengths[rows].max()), TEXT_DIM))
                w.write_texts(rows, states, random_fp16(rng, (len(rows), TEXT_DIM)))
            write_negatives(tmp, neg_lengths, neg_source, neg_kind, twin_row, rng)
            w.close(np.arange(n) + 1, cap_img, np.arange(m) + 1,
                    {"split": split, "n_images": n, "n_captions": m, "image_dim": IMAGE_DIM, "text_dim": TEXT_DIM,
                     "regions": REGIONS, "synthetic": "bench/scale.py random fp16", "text_layout": "packed",
                     "max_length": int(lengths.max()), "n_text_tokens": int(lengths.sum()), "dtype": "float16",
                     "perturbations": {"kinds": list(KINDS), "per_caption": per_caption, "count": int(neg_source.size),
                                       "by_kind": {k: int((neg_kind == c).sum()) for c, k in enumerate(KINDS)},
                                       "captions_with_any": int(np.unique(neg_source).size)}})
        if split != "train":  # the features stage's eval/{test,val}_index.json
            write_json(root / "eval" / f"{split}_index.json", split_index(n, cap_img, twin_row))
        sizes[split] = {"images": n, "captions": int(m), "text_tokens": int(lengths.sum()),
                        "perturbed_captions": int(neg_source.size), "perturbed_tokens": int(neg_lengths.sum()),
                        "disk_mb": round(disk_bytes(root / "data" / "features" / split) / 2**20, 1)}
        log(f"built {split}: {sizes[split]}")
    if 0 < pair_images < min(sizes["val"]["images"], sizes["test"]["images"]):
        write_subset(root, subset_root(root, pair_images), pair_images)
        log(f"built the first {pair_images} val and test images: {subset_root(root, pair_images)}")
    return sizes


def write_negatives(split_dir: Path, lengths: np.ndarray, source: np.ndarray, kind: np.ndarray,
                    twin_row: np.ndarray, rng: np.random.Generator) -> None:
    """The binding negatives the features stage writes beside the features (crossalign.features.hardneg):
    ``twin_row`` and the perturbed captions (``lengths``, ``source`` rows, ``kind`` codes), random fp16 states."""
    from crossalign.features.hardneg import NegTextWriter

    w = NegTextWriter(split_dir, lengths, TEXT_DIM)
    for j in range(0, len(lengths), 4096):
        rows = np.arange(j, min(len(lengths), j + 4096))
        w.write_texts(rows, random_fp16(rng, (len(rows), int(lengths[rows].max()), TEXT_DIM)),
                      random_fp16(rng, (len(rows), TEXT_DIM)))
    w.close(source, kind, twin_row)


def split_index(n: int, cap_img: np.ndarray, twin_row: np.ndarray) -> dict:
    """``eval/<split>_index.json`` as the features stage writes it (image ids are rows + 1)."""
    twins = [{"image": r, "twin": int(t), "swap": KINDS[(r // 2) % len(KINDS)]} for r, t in enumerate(twin_row) if t >= 0]
    return {"image_ids": (np.arange(n) + 1).tolist(), "caption_image_ids": (cap_img + 1).tolist(),
            "captions": [f"synthetic caption {j}" for j in range(cap_img.size)], "twins": twins}


def subset_root(root: Path, n: int) -> Path:
    return root / f"pairs-{n}"


def write_subset(root: Path, dst: Path, n: int) -> None:
    """``dst``: a project whose val and test splits are the first ``n`` images of ``root``'s (and
    their captions and perturbed captions), with their indexes, for ``evaluate`` on a subset."""
    from crossalign.features import hardneg
    from crossalign.io import load_features, write_features, write_json

    for split in ("val", "test"):
        full = load_features(root / "data" / "features" / split)
        cap_img = np.asarray(full.caption_image_index)
        m = int(np.searchsorted(cap_img, n))  # captions are in image order (build)
        offsets = full.text.offsets()[:m + 1]
        write_features(dst / "data" / "features" / split, image_tokens=full.image_tokens[:n],
                       image_pooled=full.image_pooled[:n], text_tokens=full.text.tokens[:offsets[-1]],
                       text_pooled=full.text_pooled[:m], image_ids=full.image_ids[:n], caption_image_index=cap_img[:m],
                       caption_ids=full.caption_ids[:m], meta={**full.meta, "n_images": n, "n_captions": m},
                       text_offsets=offsets)
        negs = hardneg.load(full.root)
        p = int(np.searchsorted(negs.source, m))
        twin_row = np.where(negs.twin_row[:n] < n, negs.twin_row[:n], -1)
        hardneg.write(dst / "data" / "features" / split, twin_row=twin_row, tokens=negs.tokens[:negs.offsets[p]],
                      offsets=negs.offsets[:p + 1], pooled=negs.pooled[:p], source=negs.source[:p],
                      kind=negs.kind[:p], per_caption=negs.per_caption, kinds=negs.kinds)
        write_json(dst / "eval" / f"{split}_index.json", split_index(n, cap_img[:m], twin_row))


def disk_bytes(path: Path) -> int:
    """Allocated bytes of the files under ``path``."""
    return sum(os.stat(Path(d) / f).st_blocks * 512 for d, _, files in os.walk(path) for f in files)


# ------------------------------------------------------------------------------------ stages
def bench_config(params: Path, val_images: int, placement: str):
    from crossalign import config

    cfg = config.load(params)
    raw = cfg.model_dump(mode="json")
    raw["train"].update(epochs=1, seeds=[0], val_images=val_images, device="cpu", placement=placement)
    raw["evaluate"].update(device="cpu")
    return config.from_dict(raw, f"{params} + bench/scale.py overrides")


def stage_train(args: argparse.Namespace) -> dict:
    """The real training run for ``--steps`` steps. The loop's pairs/s excludes setup and the
    epoch's validation (timed by wrapping ``training.validation_metrics`` in this process)."""
    from crossalign.train import stage as training

    cfg = bench_config(args.params, args.val_images, args.placement)
    marks: list[tuple[float, str]] = []
    val_s = [0.0]
    validate = training.validation_metrics

    def timed_validation(*a, **k):
        v0 = time.perf_counter()
        try:
            return validate(*a, **k)
        finally:
            val_s[0] += time.perf_counter() - v0

    training.validation_metrics = timed_validation
    start = time.perf_counter()
    training.run(cfg, args.root, args.method, log=lambda msg: marks.append((time.perf_counter(), str(msg))),
                 max_steps=args.steps)
    total = time.perf_counter() - start
    placed, placement = next((t, msg) for t, msg in marks if "placement" in msg)
    epoch_end = next(t for t, msg in marks if "epoch 1" in msg)
    loop_s = max(epoch_end - placed - val_s[0], 1e-9)
    pairs = args.steps * cfg.train.batch_size
    return {"placement": placement.split(": ", 1)[1], "steps": args.steps, "pairs": pairs,
            "loop_s": round(loop_s, 2), "pairs_per_s": round(pairs / loop_s, 1), "setup_s": round(placed - start, 2),
            "val_s": round(val_s[0], 2), "run_s": round(total, 2)}


def stage_evaluate(args: argparse.Namespace) -> dict:
    """The ``evaluate`` stage (``crossalign.evaluate.stage.run``: val with the fusion alpha grid of a
    re-ranking method and the probes, then test at the chosen alpha with the probes, 1K folds on a
    5K split) on the cache, or with ``--images`` on the project of the first that many val and test
    images that ``build`` wrote. Its outputs go under that project's ``eval/``; no tracking store
    (the bench trains without one, so nothing is logged to MLflow)."""
    import logging

    from crossalign.evaluate import stage as evaluation

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = bench_config(args.params, args.val_images, args.placement)
    root = args.root
    if args.images:
        root = subset_root(args.root, args.images)
        link = root / "models" / args.method
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to((args.root / "models" / args.method).resolve(), target_is_directory=True)
    start = time.perf_counter()
    result = evaluation.run(cfg, args.method, root, metrics_file=False)
    seconds = time.perf_counter() - start
    out = {"seconds": round(seconds, 2)}
    pairs = 0
    for split in ("val", "test"):  # a timing: no recall (random features)
        r = result[split]
        n, m = int(r["n_images"]), int(r["n_captions"])
        pairs += n * m
        swap = r.get("swap_probe", {}).get("overall", {})
        out[split] = {"images": n, "captions": m, "swap_probe_pairs": swap.get("pairs", 0),
                      "binding_probe_pairs": r.get("binding_probe", {}).get("overall", {}).get("pairs", 0)}
    out.update(ranked_pairs=pairs, ranked_pairs_per_s=round(pairs / seconds, 1), folds_1k="1k" in result["test"])
    if "fusion" in result:
        out["fusion"] = {"grid": result["fusion"]["grid"], "alpha": result["fusion"]["alpha"]}
    return out


# ------------------------------------------------------------------------------------ driver
def run_child(argv: list[str], log_path: Path, time_limit: float | None = None) -> dict:
    """Run ``python -m bench.scale --child ...`` -> its result plus wall time and peak tree RSS.
    Past ``time_limit`` seconds the child is stopped; the row then holds the peak RSS so far and
    the scoring loops' first-block rates from its log (expected times, not measured ones)."""
    result_path = log_path.with_suffix(".json")
    cmd = [sys.executable, "-m", "bench.scale", *argv, "--result", str(result_path)]
    start = time.perf_counter()
    stopped = False
    with open(log_path, "w") as log_fh:
        proc = subprocess.Popen(cmd, stdout=log_fh, stderr=subprocess.STDOUT)
        root, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                peak = max(peak, rss)
            except psutil.Error:
                pass
            if time_limit and time.perf_counter() - start > time_limit:
                proc.kill()
                proc.wait()
                stopped = True
                break
            time.sleep(0.1)
    wall = time.perf_counter() - start
    row = {"wall_s": round(wall, 2), "peak_rss_mb": round(peak / 2**20, 1)}
    if stopped:
        rates = [line.split("crossalign.retrieval.scoring: ", 1)[1] for line in log_path.read_text().splitlines()
                 if "first block at" in line]
        return {**row, "stopped_after_s": round(wall, 1), "first_block_rates": rates}
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); log: {log_path}\n"
                           + "\n".join(log_path.read_text().splitlines()[-20:]))
    return {**json.loads(result_path.read_text()), **row}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fraction", type=float, default=1.0, help="share of Karpathy's train images")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "crossalign-scale-cache",
                        help="feature cache, outside the repo (default: crossalign-scale-cache in the system's "
                             "temporary folder; ~22 GB at full size)")
    parser.add_argument("--eval-fraction", type=float, help="share of the 5,000 val/test images "
                        "(default: 20x --fraction, at most 1)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--steps", type=int, default=100, help="training steps per method")
    parser.add_argument("--val-images", type=int, default=100, help="early-stopping validation images")
    parser.add_argument("--placement", default="auto", help="train.placement for the train stages")
    parser.add_argument("--pair-images", type=int, default=1000, help="val and test images the pair scorer "
                        "(cross_attention) is evaluated on, all pairs (1000 = a 1K fold's size); 5K time extrapolated "
                        "from its rate")
    parser.add_argument("--eval-limit", type=float, default=0, help="stop an evaluate stage after this many "
                        "seconds (0 = never); its row keeps the peak RSS so far and the expected times")
    parser.add_argument("--sample", type=Path, default=SAMPLE, help="COCO captions JSON: the caption lengths and "
                        "perturbations the fabricated captions copy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the cache afterwards")
    parser.add_argument("--out", type=Path, default=Path("bench/results/scale.json"))
    parser.add_argument("--child", choices=["build", "train", "evaluate"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        if args.child == "build":
            from crossalign import config

            per_caption = config.load(args.params).features.perturbations
            out = {"sizes": build(args.root, args.fraction, args.seed, args.sample, args.eval_fraction, per_caption,
                                  args.pair_images if "cross_attention" in args.methods else 0)}
        else:
            out = (stage_train if args.child == "train" else stage_evaluate)(args)
        args.result.write_text(json.dumps(out))
        return 0

    need(args.sample, "the COCO captions whose lengths the synthetic captions follow (--sample)")
    root = args.cache
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    common = ["--root", str(root), "--params", str(args.params), "--val-images", str(args.val_images),
              "--placement", args.placement]
    load_before = os.getloadavg()
    stages: list[dict] = []
    sizes: dict = {}

    def save() -> None:  # after every stage, so an interrupted run keeps what it measured
        vm = psutil.virtual_memory()
        result = {
            "command": "python -m bench.scale " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": {"cpus": os.cpu_count(), "ram_gb": round(vm.total / 2**30, 1),
                        "processor": platform.processor() or platform.machine(),
                        "load_average_before": [round(x, 2) for x in load_before],
                        "load_average_now": [round(x, 2) for x in os.getloadavg()]},
            "fraction": args.fraction, "steps": args.steps, "val_images": args.val_images, "sizes": sizes,
            "caption_length_source": str(args.sample),
            "disk_mb_total": round(sum(s["disk_mb"] for s in sizes.values()), 1), "stages": stages,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    try:
        built = run_child(["--child", "build", "--fraction", str(args.fraction), "--seed", str(args.seed),
                           "--sample", str(args.sample), "--pair-images", str(args.pair_images),
                           "--methods", *args.methods, *common,
                           *(["--eval-fraction", str(args.eval_fraction)] if args.eval_fraction is not None else [])],
                          logs / "build.log")
        sizes = built.pop("sizes")
        stages.append({"stage": "build cache", **built})
        save()
        print(f"cache: {json.dumps(sizes)}", flush=True)
        for method in args.methods:
            row = run_child(["--child", "train", "--method", method, "--steps", str(args.steps), *common],
                            logs / f"train-{method}.log")
            stages.append({"stage": f"train {method}", **row})
            save()
            print(stages[-1], flush=True)
        for method, images in EVALS:
            if method not in args.methods:
                continue
            if images is None:  # the pair scorer: on the first --pair-images images (all when there are fewer)
                images = args.pair_images if args.pair_images < min(sizes[s]["images"] for s in ("val", "test")) else 0
            row = run_child(["--child", "evaluate", "--method", method, "--images", str(images), *common],
                            logs / f"evaluate-{method}.log", args.eval_limit or None)
            if method == "cross_attention" and "ranked_pairs_per_s" in row:
                n, m = sizes["test"]["images"], sizes["test"]["captions"]
                row["extrapolated_full_test_all_pairs_s"] = round(n * m / row["ranked_pairs_per_s"], 0)
            stages.append({"stage": f"evaluate {method} ({f'first {images} ' if images else ''}val + test)", **row})
            save()
            print(stages[-1], flush=True)
    finally:
        if not args.keep:
            for name in [*OUTPUTS, subset_root(Path(), args.pair_images).name]:
                shutil.rmtree(root / name, ignore_errors=True)
    save()
    print(f"{'stage':<52}{'wall s':>9}{'peak RSS MB':>13}{'pairs/s':>11}")
    for row in stages:
        rate = row.get("pairs_per_s", row.get("ranked_pairs_per_s", "stopped" if "stopped_after_s" in row else ""))
        print(f"{row['stage']:<52}{row['wall_s']:>9.1f}{row['peak_rss_mb']:>13.0f}{rate!s:>11}")
    return 0


if __name__ == "__main__":
    entry(main)
