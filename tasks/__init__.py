"""DVC stage entry points (``python -m tasks.<stage>``); the package sets the offline, no-telemetry
environment defaults before any stage module imports MLflow, torch or transformers."""
from crossalign import offline_defaults

offline_defaults()
