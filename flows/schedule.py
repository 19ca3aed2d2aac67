"""The nightly schedule: serve the pipeline on a cron against a Prefect server.

    prefect server start                                   # once, in another terminal
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows serve --cron "0 2 * * *"               # 02:00 every night; Ctrl-C stops

``serve`` registers the deployment ``adaround-nightly/<name>`` with the cron schedule
and executes its runs (scheduled or triggered by ``prefect deployment run
adaround-nightly/nightly``) until stopped. Each run reads the params file afresh, so
tonight's run uses tonight's ``params.yaml``; finished layers are reused as in any run.
A temporary Prefect server cannot hold a schedule: ``PREFECT_API_URL`` must name a
running server.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.runtime import anchored, make_task_runner
from tasks.params import PreflightError, load_params

DEPLOYMENT_FLOW = "adaround-nightly"


def scheduled_params(params_file: str, overrides: list[str] | None = None):
    """The params of a scheduled run: the file as it is now, the overrides, and relative
    runtime dirs anchored at the file's directory (a run's working dir is not ours)."""
    path = Path(params_file)
    return anchored(load_params(path, overrides or ()), path.resolve().parent)


@flow(persist_result=False, name=DEPLOYMENT_FLOW)
def nightly_pipeline(params_file: str, overrides: list[str] | None = None) -> dict:
    """The whole pipeline with the params file read at run time; returns the metrics."""
    # Imported at run time: the runner ships this function by value, and a flow shipped
    # along with it would lose the module globals its type hints need (PipelineParams).
    from flows.pipeline import pipeline_flow

    params = scheduled_params(params_file, overrides)
    return pipeline_flow.with_options(task_runner=make_task_runner(params))(params)


def require_server() -> str:
    """``PREFECT_API_URL``; a clear error when none is set (schedules need a server)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise PreflightError("scheduling needs a running Prefect server: start one with "
                           "`prefect server start` and set PREFECT_API_URL (e.g. "
                           "http://127.0.0.1:4200/api); the temporary server of a plain "
                           "`python -m flows run` cannot hold a schedule")
    return url


def serve(params_file: str, overrides: list[str], cron: str, name: str = "nightly") -> None:
    """Register ``adaround-nightly/<name>`` on ``cron`` and run its flow runs until stopped."""
    require_server()
    params_file = str(Path(params_file).resolve())
    scheduled_params(params_file, overrides)  # a bad params file fails now, not at 02:00
    nightly_pipeline.serve(
        name=name, cron=cron, parameters={"params_file": params_file, "overrides": overrides},
        description=f"AdaRound pipeline on {params_file}", tags=["adaround"])
