"""``crossalign search``: rank a split with the registered champion.

The query goes through the same frozen encoder the features stage used (``features.*``), the
champion (``models:/<tracking.registered_model>@champion``) ranks the split with the same ranking as
its evaluation (similarity, exact matching, or shortlist re-rank). Heavy modules (torch, MLflow,
transformers) are imported when a search runs, so the console script's ``--help`` answers at once.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from crossalign import config

if TYPE_CHECKING:
    import torch

    from crossalign.methods.base import Aligner


class NoChampion(RuntimeError):
    """The registry has no ``champion`` alias yet."""


def load_champion(cfg: config.Config, root: Path) -> tuple["Aligner", object]:
    """The champion model and its registry version; :class:`NoChampion` when there is none."""
    from crossalign.tracking import registry
    from crossalign.methods.mlflow_model import load_logged_aligner

    version = registry.current_champion(cfg, root)
    if version is None:
        raise NoChampion(f"no champion yet: registered model {cfg.tracking.registered_model!r} has no "
                         f"@{registry.CHAMPION} alias in {registry.tracking_uri(cfg, root)}. "
                         "Run the pipeline first (`make run`, or `python -m tasks.select` after evaluation).")
    with registry.using(cfg, root):
        model = load_logged_aligner(registry.champion_uri(cfg))
    return model.eval(), version


def text_features(cfg: config.Config, text: str, device: "torch.device",
                  token_layer: int | None = None) -> tuple["torch.Tensor", ...]:
    """A query caption -> frozen features as stored: tokens (1, L, Dt), mask (1, L), pooled (1, Dt);
    the token states from ``token_layer`` (the gallery features' own, from their meta.json), else
    ``features.text_token_layer``."""
    import torch

    from crossalign.features.encoders import build_text_encoder

    if token_layer is None:  # the layer params.yaml caches (below any trainable layers)
        enc = build_text_encoder(cfg.features.text_encoder, device, cfg.features.text_token_layer,
                                 cfg.features.text_trainable_layers)
    else:
        enc = build_text_encoder(cfg.features.text_encoder, device, token_layer)
    ids = enc.tokenize([text], min(cfg.preprocess.max_length, enc.max_length))[0]
    input_ids = torch.tensor([ids], device=device)  # (1, L)
    mask = torch.ones_like(input_ids)  # (1, L)
    with torch.inference_mode():
        tokens, pooled = enc(input_ids, mask)  # (1, L, Dt), (1, Dt)
    return tokens.half().float(), mask.bool(), pooled.half().float()


def image_features(cfg: config.Config, path: Path, device: "torch.device") -> tuple["torch.Tensor", "torch.Tensor"]:
    """A query image file -> frozen features as stored: tokens (1, R, Di), pooled (1, Di).
    A file that is not a usable image raises ``ValueError`` naming ``path`` and the reason."""
    import torch

    from crossalign.features.encoders import build_image_encoder
    from crossalign.preprocess.images import BadImage, decode_image

    try:
        pixels = decode_image(path, cfg.preprocess.image_size, cfg.preprocess.resize, cfg.preprocess.max_pixels)
    except BadImage as err:
        raise ValueError(f"{path}: {err}") from None
    enc = build_image_encoder(cfg.features.image_encoder, device)
    with torch.inference_mode():
        tokens, pooled = enc(torch.from_numpy(pixels)[None].to(device))  # (1, R, Di), (1, Di)
    return tokens.half().float(), pooled.half().float()


def image_path(cfg: config.Config, file_name: str | None) -> str | None:
    """Where a prepared image record's file lies, relative to the project root (as the data stage
    wrote it: ``<data.raw_dir>/<data.dataset>/images/<file_name>``)."""
    if not file_name:
        return None
    return (Path(cfg.data.raw_dir) / cfg.data.dataset / "images" / file_name).as_posix()


def search(cfg: config.Config, root: Path, text: str | None = None, image: Path | None = None,
           top: int = 5, split: str = "test") -> list[dict]:
    """Rank ``split``'s images for a caption (or its captions for an image) with the champion."""
    import numpy as np
    import torch

    from crossalign.device import resolve_device
    from crossalign.io import load_features, read_json
    from crossalign.retrieval.scoring import encode_images, encode_texts, score_states

    if (text is None) == (image is None):
        raise ValueError("give either a query text or --image PATH")
    if text is not None and not text.strip():
        raise ValueError("the query text is empty")
    device = resolve_device(cfg.evaluate.device, "evaluate.device")
    model, version = load_champion(cfg, root)
    model = model.to(device)
    feats = load_features(root / "data" / "features" / split)
    prepared = root / "data" / "prepared" / split
    ev = cfg.evaluate
    with torch.inference_mode():
        if text is not None:
            layer = feats.meta.get("text_encoder", {}).get("token_layer", -1)  # as the model was trained and the gallery made
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise ValueError(f"{feats.root / 'meta.json'}: text_encoder.token_layer = {layer!r}, expected an "
                                 "integer layer (rerun the features stage)")
            tokens, mask, pooled = text_features(cfg, text, device, layer)
            query = model.encode_texts(tokens, mask, pooled)
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
            hit["path"] = image_path(cfg, hit["file_name"])
        else:
            hit["image_id"] = int(feats.image_ids[feats.caption_image_index[j]])
            hit["caption"] = records[j] if records else None
        hits.append(hit)
    return hits
