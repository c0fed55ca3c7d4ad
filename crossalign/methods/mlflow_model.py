"""A trained Aligner as an MLflow pyfunc model: :class:`AlignerModel` rebuilds it from its logged
``model.safetensors`` + ``model.json`` (no pickle); :func:`load_logged_aligner` loads one by URI.
"""
from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import torch

from crossalign.io import read_json
from crossalign.methods import META, WEIGHTS, load_aligner
from crossalign.methods.base import Aligner


def load_logged_aligner(model_uri: str, tracking_uri: str | None = None) -> Aligner:
    """The Aligner of a logged model (``runs:/<id>/model``, ``models:/<name>@champion``, ...)."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().aligner


class AlignerModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: loads the Aligner from its safetensors + JSON artifacts; ``predict`` scores
    every image against every caption of a small feature batch (dict of arrays)."""

    # The input is a dict of arrays, which MLflow's type-hint schema cannot describe: skip its
    # type-hint validation (as MLflow's own ChatModel does), and with it the UserWarning "Add type
    # hints to the `predict` method" that every import of this module would print.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        meta = Path(context.artifacts["meta"])
        self.aligner, self.meta = load_aligner(meta.parent, weights=context.artifacts["weights"], meta_path=meta)

    def predict(self, context, model_input, params=None):
        """model_input: image_tokens (N,R,Di), image_pooled (N,Di), text_tokens (M,L,Dt),
        text_lengths (M,), text_pooled (M,Dt) -> scores (N, M) (matching methods: match logits;
        re-ranking methods: the fused score of every pair)."""
        t = {k: torch.as_tensor(np.array(v)) for k, v in model_input.items()}
        a = self.aligner
        with torch.inference_mode():
            lengths = t["text_lengths"].long()
            mask = torch.arange(t["text_tokens"].shape[1])[None, :] < lengths[:, None]  # (M, L)
            im = a.encode_images(t["image_tokens"].float(), t["image_pooled"].float())
            tx = a.encode_texts(t["text_tokens"].float(), mask, t["text_pooled"].float())
            if a.embeds and a.matches:
                alpha = a.rerank.alpha if a.rerank else 0.5
                scores = alpha * a.match_block(im, tx) + (1 - alpha) * a.similarity(im, tx)
            else:
                scores = a.similarity(im, tx) if a.embeds else a.match_block(im, tx)
        return scores.float().numpy()


PYFUNC_CODE = Path(__file__).resolve().with_name("pyfunc_model.py")  # the "models from code" entry point


def pip_requirements() -> list[str]:
    """What a logged model needs to load (torch and mlflow pinned to this environment's)."""
    return [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "safetensors", "numpy",
            "crossalign"]


def fused_model_name(alpha: float) -> str:
    """Name, inside its training run, of a re-ranking model logged to rank at fusion ``alpha``:
    ``model-alpha-0p5`` for 0.5 (MLflow model names may not hold a "."; the float's repr, so two
    alphas never share a name)."""
    return "model-alpha-" + repr(float(alpha)).replace(".", "p")


def log_fused_model(run_id: str, model_dir: Path, alpha: float, choice: dict) -> str:
    """Log to the finished run ``run_id`` the re-ranking model of ``model_dir`` ranking at fusion
    ``alpha``: the same weights, a copy of its ``model.json`` with the method's ``fusion_alpha`` set
    to ``alpha`` and ``fusion_alpha_choice`` = ``choice`` (how it was chosen), under
    :func:`fused_model_name` -> that name. A run already holding a model of that name keeps it
    (the same weights at the same alpha). Uses the current tracking URI; the run ends FINISHED."""
    import json
    import tempfile

    from mlflow import MlflowClient

    from crossalign.tracking.registry import logged_model_ids

    name = fused_model_name(alpha)
    if logged_model_ids(MlflowClient(), run_id, name):
        return name
    meta = read_json(Path(model_dir) / META)
    params = meta.get("methods", {}).get(meta.get("method"))
    if not isinstance(params, dict) or "fusion_alpha" not in params:
        raise ValueError(f"{Path(model_dir) / META}: methods.{meta.get('method')} has no fusion_alpha: "
                         "not a re-ranking model")
    params["fusion_alpha"] = float(alpha)
    meta["fusion_alpha_choice"] = choice
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / META).write_text(json.dumps(meta, indent=2) + "\n")
        mlflow.start_run(run_id=run_id)
        try:
            mlflow.pyfunc.log_model(name=name, python_model=str(PYFUNC_CODE), pip_requirements=pip_requirements(),
                                    artifacts={"weights": str(Path(model_dir) / WEIGHTS),
                                               "meta": str(Path(tmp) / META)})
        finally:
            mlflow.end_run()  # FINISHED, as training left it: evaluate and select find finished runs only
    return name

