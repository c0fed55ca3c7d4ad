"""Preprocess benchmark: crossalign's preprocess stage against the article's own loop.

Both run on the same real COCO JPEGs (``../shared/coco-sample/train2017``, all 80, repeated
``--repeat`` times so a timing lasts seconds) and their 400 official captions (repeated alike).

- article, images: per image ``PIL.Image.open(p).convert("RGB")`` -> ``transforms.Resize((224,
  224))`` -> ``ToTensor`` -> ``Normalize`` (ImageNet), one process (its loop), torch's default
  threads. ``.convert("RGB")`` is needed for the loop to survive COCO's grayscale images.
- article, captions: per caption ``tokenizer(c, padding="max_length", max_length=128,
  truncation=True, return_tensors="pt")`` with the same fast tokenizer as ours.
- ours, images: :func:`crossalign.preprocess.stage.write_images` (JPEG draft decode, one bicubic
  resample, uint8, streamed into an ``open_memmap`` file) over a process pool already started.
- ours, captions: :func:`crossalign.preprocess.tokenize.tokenize` (batched, truncated, no padding).
- ours, stage end to end: :func:`crossalign.preprocess.stage.run` on a raw folder of the same images
  (pool start, tokenizer load, all files written), images/s over all the split's images.
- info rows: the article's loop with torch at one thread, and in a pool of the same process count
  as ours (one thread each): the like-for-like comparisons.
- content: mean |ours - full decode + same bicubic resample| over all pixels of the 80 images
  (target <= 2 grey levels), the worst image, and the same against the article's pixels.

Each timing is the best of ``--trials``. Writes ``bench/results/preprocess.json`` (or ``--out``).

    python -m bench.preprocess                # all cores (workers 0 = os.cpu_count())
    python -m bench.preprocess --workers 2 --repeat 20
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from bench import coco_sample, entry, need_sample

SAMPLE = coco_sample()
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def article_transform():
    from torchvision import transforms

    return transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


_TRANSFORM: list = []  # built on first use, so that importing this module (pool workers do) stays light


def article_image(path: str):
    """The article's per-image loop body -> normalised float tensor (3, 224, 224)."""
    from PIL import Image

    if not _TRANSFORM:
        _TRANSFORM.append(article_transform())
    return _TRANSFORM[0](Image.open(path).convert("RGB"))


def one_torch_thread(*_ignored: object) -> None:
    """Pool initializer: one torch thread per process, so N processes use N cores, not N x threads."""
    import torch

    torch.set_num_threads(1)


def article_images(paths: list[str], pool=None) -> None:
    if pool is None:
        for p in paths:
            article_image(p)
    else:
        for _ in pool.imap(article_image, paths, chunksize=16):
            pass


def article_images_one_thread(paths: list[str]) -> None:
    """The article's loop with torch limited to one thread (its default uses every core)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        article_images(paths)
    finally:
        torch.set_num_threads(threads)


def article_captions(tok, captions: list[str]) -> None:
    for c in captions:
        tok(c, padding="max_length", max_length=128, truncation=True, return_tensors="pt")


def best_rates(jobs: dict[str, tuple[Callable[[], object], int]], trials: int) -> dict[str, float]:
    """Items per second of each ``name: (fn, n_items)``, best of ``trials``; the jobs are
    interleaved within each trial so that a busy machine slows them alike."""
    best = {name: float("inf") for name in jobs}
    for _ in range(trials):
        for name, (fn, _n) in jobs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return {name: n / best[name] for name, (_fn, n) in jobs.items()}


def content_check(paths: list[str]) -> dict:
    """Mean absolute difference of our pixels against a full decode (same filter) and the article's."""
    from crossalign.preprocess.images import decode_image

    ours_vs_full, ours_vs_article = [], []
    for p in paths:
        ours = decode_image(p, 224, "squash").astype(np.float32)  # (3, 224, 224)
        full = decode_image(p, 224, "squash", draft=False).astype(np.float32)
        art = article_image(p).numpy() * np.array(STD)[:, None, None] + np.array(MEAN)[:, None, None]
        ours_vs_full.append(float(np.abs(ours - full).mean()))
        ours_vs_article.append(float(np.abs(ours - np.clip(np.rint(art * 255), 0, 255)).mean()))
    return {"mad_vs_full_decode": float(np.mean(ours_vs_full)), "mad_vs_full_decode_worst_image": max(ours_vs_full),
            "mad_vs_article_pixels": float(np.mean(ours_vs_article)), "images": len(paths)}


def stage_raw(root: Path, doc: dict, repeat: int) -> None:
    """A raw dataset folder (the data stage's layout) whose train split is the sample ``repeat`` times."""
    raw = root / "data" / "raw" / "synthetic"
    (raw / "annotations").mkdir(parents=True)
    (raw / "images").symlink_to(SAMPLE / "train2017")
    images, anns = [], []
    for r in range(repeat):
        images += [{**rec, "id": rec["id"] * 1000 + r} for rec in doc["images"]]
        anns += [{**a, "id": a["id"] * 1000 + r, "image_id": a["image_id"] * 1000 + r} for a in doc["annotations"]]
    small = {rec["id"] for rec in doc["images"][:8]}
    for split, imgs, caps in (("train", images, anns),
                              ("val", doc["images"][:8], [a for a in doc["annotations"] if a["image_id"] in small]),
                              ("test", doc["images"][:8], [a for a in doc["annotations"] if a["image_id"] in small])):
        (raw / "annotations" / f"captions_{split}.json").write_text(
            json.dumps({"info": {}, "licenses": [], "images": imgs, "annotations": caps}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=8, help="times the 80 images / 400 captions are repeated")
    parser.add_argument("--trials", type=int, default=2, help="timings per measurement; the best is kept")
    parser.add_argument("--workers", type=int, default=0, help="our decode processes; 0 = os.cpu_count()")
    parser.add_argument("--out", default="bench/results/preprocess.json")
    args = parser.parse_args(argv)
    need_sample()
    import torch

    from crossalign import config
    from crossalign.preprocess import stage as preprocess
    from crossalign.preprocess import tokenize
    from crossalign.io import write_json

    doc = json.loads((SAMPLE / "annotations" / "captions_train2017.json").read_text())
    paths = [str(SAMPLE / "train2017" / rec["file_name"]) for rec in doc["images"]]
    captions = [a["caption"] for a in doc["annotations"]]
    bench_paths, bench_caps = paths * args.repeat, captions * args.repeat
    workers = args.workers or os.cpu_count() or 1
    tok = tokenize.load_tokenizer(tokenize.OFFLINE)
    params = config.PreprocessParams(workers=workers)
    results: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                 "torch_threads": torch.get_num_threads()},
                     "images": len(bench_paths), "captions": len(bench_caps), "trials": args.trials}

    rows = {}
    with tempfile.TemporaryDirectory() as tmp, preprocess.pool_context().Pool(workers, one_torch_thread) as pool:
        plan = preprocess.SplitPlan("train", images=[{"id": i, "file_name": Path(p).name} for i, p in enumerate(bench_paths)],
                                    paths=[Path(p) for p in bench_paths])

        def ours_images() -> None:
            out = Path(tempfile.mkdtemp(dir=tmp))
            kept, bad = preprocess.write_images(out, plan, params, pool if workers > 1 else None, workers)
            assert len(kept) == len(bench_paths) and not bad, bad

        pool.map(one_torch_thread, range(workers))  # workers up and warm before any timing
        n_img, n_cap = len(bench_paths), len(bench_caps)
        rates = best_rates({"article_img": (lambda: article_images(bench_paths), n_img),
                            "article_1thread_img": (lambda: article_images_one_thread(bench_paths), n_img),
                            "article_pool_img": (lambda: article_images(bench_paths, pool), n_img),
                            "ours_img": (ours_images, n_img),
                            "article_cap": (lambda: article_captions(tok, bench_caps), n_cap),
                            "ours_cap": (lambda: tokenize.tokenize(tok, bench_caps, 128), n_cap)}, args.trials)
        rows["article"] = {"processes": 1, "images_per_s": rates["article_img"], "captions_per_s": rates["article_cap"]}
        rows["article_1thread"] = {"processes": 1, "images_per_s": rates["article_1thread_img"], "captions_per_s": None}
        rows["article_pool"] = {"processes": workers, "images_per_s": rates["article_pool_img"], "captions_per_s": None}
        rows["ours"] = {"processes": workers, "images_per_s": rates["ours_img"], "captions_per_s": rates["ours_cap"]}
        stage_root = Path(tmp) / "stage"
        stage_raw(stage_root, doc, args.repeat)
        cfg = config.from_dict({"preprocess": {"workers": workers}})
        t0 = time.perf_counter()
        preprocess.run(cfg, stage_root)
        wall = time.perf_counter() - t0
        n_stage = len(bench_paths) + 16
        rows["ours_stage_end_to_end"] = {"processes": workers, "images_per_s": n_stage / wall,
                                         "captions_per_s": None, "wall_s": wall,
                                         "note": "run(): pool start, tokenizer, all splits, captions, files"}
    results["rows"] = rows
    results["speedup_images"] = rows["ours"]["images_per_s"] / rows["article"]["images_per_s"]
    results["speedup_captions"] = rows["ours"]["captions_per_s"] / rows["article"]["captions_per_s"]
    results["content"] = content_check(paths)
    results["target"] = {"speedup_images_min": 4.0, "mad_max": 2.0,
                         "met": results["speedup_images"] >= 4.0 and results["content"]["mad_vs_full_decode"] <= 2.0}

    print(f"\npreprocess benchmark: {len(bench_paths)} COCO JPEGs, {len(bench_caps)} captions, "
          f"{os.cpu_count()} CPUs, best of {args.trials}")
    print(f"| {'pipeline':<42} | {'processes':>9} | {'images/s':>9} | {'captions/s':>10} |")
    print(f"|{'-' * 44}|{'-' * 11}:|{'-' * 10}:|{'-' * 11}:|")
    labels = {"article": "article loop (as written)", "article_1thread": "article loop, torch 1 thread (info)",
              "article_pool": "article loop, pool, 1 thread each (info)",
              "ours": "crossalign preprocess", "ours_stage_end_to_end": "crossalign stage end to end (info)"}
    for key, row in rows.items():
        caps = f"{row['captions_per_s']:>10.0f}" if row["captions_per_s"] else f"{'-':>10}"
        print(f"| {labels[key]:<42} | {row['processes']:>9} | {row['images_per_s']:>9.0f} | {caps} |")
    c = results["content"]
    print(f"stage end to end: {rows['ours_stage_end_to_end']['wall_s']:.1f} s for {n_stage} images "
          f"and {len(bench_caps) + 80} captions")
    print(f"speed-up vs article: images x{results['speedup_images']:.1f}, captions x{results['speedup_captions']:.1f}")
    print(f"content: mean |ours - full decode| = {c['mad_vs_full_decode']:.2f} grey levels "
          f"(worst image {c['mad_vs_full_decode_worst_image']:.2f}); vs article pixels {c['mad_vs_article_pixels']:.2f}")
    print(f"target (>= 4x images/s, MAD <= 2): {'met' if results['target']['met'] else 'NOT met'}")
    write_json(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    entry(main)
