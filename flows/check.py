"""``python -m flows check``: everything that can be checked without running the model.

It is the first stage of ``dvc.yaml``, and every other stage depends on its output, so a
bad setting stops ``dvc repro`` / ``dvc exp run`` before DVC removes any stage's outputs.
"""

from __future__ import annotations

from tasks.io import write_json
from tasks.layout import Layout
from tasks.params import PipelineParams
from tasks.preflight import preflight

STAMP = {"checked": True}  # constant: a passed check never makes a later stage rerun


def check_everything(params: PipelineParams) -> str:
    """Run every stage's preflight; write the stamp; return a one-line summary."""
    preflight(params, "data")
    layout = Layout(params)
    write_json(layout.check_stamp, STAMP)
    tracking = "MLflow store answers" if params.tracking.enabled else "tracking off"
    return (f"check: params, callables, model.pretrained, runtime dirs, device "
            f"{params.runtime.device} and {tracking}: all good")
