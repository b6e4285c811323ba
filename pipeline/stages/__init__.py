"""The pipeline stages: one module per `restorl` command that dvc.yaml runs, each with one entry function `run`."""
