"""Scale benchmark: COCO Karpathy-sized features through the real train and evaluate code.

Builds a feature cache with COCO's shapes through :class:`crossalign.io.FeatureWriter` (the
features stage's writer): Karpathy sizes 113,287 / 5,000 / 5,000 images (or ``--fraction`` of
them), 5 captions per image with a few 6s and 7s so the totals match Karpathy's (566,747 /
25,010 / 25,010 captions), caption lengths drawn from the token lengths of the
``../shared/coco-sample`` captions under the project's offline tokenizer, EfficientNet-Lite0
grids (49 x 1280) and MiniLM states (384), seeded random fp16 values. Then, each in its own
subprocess: ``train`` for every method (``crossalign.train.stage.run`` capped at ``--steps`` steps,
one epoch, early-stopping validation on the first ``--val-images`` val images) and
``evaluate_model`` (``crossalign.evaluate.stage``) for ``contrastive`` and ``joint`` on the whole
test split (5K + the 1K folds) and for ``cross_attention`` on one 1K fold, whose rate gives the
5K all-pairs time by extrapolation. Per stage: wall time, peak RSS of the process tree (psutil,
sampled every 0.1 s), pairs/s; per split: disk used.

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
from pathlib import Path

import numpy as np
import psutil

from bench import coco_sample, entry, need
from crossalign.features.perturb import KINDS

KARPATHY = {"train": (113_287, 566_747), "val": (5_000, 25_010), "test": (5_000, 25_010)}  # images, captions
REGIONS, IMAGE_DIM, TEXT_DIM = 49, 1280, 384  # EfficientNet-Lite0 7x7 grid, MiniLM-L6
SAMPLE = coco_sample() / "annotations" / "captions_train2017.json"
METHODS = ("concat_mlp", "cross_attention", "contrastive", "joint")
EVALS = (("contrastive", 0), ("joint", 0), ("cross_attention", None))  # (method, test images: 0 = all, None = --pair-images)


# ------------------------------------------------------------------------------------- build
def caption_lengths(sample: Path) -> np.ndarray:
    """Token lengths ([CLS] + WordPiece + [SEP], offline tokenizer, max 128) of the sample captions."""
    from crossalign.preprocess.tokenize import OFFLINE, load_tokenizer, tokenize

    captions = [a["caption"] for a in json.loads(sample.read_text())["annotations"]]
    _, offsets = tokenize(load_tokenizer(OFFLINE), captions, 128)
    return np.diff(offsets)


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
          log=print) -> dict:
    """Write ``root/data/features/{train,val,test}`` with COCO Karpathy shapes -> sizes."""
    from crossalign.io import FeatureWriter, atomic_dir

    pool = caption_lengths(sample)
    sizes = {}
    for s, (split, (n_full, m_full)) in enumerate(KARPATHY.items()):
        rng = np.random.default_rng(seed + s)
        share = fraction if split == "train" else (eval_fraction if eval_fraction is not None else min(1.0, 20 * fraction))
        n = max(10, round(n_full * share))
        counts = captions_per_image(n, round(m_full * n / n_full), rng)
        cap_img = np.repeat(np.arange(n), counts)  # (M,)
        m = cap_img.size
        lengths = rng.choice(pool, size=m)  # (M,)
        with atomic_dir(root / "data" / "features" / split) as tmp:
            w = FeatureWriter(tmp, n, REGIONS, IMAGE_DIM, lengths, TEXT_DIM)
            for i in range(0, n, 512):
                b = min(512, n - i)
                w.write_images(i, random_fp16(rng, (b, REGIONS, IMAGE_DIM)), random_fp16(rng, (b, IMAGE_DIM)))
            for j in range(0, m, 4096):
                rows = np.arange(j, min(m, j + 4096))
                states = random_fp16(rng, (len(rows), int(lengths[rows].max()), TEXT_DIM))
                w.write_texts(rows, states, random_fp16(rng, (len(rows), TEXT_DIM)))
            w.close(np.arange(n) + 1, cap_img, np.arange(m) + 1,
                    {"split": split, "n_images": n, "n_captions": m, "image_dim": IMAGE_DIM, "text_dim": TEXT_DIM,
                     "regions": REGIONS, "synthetic": "bench/scale.py random fp16", "text_layout": "packed",
                     "perturbations": {"kinds": list(KINDS), "per_caption": 1, "count": m}})
            write_negatives(tmp, n, lengths, rng)
        sizes[split] = {"images": n, "captions": int(m), "text_tokens": int(lengths.sum()),
                        "disk_mb": round(disk_bytes(root / "data" / "features" / split) / 2**20, 1)}
        log(f"built {split}: {sizes[split]}")
    return sizes


def write_negatives(split_dir: Path, n: int, lengths: np.ndarray, rng: np.random.Generator) -> None:
    """The binding negatives the features stage writes beside the features (crossalign.features.hardneg),
    so training with params.yaml's twin and caption negatives reads what it would at COCO size:
    images 2k and 2k+1 are twins, one perturbed caption per caption (features.perturbations 1),
    as long as its source, random fp16 states, a random kind."""
    from crossalign.features.hardneg import NegTextWriter

    twin_row = np.arange(n) ^ 1  # 0<->1, 2<->3, ...
    twin_row[twin_row >= n] = -1
    m = len(lengths)
    w = NegTextWriter(split_dir, lengths, TEXT_DIM)
    for j in range(0, m, 4096):
        rows = np.arange(j, min(m, j + 4096))
        w.write_texts(rows, random_fp16(rng, (len(rows), int(lengths[rows].max()), TEXT_DIM)),
                      random_fp16(rng, (len(rows), TEXT_DIM)))
    w.close(np.arange(m), rng.integers(0, len(KINDS), size=m).astype(np.int8), twin_row)


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
    """``evaluate_model`` (scores, 5K + 1K folds, ranks, metrics) on the test split or its first images."""
    import logging

    import torch

    from crossalign.evaluate import stage as evaluation
    from crossalign.train import stage as training
    from crossalign.io import load_features
    from crossalign.methods import load_aligner

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = bench_config(args.params, args.val_images, args.placement)
    model, _ = load_aligner(args.root / "models" / args.method / "final" / "seed-0")
    test = training.first_images(load_features(args.root / "data" / "features" / "test"), args.images)
    start = time.perf_counter()
    metrics, *_ = evaluation.evaluate_model(model, test, cfg, torch.device("cpu"))
    seconds = time.perf_counter() - start
    pairs = test.n_images * test.n_captions
    return {"images": test.n_images, "captions": test.n_captions, "ranked_pairs": pairs, "seconds": round(seconds, 2),
            "ranked_pairs_per_s": round(pairs / seconds, 1), "folds_1k": "1k" in metrics}  # a timing: no recall


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
    parser.add_argument("--pair-images", type=int, default=1000, help="test images the pair scorer "
                        "(cross_attention) scores all-pairs (1000 = one 1K fold); 5K time extrapolated from its rate")
    parser.add_argument("--eval-limit", type=float, default=0, help="stop an evaluate stage after this many "
                        "seconds (0 = never); its row keeps the peak RSS so far and the expected times")
    parser.add_argument("--sample", type=Path, default=SAMPLE, help="COCO captions JSON for the length distribution")
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
            out = {"sizes": build(args.root, args.fraction, args.seed, args.sample, args.eval_fraction)}
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
                           "--sample", str(args.sample), *common,
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
            images = args.pair_images if images is None else images
            row = run_child(["--child", "evaluate", "--method", method, "--images", str(images), *common],
                            logs / f"evaluate-{method}.log", args.eval_limit or None)
            if method == "cross_attention" and "ranked_pairs_per_s" in row:
                n, m = sizes["test"]["images"], sizes["test"]["captions"]
                row["extrapolated_full_test_all_pairs_s"] = round(n * m / row["ranked_pairs_per_s"], 0)
            stages.append({"stage": f"evaluate {method} ({'test' if not images else f'first {images} test images'})",
                           **row})
            save()
            print(stages[-1], flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root / "data", ignore_errors=True)
            shutil.rmtree(root / "models", ignore_errors=True)
            shutil.rmtree(root / "plots", ignore_errors=True)
    save()
    print(f"{'stage':<48}{'wall s':>9}{'peak RSS MB':>13}{'pairs/s':>11}")
    for row in stages:
        rate = row.get("pairs_per_s", row.get("ranked_pairs_per_s", "stopped" if "stopped_after_s" in row else ""))
        print(f"{row['stage']:<48}{row['wall_s']:>9.1f}{row['peak_rss_mb']:>13.0f}{rate!s:>11}")
    return 0


if __name__ == "__main__":
    entry(main)
