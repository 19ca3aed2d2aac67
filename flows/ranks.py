"""``torchrun ... -m flows <stage>``: the pipeline's command on each of several ranks.

Rank 0 runs the stage as ``python -m flows`` does; the other ranks join it only to round
layers (:mod:`tasks.data_parallel`). Every rank first checks that all got the same params.
"""

from __future__ import annotations

import os
from collections.abc import Callable


def launched_by_torchrun() -> bool:
    """Several ranks were started (``WORLD_SIZE`` > 1); read without importing torch."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def run_on_ranks(params, run_stage: Callable[[], int]) -> int:
    """``run_stage()`` on rank 0, the layer service on the other ranks."""
    from adaround_core.reconstruction.distributed import leave
    from tasks.data_parallel import join_pipeline_ranks, leading_ranks, serve_layers
    from tasks.layer_adaround import round_layer

    try:
        group = join_pipeline_ranks(params)
        if group is None:  # a launcher that set WORLD_SIZE but no process group: one process
            return run_stage()
        if group.rank > 0:
            serve_layers(group, round_layer)
            return 0
        with leading_ranks(group):
            return run_stage()
    finally:
        leave()  # also after a failure: an open group aborts the process at exit
