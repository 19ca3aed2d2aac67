"""Prefect tasks of the AdaRound pipeline, and the plain functions they call."""

import os

# MLflow's telemetry cannot reach the internet here, and it delays the exit of every
# process that imported mlflow by ~2 s. The environment still wins.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
