"""MLflow, beside the stages: the store, runs and their tags, the registry, the tracking server.

Imported by the stages, never importing them (an import-linter contract). ``runs``: the experiment,
run tags and lookups (a run is found by its tags, never by an id in a DVC out); ``registry``: the
registered model and its ``champion`` alias; ``server`` checks a tracking server before anything is
logged; ``mlflow_server`` launches the basic-auth server every host logs to.
"""
