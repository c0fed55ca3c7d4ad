"""crossalign: image-text alignment methods on frozen features, compared by COCO retrieval.

:func:`offline_defaults` is what every entry point (the ``crossalign`` command, ``tasks/``,
``flows/``, ``bench/``, ``scripts/``) calls before its heavy imports: no usage telemetry from
MLflow, DVC or Prefect, and no Hugging Face hub access, unless the caller's environment says
otherwise (each variable is only a default).
"""
from __future__ import annotations

import os
from collections.abc import MutableMapping

OFFLINE_ENV = {
    "DO_NOT_TRACK": "1",                       # the cross-tool opt-out (MLflow, Prefect, ...)
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # an ephemeral Prefect server's telemetry service
    "HF_HUB_OFFLINE": "1",                     # encoders load from the installed packages only
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def offline_defaults(environ: MutableMapping[str, str] | None = None) -> None:
    """Set every :data:`OFFLINE_ENV` variable the environment does not already set."""
    env = os.environ if environ is None else environ
    for key, value in OFFLINE_ENV.items():
        env.setdefault(key, value)
