"""Training benchmark: throughput (pairs/s) and one-epoch wall time per method.

Features have the default synthetic set's shapes (2,000 train images x 5 captions, 250 val images;
EfficientNet-Lite0 grid 49 x 1280, MiniLM text 15-25 tokens x 384), drawn at random: throughput
does not depend on the values. One epoch = every training caption once, then the validation
scoring the training loop runs each epoch (early stopping), timed separately.

    python -m bench.train                      # CPU, all methods, params.yaml defaults
    python -m bench.train --device cuda        # on a GPU (the card is recorded)

Writes bench/results/train.json (or ``--out``).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from bench import entry
from crossalign import config
from crossalign.config import METHOD_NAMES
from crossalign.io import FeatureSplit, PackedText, atomic_file
from crossalign.methods import get_method
from crossalign.device import resolve_device
from crossalign.train.batches import open_split
from crossalign.train.stage import lr_at, validation_metrics


def synthetic_split(n_images: int, captions: int, regions: int, image_dim: int, text_dim: int,
                    seed: int) -> FeatureSplit:
    """Random features with the feature stage's layout (fp16 tokens, 15-25 token captions)."""
    rng = np.random.default_rng(seed)
    m = n_images * captions
    lengths = rng.integers(15, 26, size=m).astype(np.int32)
    text = rng.standard_normal((m, 25, text_dim), dtype=np.float32).astype(np.float16)
    text[np.arange(25)[None, :] >= lengths[:, None]] = 0
    return FeatureSplit(
        root=Path("<random>"), meta={},
        image_tokens=rng.standard_normal((n_images, regions, image_dim), dtype=np.float32).astype(np.float16),
        image_pooled=rng.standard_normal((n_images, image_dim), dtype=np.float32).astype(np.float16),
        text=PackedText.from_padded(text, lengths),
        text_pooled=rng.standard_normal((m, text_dim), dtype=np.float32).astype(np.float16),
        image_ids=np.arange(n_images), caption_image_index=np.repeat(np.arange(n_images), captions),
        caption_ids=np.arange(m))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_method(cfg: config.Config, method: str, train: FeatureSplit, val: FeatureSplit,
                 device: torch.device, max_steps: int | None) -> dict:
    """One epoch (or ``max_steps`` steps) of the training loop's step, then one validation scoring."""
    torch.manual_seed(0)
    spec = get_method(method)
    model = spec.build_model(cfg, train.image_dim, train.text_dim).to(device)
    loss_fn = spec.build_loss(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    data = open_split(train, cfg.train.placement, device, model.reads_tokens)  # as the training loop does
    bs = cfg.train.batch_size
    steps = train.n_captions // bs
    run_steps = min(steps, max_steps) if max_steps else steps
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    order = torch.randperm(train.n_captions, generator=torch.Generator().manual_seed(0))
    model.train()

    def step(s: int) -> None:
        for group in opt.param_groups:
            group["lr"] = lr_at(s, steps, 0, cfg.train.lr)
        batch = data.batch(order[s * bs:(s + 1) * bs])
        with autocast:
            loss = sum(loss_fn(model(batch), batch).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()

    step(0)  # warm-up (allocator, kernels), not timed
    sync(device)
    start = time.perf_counter()
    for s in range(run_steps):
        step(s)
    sync(device)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    validation_metrics(model, val, device)
    sync(device)
    val_s = time.perf_counter() - start
    pairs_per_s = run_steps * bs / train_s
    epoch_train_s = steps * bs / pairs_per_s
    return {"method": method, "steps_timed": run_steps, "pairs_per_s": round(pairs_per_s, 1),
            "epoch_train_s": round(epoch_train_s, 2), "val_scoring_s": round(val_s, 2),
            "epoch_total_s": round(epoch_train_s + val_s, 2),
            "params": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", nargs="*", default=list(METHOD_NAMES))
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--max-steps", type=int, default=0, help="time at most this many steps (0 = a whole epoch)")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-val", type=int, default=250)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a param, e.g. --set methods.embed_dim=128 (YAML value)")
    parser.add_argument("--out", default="bench/results/train.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    raw = yaml.safe_load(Path(args.params).read_text())
    for item in args.set:
        key, _, value = item.partition("=")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    cfg = config.from_dict(raw, args.params)
    device = resolve_device(args.device)
    train = synthetic_split(args.n_train, 5, 49, 1280, 384, 0)
    val = synthetic_split(args.n_val, 5, 49, 1280, 384, 1).first_images(cfg.train.val_images)
    rows = [bench_method(cfg, m, train, val, device, args.max_steps or None) for m in args.methods]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    result = {"device": str(device), "card": card, "threads": torch.get_num_threads(), "overrides": args.set,
              "batch_size": cfg.train.batch_size, "embed_dim": cfg.methods.embed_dim, "epochs": cfg.train.epochs,
              "n_train_pairs": train.n_captions, "n_val": [val.n_images, val.n_captions], "methods": rows}
    print(f"device {device} ({card}), {torch.get_num_threads()} threads, batch {cfg.train.batch_size}, "
          f"embed_dim {cfg.methods.embed_dim}, {train.n_captions} train pairs, val {val.n_images}x{val.n_captions}")
    print(f"{'method':<16}{'pairs/s':>10}{'epoch train s':>15}{'val score s':>13}{'epoch total s':>15}"
          f"{'x epochs s':>12}")
    for r in rows:
        print(f"{r['method']:<16}{r['pairs_per_s']:>10.0f}{r['epoch_train_s']:>15.1f}{r['val_scoring_s']:>13.1f}"
              f"{r['epoch_total_s']:>15.1f}{r['epoch_total_s'] * cfg.train.epochs:>12.0f}")
    with atomic_file(Path(args.out)) as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")
    return 0


if __name__ == "__main__":
    entry(main)
