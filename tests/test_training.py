"""The training loop: layout, learning, determinism, SIGKILL resume, NaN stop, the stage entry."""
from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, make_tiny_features, tiny_config, dump_params
from crossalign.train import stage as training
from crossalign.io import load_features, write_features
from crossalign.methods import build_aligner

torch.set_num_threads(1)
METHODS = ["concat_mlp", "cross_attention", "contrastive", "joint"]


def shared_features(root: Path, n_train: int = 64, n_val: int = 24, seed: int = 0) -> Path:
    """train/val whose captions are noisy views of their image through the SAME maps (so what is
    learned on train transfers to val; conftest's splits use a different map per split)."""
    rng = np.random.default_rng(seed)
    w_img, w_txt = rng.normal(size=(8, 12)), rng.normal(size=(8, 10))
    for split, n in (("train", n_train), ("val", n_val)):
        latent = rng.normal(size=(n, 8))
        cap = np.repeat(np.arange(n), 2)
        pooled_i, pooled_t = latent @ w_img, latent[cap] @ w_txt + 0.3 * rng.normal(size=(2 * n, 10))
        lengths = rng.integers(2, 7, size=2 * n)
        tokens = pooled_t[:, None, :] + 0.3 * rng.normal(size=(2 * n, 6, 10))
        tokens[np.arange(6)[None, :] >= lengths[:, None]] = 0
        write_features(root / "data" / "features" / split, image_tokens=pooled_i[:, None, :] + 0.3 * rng.normal(size=(n, 4, 12)),
                       image_pooled=pooled_i, text_tokens=tokens, text_lengths=lengths, text_pooled=pooled_t,
                       image_ids=np.arange(n), caption_image_index=cap, caption_ids=np.arange(2 * n), meta={})
    return root


def quiet(*_):
    pass


def test_lr_warmup_then_cosine():
    assert training.lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert training.lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert training.lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert training.lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert training.lr_at(100, 100, 10, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_first_images_keeps_their_captions(tiny_features):
    split = load_features(tiny_features / "data" / "features" / "val")
    sub = split.first_images(5)
    assert sub.n_images == 5 and sub.n_captions == 10 and set(sub.caption_image_index) == set(range(5))
    assert split.first_images(0) is split


@pytest.mark.parametrize("method", METHODS)
def test_run_writes_models_checkpoints_and_curves(tmp_path, tiny_features, method):
    cfg = tiny_config(tmp_path, train={"epochs": 2, "batch_size": 16, "seeds": [0, 1], "device": "cpu", "threads": 1})
    results = training.run(cfg, tmp_path, method, log=quiet)
    assert [r["seed"] for r in results] == [0, 1]
    for seed in (0, 1):
        final = tmp_path / "models" / method / "final" / f"seed-{seed}"
        meta = __import__("json").loads((final / "model.json").read_text())
        assert (final / "model.safetensors").exists()
        assert meta["method"] == method and 1 <= meta["best_epoch"] <= 2 and "rsum" in meta["val_metrics"]
        assert "mlflow_run_id" not in meta  # run facts stay out of the DVC out
        ckpt = tmp_path / "models" / method / "checkpoints" / f"seed-{seed}"
        assert {p.name for p in ckpt.iterdir()} >= {"model.safetensors", "optimizer.safetensors", "state.json"}
    rows = list(csv.DictReader((tmp_path / "plots" / "train" / f"{method}.csv").open()))
    assert len(rows) == 4 and {"epoch", "train_loss", "lr", "val_i2t_r1", "val_t2i_r1", "val_rsum"} <= set(rows[0])


@pytest.mark.parametrize("method", METHODS)
def test_each_method_learns(tmp_path, method):
    shared_features(tmp_path)
    cfg = tiny_config(tmp_path, train={"epochs": 12, "batch_size": 16, "lr": 3e-3, "patience": 12, "device": "cpu",
                                       "threads": 1, "warmup_fraction": 0.1})
    val = load_features(tmp_path / "data" / "features" / "val")
    torch.manual_seed(0)
    untrained = training.validation_metrics(build_aligner(cfg, method, 12, 10), val, torch.device("cpu"))["rsum"]
    trained = training.run(cfg, tmp_path, method, log=quiet)[0]["val_metrics"]["rsum"]
    # an untrained model scores ~50-90 here; a trained one 500+ of 600
    assert trained > untrained + 60 and trained > 250, (method, untrained, trained)


def test_same_config_gives_identical_weights(tmp_path, tiny_features):
    cfg = tiny_config(tmp_path, train={"epochs": 2, "batch_size": 16, "device": "cpu", "threads": 1})
    training.run(cfg, tmp_path, "joint", log=quiet)
    first = load_file(tmp_path / "models" / "joint" / "final" / "seed-0" / "model.safetensors")
    import shutil
    shutil.rmtree(tmp_path / "models")
    training.run(cfg, tmp_path, "joint", log=quiet)
    second = load_file(tmp_path / "models" / "joint" / "final" / "seed-0" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


TRAIN_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import tiny_config
    from crossalign.train import stage as training
    torch.set_num_threads(1)
    root = __import__("pathlib").Path(sys.argv[1])
    cfg = tiny_config(root, train={{"epochs": 6, "batch_size": 16, "patience": 6, "device": "cpu", "threads": 1}})
    training.run(cfg, root, "cross_attention")
""")


def test_sigkill_mid_run_resumes_to_identical_weights(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT.format(tests=str(REPO / "tests")))
    roots = {}
    for name in ("killed", "clean"):
        roots[name] = tmp_path / name
        for i, split in enumerate(("train", "val")):
            make_tiny_features(roots[name] / "data" / "features" / split, n_images=400 if split == "train" else 16, seed=i)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(script), str(roots["killed"])], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state = roots["killed"] / "models" / "cross_attention" / "checkpoints" / "seed-0" / "state.json"
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert state.exists(), proc.stdout.read().decode()[-2000:]
    final = roots["killed"] / "models" / "cross_attention" / "final" / "seed-0" / "model.safetensors"
    assert not final.exists(), "the run finished before the kill: make the epochs longer"
    resumed = subprocess.run([sys.executable, str(script), str(roots["killed"])], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after epoch" in resumed.stdout
    clean = subprocess.run([sys.executable, str(script), str(roots["clean"])], env=env, capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr[-2000:]
    a = load_file(final)
    b = load_file(roots["clean"] / "models" / "cross_attention" / "final" / "seed-0" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    curves = [(r / "plots" / "train" / "cross_attention.csv").read_text().splitlines() for r in roots.values()]
    assert curves[0] == curves[1]  # no wall seconds in the CSV


def test_stale_checkpoint_of_other_params_is_not_resumed(tmp_path, tiny_features):
    logs = []
    training.run(tiny_config(tmp_path, train={"epochs": 1, "device": "cpu"}), tmp_path, "contrastive", log=quiet)
    training.run(tiny_config(tmp_path, train={"epochs": 1, "lr": 5e-4, "device": "cpu"}), tmp_path, "contrastive",
                 log=logs.append)
    assert any("starting afresh" in line for line in logs)


def test_nan_loss_stops_with_the_step(tmp_path):
    root = make_tiny_features(tmp_path / "data" / "features" / "train", n_images=24)
    make_tiny_features(tmp_path / "data" / "features" / "val", n_images=8, seed=1)
    pooled = np.load(root / "image_pooled.npy")
    pooled[:] = np.nan
    np.save(root / "image_pooled.npy", pooled)
    with pytest.raises(training.NonFiniteLossError, match=r"epoch 1, step 1/\d+ \(global step 1\)"):
        training.run(tiny_config(tmp_path, train={"device": "cpu"}), tmp_path, "contrastive", log=quiet)


def test_stage_entry_point(tmp_path, tiny_features, monkeypatch, capsys):
    from tasks import train as stage

    params = tmp_path / "params.yaml"
    params.write_text(dump_params(tiny_config(tmp_path, train={"epochs": 1, "device": "cpu"})))
    monkeypatch.chdir(tmp_path)
    assert stage.main(["--params", str(params), "--method", "concat_mlp", "--no-tracking"]) == 0
    assert "concat_mlp seed 0: best epoch 1" in capsys.readouterr().out
    assert (tmp_path / "models" / "concat_mlp" / "final" / "seed-0" / "model.json").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_training(tmp_path, tiny_features):
    cfg = tiny_config(tmp_path, train={"epochs": 1, "device": "cuda"})
    for method in METHODS:
        assert training.run(cfg, tmp_path, method, log=quiet)[0]["val_metrics"]["rsum"] > 0


@pytest.mark.parametrize("method", METHODS)
def test_streamed_and_in_memory_training_give_identical_weights(tmp_path, method):
    """train.placement stream (positioned reads per batch, prefetch thread) and device (fp16 held in
    RAM) feed identical float32 batches: bit-identical CPU weights."""
    shared_features(tmp_path)
    weights = {}
    for placement in ("device", "stream"):
        cfg = tiny_config(tmp_path, train={"epochs": 2, "batch_size": 16, "patience": 2, "device": "cpu",
                                           "threads": 1, "placement": placement})
        training.run(cfg, tmp_path, method, log=quiet)
        weights[placement] = load_file(str(tmp_path / "models" / method / "final" / "seed-0" / "model.safetensors"))
        shutil.rmtree(tmp_path / "models" / method / "checkpoints")  # no resume: the next one trains afresh
    assert weights["device"].keys() == weights["stream"].keys()
    for key, value in weights["device"].items():
        assert torch.equal(value, weights["stream"][key]), key


def _streamed_against_in_memory(tmp_path: Path, device: torch.device, monkeypatch) -> list[torch.Tensor]:
    """Batches of :class:`StreamSplit` on ``device`` (through :func:`iterate`: prefetch thread,
    positioned reads) against the CPU in-memory :class:`DeviceSplit` of the same rows, every field
    equal (twins and perturbed captions included); returns every host buffer the stream allocated."""
    from crossalign.features import hardneg
    from crossalign.train.batches import DeviceSplit, StreamSplit, iterate, twin_captions

    root = make_tiny_features(tmp_path / "f", n_images=24, captions_per_image=2)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 5, size=30)  # perturbed captions of captions 0..29, one each
    hardneg.write(root, twin_row=np.arange(24) ^ 1, tokens=rng.normal(size=(int(lengths.sum()), 10)).astype(np.float16),
                  offsets=np.concatenate([[0], np.cumsum(lengths)]), pooled=rng.normal(size=(30, 10)).astype(np.float16),
                  source=np.arange(30), kind=np.zeros(30, np.int8), per_caption=1)
    split, hard = load_features(root), hardneg.load(root)
    twins = twin_captions(split.caption_image_index, hard.twin_row)
    buffers: list[torch.Tensor] = []
    allocate = StreamSplit._buffer

    def recorded(self, shape):
        buffers.append(allocate(self, shape))
        return buffers[-1]

    monkeypatch.setattr(StreamSplit, "_buffer", recorded)
    stream = StreamSplit(split, device, True, twins, hard, 1)
    assert all(r is not None for r in stream.readers.values())  # memory-mapped files: positioned reads
    reference = DeviceSplit(split, torch.device("cpu"), True, twins, hard, 1)
    g = torch.Generator().manual_seed(0)
    index = [torch.randperm(48, generator=g)[:16] for _ in range(6)]
    n = 0
    for rows, batch in zip(index, iterate(stream, index)):
        expect = reference.batch(rows)
        for name, value in vars(expect).items():
            got = getattr(batch, name)
            assert (got is None) == (value is None), name
            if value is not None:
                assert got.device.type == device.type, name
                assert torch.equal(got.cpu(), value), (name, rows.tolist())
        n += 1
    assert n == len(index) and buffers
    return buffers


def test_streamed_batches_equal_in_memory_ones(tmp_path, monkeypatch):
    buffers = _streamed_against_in_memory(tmp_path, torch.device("cpu"), monkeypatch)
    assert not any(b.is_pinned() for b in buffers)  # nothing to pin for the CPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_streamed_placement_on_cuda_reads_into_pinned_buffers(tmp_path, monkeypatch):
    """train.placement stream on a CUDA device: every host buffer a batch is read into is pinned
    (page-locked, so the non-blocking copy overlaps), and the batches that arrive on the GPU equal
    the in-memory CPU batches field for field."""
    buffers = _streamed_against_in_memory(tmp_path, torch.device("cuda"), monkeypatch)
    assert all(b.is_pinned() for b in buffers), [tuple(b.shape) for b in buffers if not b.is_pinned()]


def test_placement_auto_and_unknown(tmp_path):
    from crossalign.train.batches import choose_placement, held_bytes

    shared_features(tmp_path)
    split = load_features(tmp_path / "data" / "features" / "train")
    cpu = torch.device("cpu")
    # pooled only: image (64 x 12) + caption (128 x 10) fp16
    assert held_bytes(split, tokens=False) == 2 * (64 * 12 + 128 * 10)
    assert held_bytes(split, tokens=True) == 2 * (64 * 12 + 128 * 10 + 64 * 4 * 12 + int(split.text_lengths.sum()) * 10)
    assert choose_placement("auto", split, cpu, True) == "device"  # a few KB fit any machine
    assert choose_placement("stream", split, cpu, True) == "stream"
    with pytest.raises(ValueError, match="train.placement = 'disk'"):
        choose_placement("disk", split, cpu, True)
