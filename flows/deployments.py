"""Flows that the deployments of ``prefect.yaml`` run on a process work pool's workers.

    prefect work-pool create adaround --type process       # once per Prefect server
    prefect deploy --all --no-prompt                       # in the project directory
    prefect worker start --pool adaround                   # with the project's venv
    prefect deployment run adaround-nightly/nightly -p 'overrides=["adaround.num_steps=500"]'

The nightly deployment runs ``flows/schedule.py:nightly_pipeline`` (the flow ``serve``
serves on one machine); the sweep deployment runs :func:`sweep_deployment`. Both read
the params file at run time, relative to the project directory the deployment's pull
step enters, and take ``overrides`` (``section.key=value``) on top of it.
"""

from __future__ import annotations

from prefect import flow

from flows.schedule import scheduled_params

SWEEP_FLOW = "adaround-variants"


@flow(persist_result=False, name=SWEEP_FLOW)
def sweep_deployment(params_file: str = "params.yaml", overrides: list[str] | None = None,
                     variants: list[str] | None = None) -> dict:
    """``python -m flows sweep`` as a deployment: each entry of ``variants`` is one
    variant's comma-separated overrides (``"quant.weight_bits=2,adaround.num_steps=50"``);
    returns the metrics by variant."""
    from flows.sweep import run_sweep  # late: the worker imports entrypoints to load them

    return run_sweep(scheduled_params(params_file, overrides), list(variants or []))
