"""The alignment methods (no stage of their own: ``train`` fits them, ``evaluate`` scores them).

Importing this package registers all four (see ``base.REGISTRY``): ``concat_mlp``,
``cross_attention``, ``contrastive``, ``joint``; their parts live in ``common`` / ``late`` /
``positions``, their losses in ``losses``, hard-negative mining in ``mining``, and a logged model's
MLflow wrapper in ``mlflow_model``.

Also the one way to build, save and load a method's model: weights in ``model.safetensors`` and
a JSON sidecar ``model.json`` (method name, feature dims, the method's params and whatever the
caller adds). Loading rebuilds the module from the JSON and reads tensors only; nothing is
unpickled.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save

from crossalign import config
from crossalign.io import atomic_file, read_json
from crossalign.methods import concat_mlp, contrastive, cross_attention, joint  # noqa: F401  (register)
from crossalign.methods import text_layers
from crossalign.methods.base import REGISTRY, Aligner, get_method

WEIGHTS, META = "model.safetensors", "model.json"

__all__ = ["META", "REGISTRY", "WEIGHTS", "Aligner", "build_aligner", "get_method", "load_aligner",
           "method_params", "save_aligner", "trainable_params"]


def build_aligner(cfg: config.Config, method: str, image_dim: int, text_dim: int) -> Aligner:
    """A freshly initialised model of ``method`` for features of the given dims."""
    return get_method(method).build_model(cfg, image_dim, text_dim)


def trainable_params(model: Aligner) -> int:
    """Number of trainable scalars (``requires_grad``; a parameter shared by two modules counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def method_params(cfg: config.Config, method: str) -> dict[str, Any]:
    """What defines a method's architecture: the shared embed dim, the image positions and its own
    params section."""
    return {"embed_dim": cfg.methods.embed_dim, "image_positions": cfg.methods.image_positions,
            "text_positions": cfg.methods.text_positions,
            "relation_geometry": cfg.methods.relation_geometry,
            method: getattr(cfg.methods, method).model_dump(mode="json")}


# what a model.json without these keys was trained with (keys it lacks; not today's defaults)
BEFORE_POSITIONS = {"image_positions": "none", "text_positions": "none", "relation_geometry": False}
BEFORE_MATCHER = {"matcher": "cross"}
BEFORE_JOINT = {"shared_projections": True}


def save_aligner(model: Aligner, directory: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``model.safetensors`` + ``model.json`` into ``directory``. ``meta`` must hold
    ``method``, ``image_dim``, ``text_dim`` and ``methods`` (see :func:`method_params`); any other
    keys (best epoch, metrics, MLflow run id) are kept as they are."""
    directory = Path(directory)
    missing = [k for k in ("method", "image_dim", "text_dim", "methods") if k not in meta]
    if missing:
        raise ValueError(f"save_aligner: meta lacks {missing}; has {sorted(meta)}")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_file(directory / WEIGHTS, "wb") as fh:
        fh.write(save(tensors))
    with atomic_file(directory / META) as fh:
        json.dump(meta, fh, indent=2)
        fh.write("\n")
    return directory


def load_aligner(directory: str | Path, weights: str | Path | None = None,
                 meta_path: str | Path | None = None) -> tuple[Aligner, dict[str, Any]]:
    """Rebuild a saved model (eval mode, CPU) -> (model, meta). ``weights`` / ``meta_path``
    override the two file locations (MLflow stores them apart)."""
    directory = Path(directory)
    meta_file = Path(meta_path) if meta_path else directory / META
    weights_file = Path(weights) if weights else directory / WEIGHTS
    meta = read_json(meta_file)
    try:
        method, image_dim, text_dim, params = meta["method"], int(meta["image_dim"]), int(meta["text_dim"]), meta["methods"]
    except KeyError as err:
        raise ValueError(f"{meta_file}: missing key {err}; expected method, image_dim, text_dim, methods") from None
    params = {**BEFORE_POSITIONS, **params}
    if isinstance(params.get(method), dict) and method in ("cross_attention", "joint"):
        params[method] = {**BEFORE_MATCHER, **(BEFORE_JOINT if method == "joint" else {}), **params[method]}
    cfg = config.from_dict({"methods": params}, str(meta_file))
    model = build_aligner(cfg, method, image_dim, text_dim)
    if meta.get("text_layers") is not None:  # trained text encoder layers (features.text_trainable_layers)
        model = text_layers.attach(model, text_layers.check_config(meta["text_layers"], str(meta_file)), None,
                                   str(meta_file))
    if not weights_file.exists():
        raise FileNotFoundError(f"{weights_file}: weights of {method} not found")
    state = load_file(str(weights_file))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{weights_file}: does not fit {method} built from {meta_file}: "
                         f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model.eval(), meta

