"""MLflow "models from code" entry point of a logged Aligner (see ``crossalign.tracking``).

MLflow executes this file when it loads the model; it names the pyfunc class, whose
``load_context`` rebuilds the Aligner from ``model.safetensors`` + ``model.json`` (no pickle).
"""
import mlflow

from crossalign.tracking import AlignerModel

mlflow.models.set_model(AlignerModel())
