"""Prefect flows over the DVC pipeline; the package sets the offline, no-telemetry environment
defaults (crossalign.offline_defaults) before any flow module imports Prefect or MLflow."""
from crossalign import offline_defaults

offline_defaults()
