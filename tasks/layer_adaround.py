"""AdaRound of one layer from its disk cache, and assembling the rounded checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from safetensors import safe_open

from adaround_core.calibration.layer_samples import LayerSamples
from adaround_core.quant.quant_layers import quant_layers
from adaround_core.reconstruction.layer_reconstruction import layer_generator, reconstruct_layer
from adaround_core.reconstruction.rounding_mode import rounding_mode
from tasks.artifacts import Artifact, LayerResult
from tasks.io import save_tensors, tensor_digest
from tasks.layer_jobs import LayerJob
from tasks.model_state import calibrated_model
from tasks.params import PipelineParams
from tasks.run_logging import run_logger


def read_result(path: Path, name: str) -> LayerResult:
    """A finished layer result (written atomically, so present means complete)."""
    with safe_open(str(path), framework="pt") as f:
        report = json.loads(f.metadata()["report"])
        weight = f.get_tensor("weight")
    return LayerResult(name, str(path), tensor_digest(weight), report, reused=True)


def finished_result(job: LayerJob) -> LayerResult | None:
    """The job's result from an earlier run, or None: a resumed run skips the layer
    (and its activation cache) entirely."""
    path = job.result_path()
    if not path.exists():
        return None
    run_logger(__name__).info("%s: result reused (%s)", job.name, path.name)
    return read_result(path, job.name)


def remove_partial_results(params: PipelineParams) -> int:
    """Delete temporary files a killed run left in ``results/layers`` (call under the
    output lock: no other run writes there); returns how many were removed."""
    removed = 0
    for tmp in (Path(params.runtime.results_dir) / "layers").glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed += 1
    if removed:
        run_logger(__name__).info("removed %d partial result files of an interrupted run",
                                  removed)
    return removed


def _round(job: LayerJob, cache: Artifact) -> dict:
    cfg = job.params.adaround
    model = calibrated_model(job.params, job.dataset, job.float_model, job.calibrated,
                             job.previous)
    layer = quant_layers(model)[job.name]
    generator = layer_generator(cfg.seed, job.name)
    with rounding_mode(model, cfg.num_threads):
        layer.freeze_weight_qparams()
        samples = LayerSamples.from_cache(Path(cache.path), cfg.holdout_fraction, generator,
                                          layer.weight.device)
        report = reconstruct_layer(job.name, layer, samples, cfg, generator)
    return {"weight": layer.weight.detach(), "report": asdict(report)}


@task(retries=1, cache_policy=NO_CACHE)
def adaround_layer(job: LayerJob, cache: Artifact) -> LayerResult:
    """Round one layer (or reuse its finished result) and save the rounded weight.

    The result's digest is that of the rounded weight, not of the file (whose metadata
    holds timings): recomputing a layer to the same weight leaves later layers' keys as
    they were."""
    reused = finished_result(job)
    if reused is not None:
        return reused
    outcome = _round(job, cache)
    save_tensors(job.result_path(), {"weight": outcome["weight"]},
                 metadata={"report": json.dumps(outcome["report"]), "key": job.result_key})
    return LayerResult(job.name, str(job.result_path()), tensor_digest(outcome["weight"]),
                       outcome["report"])


@task(retries=2, retry_delay_seconds=1, cache_policy=NO_CACHE)
def assemble_checkpoint(params: PipelineParams, dataset: Artifact, float_model: Artifact,
                        calibrated: Artifact, results: list[LayerResult], out: str) -> Artifact:
    """The calibrated model with every rounded layer written in, saved to ``out``."""
    model = calibrated_model(params, dataset, float_model, calibrated, results)
    digest = save_tensors(Path(out), model.state_dict())
    return Artifact(out, digest)
