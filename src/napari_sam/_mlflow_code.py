"""MLflow "models from code" definition of the exported scorer (see mlflow_model.py)."""

import mlflow

from napari_sam.mlflow_model import SamPyfuncModel

mlflow.models.set_model(SamPyfuncModel())
