"""``crossalign`` console script: use the registered champion.

    crossalign search "a red circle left of a blue square" --top 5   # best test images
    crossalign search --image photo.jpg --top 5                        # best test captions

The query goes through the same frozen encoder the features stage used (``features.*``), the
champion (``models:/<tracking.registered_model>@champion``) ranks the test split with the same
ranking as its evaluation (similarity, exact matching, or shortlist re-rank).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

from crossalign import config, registry
from crossalign.io import load_features, read_json
from crossalign.methods.base import Aligner, State
from crossalign.device import resolve_device
from crossalign.retrieval import encode_images, encode_texts, score_states

OFFLINE_ENV = {"DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


class NoChampion(RuntimeError):
    """The registry has no ``champion`` alias yet."""


def load_champion(cfg: config.Config, root: Path) -> tuple[Aligner, object]:
    """The champion model and its registry version; :class:`NoChampion` when there is none."""
    version = registry.current_champion(cfg, root)
    if version is None:
        raise NoChampion(f"no champion yet: registered model {cfg.tracking.registered_model!r} has no "
                         f"@{registry.CHAMPION} alias in {registry.tracking_uri(cfg, root)}. "
                         "Run the pipeline first (`make run`, or `python -m tasks.select` after evaluation).")
    from crossalign.tracking import load_logged_aligner

    with registry.using(cfg, root):
        model = load_logged_aligner(registry.champion_uri(cfg))
    return model.eval(), version


def text_features(cfg: config.Config, text: str, device: torch.device) -> tuple[torch.Tensor, ...]:
    """A query caption -> frozen features as stored: tokens (1, L, Dt), mask (1, L), pooled (1, Dt)."""
    from crossalign.encoders import build_text_encoder

    enc = build_text_encoder(cfg.features.text_encoder, device)
    ids = enc.tokenize([text], min(cfg.preprocess.max_length, enc.max_length))[0]
    input_ids = torch.tensor([ids], device=device)  # (1, L)
    mask = torch.ones_like(input_ids)  # (1, L)
    with torch.inference_mode():
        tokens, pooled = enc(input_ids, mask)  # (1, L, Dt), (1, Dt)
    return tokens.half().float(), mask.bool(), pooled.half().float()


def image_features(cfg: config.Config, path: Path, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A query image file -> frozen features as stored: tokens (1, R, Di), pooled (1, Di)."""
    from crossalign.encoders import build_image_encoder
    from crossalign.images import decode_image

    pixels = decode_image(path, cfg.preprocess.image_size, cfg.preprocess.resize, cfg.preprocess.max_pixels)
    enc = build_image_encoder(cfg.features.image_encoder, device)
    with torch.inference_mode():
        tokens, pooled = enc(torch.from_numpy(pixels)[None].to(device))  # (1, R, Di), (1, Di)
    return tokens.half().float(), pooled.half().float()


def search(cfg: config.Config, root: Path, text: str | None = None, image: Path | None = None,
           top: int = 5, split: str = "test") -> list[dict]:
    """Rank ``split``'s images for a caption (or its captions for an image) with the champion."""
    if (text is None) == (image is None):
        raise ValueError("give either a query text or --image PATH")
    device = resolve_device(cfg.evaluate.device, "evaluate.device")
    model, version = load_champion(cfg, root)
    model = model.to(device)
    feats = load_features(root / "data" / "features" / split)
    prepared = root / "data" / "prepared" / split
    ev = cfg.evaluate
    with torch.inference_mode():
        if text is not None:
            tokens, mask, pooled = text_features(cfg, text, device)
            query: State = model.encode_texts(tokens, mask, pooled)
            _, t2i = score_states(model, encode_images(model, feats, device), query,
                                  ev.block_images, ev.block_texts, ev.pair_chunk)
            scores = t2i[:, 0]  # (N,)
            records = read_json(prepared / "images.json") if (prepared / "images.json").exists() else None
        else:
            tokens, pooled = image_features(cfg, image, device)
            query = model.encode_images(tokens, pooled)
            i2t, _ = score_states(model, query, encode_texts(model, feats, device),
                                  ev.block_images, ev.block_texts, ev.pair_chunk)
            scores = i2t[0]  # (M,)
            records = read_json(prepared / "captions.json") if (prepared / "captions.json").exists() else None
    order = np.argsort(-scores, kind="stable")[:top]
    hits = []
    for rank, j in enumerate(order, 1):
        hit = {"rank": rank, "row": int(j), "score": float(scores[j]),
               "method": version.tags.get("method"), "version": version.version}
        if text is not None:
            hit["image_id"] = int(feats.image_ids[j])
            hit["file_name"] = records[j].get("file_name") if records else None
        else:
            hit["image_id"] = int(feats.image_ids[feats.caption_image_index[j]])
            hit["caption"] = records[j] if records else None
        hits.append(hit)
    return hits


def _print(hits: list[dict], text: str | None, image: Path | None) -> None:
    if hits:
        print(f"champion: {hits[0]['method']} (version {hits[0]['version']})")
    print(f"query: {text!r}" if text is not None else f"query image: {image}")
    for h in hits:
        what = h.get("file_name") if text is not None else h.get("caption")
        print(f"{h['rank']:>3}  {h['score']:9.4f}  image {h['image_id']:<10}  {what or ''}")


def main(argv: list[str] | None = None) -> int:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    parser = argparse.ArgumentParser(prog="crossalign", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("search", help="rank the test split with the registered champion")
    s.add_argument("text", nargs="?", help="a caption to find images for")
    s.add_argument("--image", type=Path, help="an image file to find captions for")
    s.add_argument("--top", type=int, default=5, help="results to print (default 5)")
    s.add_argument("--split", default="test", choices=("train", "val", "test"), help="split searched")
    s.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    if (args.text is None) == (args.image is None):
        parser.error("give either a query text or --image PATH")
    if args.top < 1:
        parser.error("--top must be >= 1")
    try:
        cfg = config.load(args.params)
        hits = search(cfg, Path.cwd(), args.text, args.image, args.top, args.split)
    except NoChampion as err:
        print(str(err), file=sys.stderr)
        return 1
    except (config.ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _print(hits, args.text, args.image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
