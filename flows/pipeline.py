"""The whole chain as one flow: data -> train -> calibrate -> adaround -> evaluate."""

from __future__ import annotations

from prefect import flow

from flows.runtime import make_task_runner, output_lock
from flows.stages import (
    adaround_flow,
    calibrate_flow,
    data_flow,
    evaluate_flow,
    export_flow,
    train_flow,
)
from tasks.params import PipelineParams
from tasks.preflight import preflight

STAGES = {
    "data": data_flow,
    "train": train_flow,
    "calibrate": calibrate_flow,
    "adaround": adaround_flow,
    "export": export_flow,
    "evaluate": evaluate_flow,
}


@flow(persist_result=False, name="adaround-pipeline")
def pipeline_flow(params: PipelineParams) -> dict:
    """Run every stage in order in one process; returns the metrics."""
    preflight(params)  # a bad callable or an unreachable MLflow store fails before any work
    with output_lock(params):
        for stage in ("data", "train", "calibrate", "adaround", "export"):
            STAGES[stage](params)
        return evaluate_flow(params)


def run_stage(stage: str, params: PipelineParams):
    """Run one stage (or ``run`` for the whole chain) with the configured task runner."""
    target = pipeline_flow if stage == "run" else STAGES[stage]
    return target.with_options(task_runner=make_task_runner(params))(params)
