"""The pipeline under ``torchrun``: rank 0 runs the stages, the other ranks help round.

Rank 0 alone runs Prefect, takes the output lock, captures activations, reuses finished
layers and writes every result. For each layer it computes, it sends the layer's job to
the other ranks, which rebuild the model from the files rank 0 wrote (the checkpoints and
the earlier layers' results), read the layer's activation cache and take their share of
every batch (:mod:`adaround_core.reconstruction.distributed`). Caches and results must
thus be on a file system every rank sees at the same path (one machine, or NFS).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

from adaround_core.reconstruction.distributed import (
    RankGroup,
    RankLostError,
    check_same_settings,
    current_group,
    join,
)
from tasks.artifacts import Artifact
from tasks.layer_jobs import LayerJob
from tasks.model_state import compute_device
from tasks.params import PipelineParams, PreflightError

logger = logging.getLogger(__name__)
NO_MORE_LAYERS = None  # what rank 0 sends when the run is over


def join_pipeline_ranks(params: PipelineParams) -> RankGroup | None:
    """Join torchrun's process group (None outside torchrun) and check, on every rank, that
    all ranks run the same params and that the AdaRound batch splits evenly across them."""
    group = join(compute_device(params))
    if group is None:
        return None
    check_same_settings(group, params.flat(), "params")
    check_data_parallel_settings(params)
    if params.runtime.task_runner != "threads":
        raise PreflightError("params.yaml: runtime.task_runner: under torchrun the layers are "
                             "rounded by the ranks; set it to threads")
    check_batch_divides(group, params)
    return group


def check_data_parallel_settings(params: PipelineParams) -> None:
    """Block reconstruction, QDrop and learned scales run in one process only."""
    for key, value in params.adaround.single_process_settings.items():
        raise PreflightError(f"params.yaml: adaround.{key}: {value!r} does not run under "
                             f"torchrun (only layer-wise AdaRound without drop_prob / "
                             f"activation_lr runs data-parallel); run it in one process")


def check_batch_divides(group: RankGroup, params: PipelineParams) -> None:
    """The AdaRound batch (``adaround.batch_size``, else the calibration batch) splits into
    equal shares for the ranks."""
    if params.adaround.batch_size:
        group.check_divides(params.adaround.batch_size, "adaround.batch_size",
                            "adaround.batch_size")
    else:
        group.check_divides(params.calibration.batch_size,
                            "calibration.batch_size (adaround.batch_size is null)",
                            "adaround.batch_size")


def announce_layer(job: LayerJob, cache: Artifact) -> RankGroup | None:
    """On rank 0: send the layer about to be rounded to the other ranks; returns the group
    to round it with (None outside torchrun)."""
    group = current_group()
    if group is not None:
        group.broadcast((job, cache), f"the start of layer {job.name}")
    return group


@contextlib.contextmanager
def leading_ranks(group: RankGroup) -> Iterator[None]:
    """On rank 0: run the block, then tell the other ranks the run is over (also when it
    failed, so they exit instead of waiting)."""
    try:
        yield
    finally:
        with contextlib.suppress(RankLostError):
            group.broadcast(NO_MORE_LAYERS, "the end of the run")


def serve_layers(group: RankGroup,
                 round_layer: Callable[[LayerJob, Artifact, RankGroup], object]) -> int:
    """On the other ranks: round each layer rank 0 sends, until it says the run is over;
    returns how many layers were rounded."""
    count = 0
    while (work := group.broadcast(NO_MORE_LAYERS, "the wait for rank 0's next layer")) \
            is not NO_MORE_LAYERS:
        job, cache = work
        round_layer(job, cache, group)
        count += 1
    logger.info("rank %d: helped round %d layers", group.rank, count)
    return count
