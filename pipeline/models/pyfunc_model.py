"""The code MLflow logs with every registered restorer and runs to load it ("models from
code"): the pyfunc object is built here at load time, never unpickled (pipeline/models/pyfunc.py)."""

import mlflow

from pipeline.models.pyfunc import RestorerPyfunc

mlflow.models.set_model(RestorerPyfunc())
