"""The training loop shared by every method (``train@<method>``).

One loop for all methods: batches of (image, caption) pairs over every training caption, shuffled
by a generator seeded from (seed, epoch); ``model(batch)`` -> named outputs -> the method's loss
module -> named terms, summed. AdamW with linear warm-up then cosine decay, gradient clipping,
early stopping on validation RSUM (COCO protocol) with patience; the best epoch's weights are the
result. A checkpoint each epoch (``crossalign.train.checkpoint``) makes a killed run resume to identical
weights. CUDA with bf16 autocast when present, CPU (deterministic) otherwise. Batches are gathered
from the split's fp16 arrays by :mod:`crossalign.train.batches` (``train.placement``: held on the device
or streamed from the files); the split is never converted to float32 as a whole.

Layout under ``root``: ``models/<m>/final/seed-<s>/{model.safetensors,model.json}``,
``models/<m>/checkpoints/seed-<s>/``, ``plots/train/<m>.csv``.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from crossalign import interrupt
from crossalign.train import checkpoint
from crossalign.features import hardneg
from crossalign.train.batches import DeviceSplit, StreamSplit, iterate, open_split, pair_twins, twin_captions
from crossalign.config import Config
from crossalign.device import resolve_device
from crossalign.io import RERUN, TEXT_LAYERS_FILE, FeatureSplit, atomic_dir, atomic_file, load_features
from crossalign.methods import get_method, method_params, save_aligner, trainable_params
from crossalign.methods import text_layers
from crossalign.methods.base import Aligner
from crossalign.methods.text_layers import WithTextLayers
from crossalign.train.optim import param_groups
from crossalign.retrieval.protocol import retrieval_metrics
from crossalign.retrieval.scoring import score_matrices


class NonFiniteLossError(ValueError):
    """The loss became NaN or infinite; the message names method, seed, epoch and step."""


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up over ``warmup`` steps to ``peak``, then cosine decay to 0 at ``total``."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def validation_metrics(model: Aligner, split: FeatureSplit, device: torch.device) -> dict[str, float]:
    """COCO retrieval metrics of ``model`` on a split (t2i from its own matrix when re-ranking)."""
    i2t, t2i = score_matrices(model, split, device)
    return retrieval_metrics(i2t, split.caption_image_index, t2i)


_PACKAGE = Path(__file__).resolve().parents[1]  # crossalign/
WEIGHT_CODE = ("train/stage.py", "train/batches.py", "train/checkpoint.py", "train/optim.py", "retrieval", "methods")


def code_hash() -> str:
    """Hash of the source that determines trained weights (the train stage's code deps), so a
    persisted checkpoint from older code is not resumed after DVC reruns the stage for a change."""
    digest = hashlib.sha256()
    for name in WEIGHT_CODE:
        path = _PACKAGE / name
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(file.relative_to(_PACKAGE).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def fingerprint(cfg: Config, method: str, seed: int, train: FeatureSplit, val: FeatureSplit) -> str:
    """Hash of everything that determines a run's weights (params, seed, data, code): a
    checkpoint with another is stale."""
    t = cfg.train
    blob = {"methods": method_params(cfg, method), "seed": seed, "code": code_hash(),
            "train": [t.epochs, t.batch_size, t.lr, t.weight_decay, t.warmup_fraction, t.grad_clip, t.patience,
                      t.val_images, t.twin_negatives, t.caption_negatives, t.binding_rank_weight],
            "features": [list(train.image_tokens.shape), list(train.text.tokens.shape), list(val.text.tokens.shape),
                         _sample_digest(train), _sample_digest(val)]}
    encoder = train.meta.get("text_encoder") or {}
    if "token_layer" in encoder or "text_layers" in encoder:  # which layer's states (absent: the last, as before)
        trained = encoder.get("text_layers")
        blob["text"] = [encoder.get("token_layer"), trained, t.text_layers_lr if trained else None]
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _sample_digest(split: FeatureSplit) -> str:
    """Cheap identity of a feature split: a strided sample of its pooled vectors and index."""
    parts = (split.image_pooled[::97], split.text_pooled[::97], split.caption_image_index)
    return hashlib.sha256(b"".join(np.ascontiguousarray(p).tobytes() for p in parts)).hexdigest()[:16]


class NullTracker:
    """Tracking off: the interface :class:`crossalign.train.tracker.MlflowTracker` implements."""

    def start(self, method: str, seed: int, fingerprint: str) -> str | None:
        return None

    def log_epoch(self, metrics: dict[str, float], epoch: int) -> None:
        pass

    def finish(self, final_dir: Path, ckpt_dir: Path, history: list[dict]) -> dict[str, Any]:
        return {}

    def abort(self) -> None:
        pass


def _epochs(cfg: Config, method: str, seed: int, model: Aligner, loss_fn: torch.nn.Module,
            opt: torch.optim.Optimizer, data: DeviceSplit | StreamSplit, val: FeatureSplit, state: dict[str, Any],
            best: dict[str, torch.Tensor], ckpt_dir: Path, tracker: Any, log,
            max_steps: int | None = None) -> dict[str, torch.Tensor]:
    """Run the remaining epochs (updating ``state`` and the checkpoint) -> best weights.
    ``max_steps``: at most this many steps per epoch (benchmarks only)."""
    t, device = cfg.train, next(model.parameters()).device
    n_cap = data.split.n_captions
    steps_per_epoch = max(1, n_cap // t.batch_size + (n_cap % t.batch_size >= 2))
    if max_steps:
        steps_per_epoch = min(steps_per_epoch, max_steps)
    total = t.epochs * steps_per_epoch
    warmup = int(t.warmup_fraction * total)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    for epoch in range(state["epoch"] + 1, t.epochs + 1):
        if state["done"]:
            break
        started = time.perf_counter()
        model.train()
        order = torch.randperm(n_cap, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        if data.twin_caption is not None:  # train.twin_negatives: twin pairs share batches
            order = pair_twins(order, data.twin_caption)
        sums: dict[str, float] = {}
        index = (order[b * t.batch_size:(b + 1) * t.batch_size] for b in range(steps_per_epoch))
        for b, batch in enumerate(iterate(data, index)):
            interrupt.check()
            lr = lr_at(state["step"], total, warmup, t.lr)
            for group in opt.param_groups:  # the trained text layers keep their own peak (train.text_layers_lr)
                group["lr"] = lr_at(state["step"], total, warmup, group["peak_lr"]) if "peak_lr" in group else lr
            with autocast:
                terms = loss_fn(model(batch), batch)
            loss = sum(terms.values())
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"{method} seed {seed}: loss is {float(loss.detach())} at epoch {epoch}, step {b + 1}/{steps_per_epoch} "
                    f"(global step {state['step'] + 1}); terms {({k: float(v.detach()) for k, v in terms.items()})}; "
                    f"lower train.lr or check the features")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            opt.step()
            state["step"] += 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        metrics = validation_metrics(model, val, device)
        row = {"epoch": epoch, "seed": seed, "train_loss": sum(sums.values()) / steps_per_epoch,
               **{k: v / steps_per_epoch for k, v in sums.items()}, "lr": lr,
               **{f"val_{k}": v for k, v in metrics.items()}}
        seconds = time.perf_counter() - started  # to the tracker only: the CSV is a function of the inputs
        state["history"].append(row)
        if metrics["rsum"] > state["best_rsum"]:
            state.update(best_rsum=metrics["rsum"], best_epoch=epoch, bad_epochs=0, best_metrics=metrics)
            best = checkpoint.state_tensors(model)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        state["done"] = state["bad_epochs"] >= t.patience or epoch == t.epochs
        checkpoint.save_checkpoint(ckpt_dir, model, best, opt, state)
        tracker.log_epoch({**{k: v for k, v in row.items() if k not in ("epoch", "seed")}, "seconds": seconds}, epoch)
        log(f"[{method} seed {seed}] epoch {epoch}: loss {row['train_loss']:.4f} val rsum {metrics['rsum']:.1f} "
            f"({seconds:.1f}s)")
    return best


def with_text_layers(model: Aligner, train: FeatureSplit) -> Aligner:
    """``model`` with the text encoder's trainable layers (``features.text_trainable_layers``) the
    training split was cached below, initialised from the weights the features stage wrote beside
    it; ``model`` as it is when the split has none or the method reads no tokens."""
    config = text_layers.features_config(train.meta, str(train.root / "meta.json"))
    if config is None or not model.reads_tokens:
        return model
    path = train.root / TEXT_LAYERS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; {train.root / 'meta.json'} names {config['layers']} trainable text "
                                f"layers, whose weights the features stage writes there: {RERUN}")
    return text_layers.attach(model, config, load_file(str(path)), str(path))


def binding_negatives(cfg: Config, train: FeatureSplit) -> tuple[np.ndarray | None, hardneg.HardNegatives | None, int]:
    """(twin_caption, hard negatives, k) for :func:`crossalign.train.batches.open_split` from
    ``train.twin_negatives`` / ``train.caption_negatives``; a split written without binding negatives fails
    naming the missing file (:func:`crossalign.features.hardneg.load`)."""
    t = cfg.train
    if not (t.twin_negatives or t.caption_negatives):
        return None, None, 0
    hard = hardneg.load(train.root)
    twins = twin_captions(train.caption_image_index, hard.twin_row) if t.twin_negatives else None
    return twins, (hard if t.caption_negatives else None), t.caption_negatives


def train_seed(cfg: Config, root: Path, method: str, seed: int, train: FeatureSplit, val: FeatureSplit,
               final_dir: Path, tracker: Any = None, log=print, max_steps: int | None = None) -> dict[str, Any]:
    """Train one (method, seed) to ``final_dir`` (model.safetensors + model.json); returns meta.
    ``max_steps`` caps the steps per epoch (benchmarks only)."""
    tracker = tracker or NullTracker()
    t, device = cfg.train, resolve_device(cfg.train.device, "train.device")
    spec = get_method(method)
    torch.manual_seed(seed)
    model = with_text_layers(spec.build_model(cfg, train.image_dim, train.text_dim).to(device), train)
    loss_fn = spec.build_loss(cfg)
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay, t.text_layers_lr), lr=t.lr)  # no decay on biases, norms, logit scale
    data = open_split(train, t.placement, device, model.reads_tokens,  # batches never widen the whole split
                      *binding_negatives(cfg, train))
    log(f"[{method} seed {seed}] train.placement {t.placement}: {data.placement} "
        f"({'tokens + pooled' if model.reads_tokens else 'pooled only'})")
    ckpt_dir = root / "models" / method / "checkpoints" / f"seed-{seed}"
    fp = fingerprint(cfg, method, seed, train, val)
    state: dict[str, Any] = {"epoch": 0, "step": 0, "best_rsum": -1.0, "best_epoch": 0, "bad_epochs": 0,
                             "done": False, "history": [], "fingerprint": fp}  # no run id: the checkpoint is a DVC out
    best = checkpoint.state_tensors(model)
    previous = checkpoint.read_state(ckpt_dir)
    if previous is not None and previous.get("fingerprint") == fp:
        state, best = checkpoint.load_checkpoint(ckpt_dir, model, opt, device)
        log(f"[{method} seed {seed}] resuming after epoch {state['epoch']} from {ckpt_dir}")
    elif previous is not None:
        log(f"[{method} seed {seed}] {ckpt_dir} was written with other params or data: starting afresh")
    tracker.start(method, seed, fp)  # a resumed run is found by its fingerprint tag
    try:
        best = _epochs(cfg, method, seed, model, loss_fn, opt, data, val, state, best, ckpt_dir, tracker, log,
                      max_steps)
    except BaseException:
        tracker.abort()
        raise
    model.load_state_dict({k: v.to(device) for k, v in best.items()})
    meta = {"method": method, "image_dim": train.image_dim, "text_dim": train.text_dim,
            "methods": method_params(cfg, method), "trainable_params": trainable_params(model),
            **({"text_layers": model.text_layers.config} if isinstance(model, WithTextLayers) else {}),
            "seed": seed, "best_epoch": state["best_epoch"],
            "epochs_run": state["epoch"], "val_metrics": state.get("best_metrics", {})}
    save_aligner(model.cpu(), final_dir, meta)
    tracker.finish(final_dir, ckpt_dir, state["history"])  # the run is found by its tags, not named here
    return {**meta, "history": state["history"]}


def write_curves(path: Path, history: list[dict]) -> None:
    """Per-epoch rows for ``dvc plots`` (one CSV per method, a ``seed`` column)."""
    fields = list(dict.fromkeys(k for row in history for k in row))
    with atomic_file(path) as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)


def run(cfg: Config, root: Path, method: str, tracker_factory=None, log=print,
        max_steps: int | None = None) -> list[dict[str, Any]]:
    """Train ``method`` for every seed in ``train.seeds`` on ``root/data/features/{train,val}``.

    ``tracker_factory(cfg, root) -> tracker`` (e.g. :class:`crossalign.train.tracker.MlflowTracker`);
    None trains without tracking. Returns each seed's model meta (with its history).
    ``max_steps`` caps the steps per epoch (``bench/scale.py``; never set by the stage).
    """
    root = Path(root)
    get_method(method)  # unknown names fail before any work
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    train = load_features(root / "data" / "features" / "train")  # memory maps: placement decides what is read
    val = load_features(root / "data" / "features" / "val").first_images(cfg.train.val_images)
    tracker = tracker_factory(cfg, root) if tracker_factory else None
    results, history = [], []
    with atomic_dir(root / "models" / method / "final") as final:
        for seed in cfg.train.seeds:
            result = train_seed(cfg, root, method, seed, train, val, final / f"seed-{seed}", tracker, log, max_steps)
            results.append(result)
            history.extend(result["history"])
    write_curves(root / "plots" / "train" / f"{method}.csv", history)
    return results
