"""AdaRound of one layer from its disk cache, and assembling the rounded checkpoint."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from adaround_core.calibration.layer_samples import LayerSamples
from adaround_core.calibration.unit_samples import cached_layer_unit_samples
from adaround_core.calibration.unit_store import cached_unit_samples
from adaround_core.quant.quant_layers import quant_layers
from adaround_core.reconstruction.distributed import RankGroup
from adaround_core.reconstruction.layer_reconstruction import layer_generator, reconstruct_layer
from adaround_core.reconstruction.rounding_mode import rounding_mode
from adaround_core.reconstruction.unit_order import reconstruct_layer_unit
from adaround_core.reconstruction.unit_reconstruction import reconstruct_unit
from adaround_core.reconstruction.units import Unit
from tasks.allocator import heap_reuse, reuses_memory
from tasks.artifacts import Artifact, LayerResult
from tasks.data_parallel import announce_layer
from tasks.failures import pipeline_task
from tasks.guard_batches import guarded_layer_model
from tasks.io import save_tensors
from tasks.layer_jobs import LayerJob
from tasks.layer_results import finished_result, write_result
from tasks.model_state import calibrated_model
from tasks.params import PipelineParams
from tasks.result_tensors import snapshot, unit_tensors


def round_layer(job: LayerJob, cache: Artifact, ranks: RankGroup | None = None) -> dict:
    """The result tensors (rounded weights, learned input qparams if any) and report of
    ``job``'s unit (``ranks``: with torchrun's other ranks, each taking its share of every
    batch; nothing is written)."""
    cfg = job.params.adaround
    model, guard = guarded_layer_model(job.params, job.dataset, job.float_model,
                                       job.calibrated, job.previous)
    layers = quant_layers(model)
    before = snapshot(layers, job.block or (job.name,))
    generator = layer_generator(cfg.seed, job.name)
    device = layers[next(iter(before))].weight.device
    with rounding_mode(model, cfg.num_threads), \
            heap_reuse(reuses_memory(job.params.runtime.reuse_freed_memory, "rounding")):
        for name in before:
            layers[name].freeze_weight_qparams()
        if job.block:  # BRECQ: the block's layers jointly, on its cached calls
            samples = cached_unit_samples(Path(cache.path), cfg.holdout_fraction, generator,
                                          device)
            report = reconstruct_unit(Unit(job.name, job.block, is_block=True),
                                      model.get_submodule(job.name), layers, samples, cfg,
                                      generator, output_guard=guard)
        elif cfg.trains_activations:  # the engine's autograd unit path (QDrop, learned scales)
            samples = cached_layer_unit_samples(Path(cache.path), cfg.holdout_fraction,
                                                generator, device)
            report = reconstruct_layer_unit(job.name, layers, samples, cfg, generator,
                                            output_guard=guard)
        else:
            samples = LayerSamples.from_cache(Path(cache.path), cfg.holdout_fraction,
                                              generator, device)
            report = reconstruct_layer(job.name, layers[job.name], samples, cfg, generator,
                                       output_guard=guard, ranks=ranks)
    return {"tensors": unit_tensors(layers, before, bool(job.block)), "report": asdict(report)}


@pipeline_task(retries=1)
def adaround_layer(job: LayerJob, cache: Artifact) -> LayerResult:
    """Round one layer (or reuse its finished result) and save the rounded weight (and
    learned input qparams).

    The result's digest is that of its tensors, not of the file (whose metadata holds
    timings): recomputing a layer to the same weight leaves later layers' keys as they
    were."""
    reused = finished_result(job)
    if reused is not None:
        return reused
    outcome = round_layer(job, cache, announce_layer(job, cache))
    return write_result(job, outcome["tensors"], outcome["report"])


@pipeline_task(retries=2, retry_delay_seconds=1)
def assemble_checkpoint(params: PipelineParams, dataset: Artifact, float_model: Artifact,
                        calibrated: Artifact, results: list[LayerResult], out: str) -> Artifact:
    """The calibrated model with every rounded layer written in, saved to ``out``."""
    model = calibrated_model(params, dataset, float_model, calibrated, results)
    digest = save_tensors(Path(out), model.state_dict())
    return Artifact(out, digest)
