"""The scorer as an MLflow pyfunc model (the ``mlflow`` extra).

``napari-sam export-mlflow -o DIR`` writes a self-contained MLflow model: the SAM weights
as an artifact, this package as code, a signature and an input example. Its
``predict(pandas.DataFrame)`` takes the Azure request's columns and returns a DataFrame
with one ``response`` column, row for row what ``napari-sam score`` answers, so
``mlflow models serve -m DIR``, Azure ML's MLflow deployments or any MLflow host serve it.

The model is saved "from code" (``_mlflow_code.py`` is the model's definition): nothing in
the directory is pickled.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import mlflow.pyfunc

from . import __version__
from .scoring import COLUMNS, Scorer, ScoringError

MODEL_ARTIFACT = "sam_model"
# What the scoring path imports (python -X importtime on score); napari and Qt are not needed.
RUNTIME_REQUIREMENTS = ["torch", "transformers", "numpy", "pandas", "pillow", "scipy", "scikit-image",
                        "tifffile", "pydicom", "zarr", "platformdirs", "tqdm"]


class SamPyfuncModel(mlflow.pyfunc.PythonModel):
    """``predict(df)`` → DataFrame with a ``response`` column (see the module docstring).

    A bad row raises MLflow's "invalid parameter value" error naming the row and the
    problem, which MLflow's server answers 400 with that message.
    """

    def load_context(self, context):
        from .api import load_model

        device = os.environ.get("NAPARI_SAM_DEVICE", "auto")
        self.scorer = Scorer(load_model(context.artifacts[MODEL_ARTIFACT], device=device))

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from mlflow.exceptions import MlflowException

        try:
            unknown = sorted(set(model_input.columns) - set(COLUMNS))
            if unknown:
                raise ScoringError(f"unknown columns {unknown}; the columns are {list(COLUMNS)}")
            responses = []
            for i, values in enumerate(model_input.to_dict(orient="records")):
                try:
                    responses.append(self.scorer.score_values(values)["response"])
                except ScoringError as exc:
                    raise ScoringError(f"row {i}: {exc}", exc.status) from None
        except ScoringError as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        return pd.DataFrame({"response": responses})


def _model_files(model) -> Path:
    from .api import model_status

    status = model_status(model)
    if not status.available:
        raise FileNotFoundError(f"model {status.requested!r}: {status.detail}")
    return Path(status.location)


def export(output, model=None, *, overwrite: bool = False) -> Path:
    """Write the MLflow model for ``model`` (default: the configured SAM) into ``output``."""
    import pandas as pd
    from mlflow.models import infer_signature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    output = Path(output)
    if output.exists():
        if not overwrite:
            raise FileExistsError(f"{output} exists (pass --overwrite to replace it)")
        if not (output / "MLmodel").is_file():
            raise FileExistsError(f"{output} exists and is not an MLflow model; --overwrite only replaces one")
    weights = _model_files(model)
    example = pd.DataFrame(
        [[_EXAMPLE_IMAGE, "", "[[4, 4, 28, 28]]", "", False],
         [_EXAMPLE_IMAGE, "[[[16, 16]]]", "", "[[1]]", True]],
        columns=list(COLUMNS),
    )
    # Prompts: a JSON string (Azure's form) or the list itself. The flag too: MLflow would
    # turn a CSV's "False" into True; the scorer reads it right.
    prompt = AnyType()
    inputs = Schema([ColSpec("string", "image"), ColSpec(prompt, "input_points", required=False),
                     ColSpec(prompt, "input_boxes", required=False), ColSpec(prompt, "input_labels", required=False),
                     ColSpec(prompt, "multimask_output", required=False)])
    outputs = infer_signature(example, pd.DataFrame({"response": [_EXAMPLE_RESPONSE]})).outputs
    code = Path(tempfile.mkdtemp(prefix="napari-sam-export-")) / "napari_sam"
    shutil.copytree(Path(__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # written beside the target and swapped in only when complete: a failed export
    # leaves the old model as it was
    staging = output.with_name(f".{output.name}.partial-{os.getpid()}")
    try:
        _save(staging, code, weights, example, inputs, outputs, model)
        if output.exists():
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            os.replace(output, old)
            os.replace(staging, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, output)
    finally:
        shutil.rmtree(code.parent, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
    return output


def _save(output, code, weights, example, inputs, outputs, model):
    mlflow.pyfunc.save_model(
        str(output),
        python_model=str(Path(__file__).with_name("_mlflow_code.py")),
        artifacts={MODEL_ARTIFACT: str(weights)},
        code_paths=[str(code)],
        signature=mlflow.models.ModelSignature(inputs=inputs, outputs=outputs),
        input_example=example,
        pip_requirements=RUNTIME_REQUIREMENTS,
        metadata={"napari_sam_version": __version__, "source_model": str(model or weights)},
    )


# A 32 x 32 PNG (a bright square on black) for the input example.
_EXAMPLE_IMAGE = (
    "iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAAAAABWESUoAAAAIUlEQVR42mNgGAUMDAwMjDDGfxwSTIRMGFUwnBSMAggAAFQ1ASChlbCMAAAAAElFTkSuQmCC"
)
_EXAMPLE_RESPONSE = {"predictions": [{"masks_per_prediction": [
    {"encoded_binary_mask": _EXAMPLE_IMAGE, "iou_score": 0.9}]}]}
