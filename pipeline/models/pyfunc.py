"""The restorer as an MLflow pyfunc model: safetensors weights as artifacts, sampler in code.

MLflow 3's default PyTorch serialisation (torch.export) does not survive a sampler with Python
control flow, so the registered model is the diffusers folder behind a small pyfunc wrapper:
`mlflow.pyfunc.load_model("models:/restorer@champion").predict(batch)` restores images. The
model is logged from code (pipeline/models/pyfunc_model.py), not pickled.
Its default sampling is the one the model was evaluated and promoted with (`evaluate.sampling`
and `runtime.seed` of the run that registered it): the defaults of the signature's params,
which MLflow fills in for every parameter a caller leaves out.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import mlflow
import numpy as np
import torch

# "" = no task given (MLflow's params schema has no None). log_restorer replaces these with
# the evaluated settings.
SAMPLING_DEFAULTS = {"steps": 10, "eta": 0.0, "seed": 0, "task": "", "samples": 1}


class RestorerPyfunc(mlflow.pyfunc.PythonModel):
    """predict(batch, params={"task": ...}): float array (N, H, W, 3) in [0, 1] (or uint8) ->
    restored float array. A task-conditioned restorer needs the degradation task; without one,
    its only task is used when it has just one."""

    def load_context(self, context) -> None:
        from pipeline.models.loading import load_restorer

        self.model = load_restorer(Path(context.artifacts["restorer"])).eval()

    # np.ndarray: what MLflow passes under the tensor signature (`signature`); a hint MLflow
    # does not infer a schema from, so it stops advising one.
    def predict(self, context, model_input: np.ndarray, params=None):
        from pipeline.seeding import batch_generator

        opts = {**SAMPLING_DEFAULTS, **(params or {})}
        batch = np.asarray(model_input)
        if batch.ndim == 3:
            batch = batch[None]
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"expected images of shape (N, H, W, 3), got {batch.shape}")
        scale = 255.0 if batch.dtype == np.uint8 else 1.0  # uint8 when called without MLflow
        cond = torch.from_numpy(batch.astype(np.float32) / scale).permute(0, 3, 1, 2) * 2 - 1
        generator = batch_generator(int(opts["seed"]), 0)  # the noise of evaluate's first batch
        task = opts["task"] or None
        if task is None and self.model.tasks and len(self.model.tasks) == 1:
            task = self.model.tasks[0]
        tasks = [task] * len(cond) if self.model.tasks and task else None
        if self.model.tasks and not tasks:
            raise ValueError(f"this restorer is task-conditioned: name the task with params={{'task': ...}}, "
                             f"one of {self.model.tasks}")
        image = self.model.restore(cond.to(self.model.device), int(opts["steps"]), float(opts["eta"]), generator,
                                   tasks=tasks, samples=int(opts["samples"]))
        return ((image.cpu() + 1) / 2).permute(0, 2, 3, 1).numpy()


def signature(defaults: dict):
    """Float32 (N, H, W, 3) in [0, 1] of any size in and out; the sampling options as params
    (MLflow passes `params` to predict only when the signature declares them), whose defaults
    are `defaults`."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    images = Schema([TensorSpec(np.dtype(np.float32), (-1, -1, -1, 3))])
    kinds = {int: "integer", float: "double", str: "string"}
    return ModelSignature(inputs=images, outputs=images, params=ParamSchema(
        [ParamSpec(name, kinds[type(SAMPLING_DEFAULTS[name])], type(SAMPLING_DEFAULTS[name])(value))
         for name, value in defaults.items()]))


MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")  # builds the RestorerPyfunc MLflow loads


def log_restorer(checkpoint: Path, registered_model_name: str | None = None, sampling: dict | None = None):
    """Log `checkpoint` with `sampling` (steps, eta, samples, seed: what it was evaluated with)
    as the defaults of its sampling params."""
    import diffusers

    with warnings.catch_warnings():  # MLflow advises an input example; the signature is explicit
        warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
        return mlflow.pyfunc.log_model(
            # Models from code: MLflow stores MODEL_CODE and runs it at load time, instead of
            # pickling the object with CloudPickle (which runs arbitrary code when unpickled).
            name="restorer", python_model=str(MODEL_CODE), artifacts={"restorer": str(checkpoint)},
            registered_model_name=registered_model_name, signature=signature(SAMPLING_DEFAULTS | (sampling or {})),
            # Explicit requirements: inferring them imports and inspects the whole environment.
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"diffusers=={diffusers.__version__}",
                              f"mlflow=={mlflow.__version__}", "restorl"],
        )
