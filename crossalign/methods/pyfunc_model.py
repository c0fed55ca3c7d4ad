"""MLflow "models from code" entry point of a logged Aligner (see :mod:`crossalign.methods.mlflow_model`).

MLflow executes this file when it loads the model; it names the pyfunc class, whose
``load_context`` rebuilds the Aligner from ``model.safetensors`` + ``model.json`` (no pickle).
"""
import mlflow

from crossalign.methods.mlflow_model import AlignerModel

mlflow.models.set_model(AlignerModel())
