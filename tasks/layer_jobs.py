"""One layer's AdaRound job: what it depends on, its keys, and where its files go.

A job is keyed by the digests of everything its result depends on: the dataset,
the calibrated checkpoint, the config sections involved, the engine's code, the source
of the model's module, and the result of every earlier layer. Change any of them and exactly the jobs that
depend on it get new keys; everything else is reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from adaround_core.calibration.capture_method import ONE_PASS
from adaround_core.reconstruction.distributed import current_group
from adaround_core.reconstruction.threads import AVAILABLE_CPU_THREADS
from tasks.artifacts import Artifact, LayerPlan, LayerResult
from tasks.guard_batches import guards_output, held_out_settings
from tasks.model_state import compute_device
from tasks.params import PipelineParams
from tasks.versioning import code_version, source_digest

# Settings that cannot change a layer's result: the progress bar; which layers are left
# out (a layer's own result does not depend on it, and the layers before it are in
# ``previous``); num_batches (the pipeline always passes every calibration batch).
ROUNDING_KEYS_IGNORED = {"progress", "exclude_prefix", "num_batches"}
KEY_CHARS_IN_NAMES = 24  # hex digits of a key in file and directory names (96 bits)


@dataclass(frozen=True)
class CaptureChain:
    """How a job continues the forward pass of the plan's previous layer (one-pass capture).

    ``order``: every layer of the plan, in rounding order (each task traces the same graph,
    so saved frontiers fit); ``upstream``: the cache key of the plan's previous layer, whose
    task saved the paused passes this one continues ("" for the first layer); ``blocks``:
    the block units in ``order`` (``granularity: block``). None is part of any key: a
    layer's inputs are the same whichever way they are captured."""

    order: tuple[str, ...]
    upstream: str = ""
    blocks: tuple[str, ...] = ()


@dataclass(frozen=True)
class LayerJob:
    """Everything a per-layer task needs, as paths, digests and small values (the models
    are rebuilt from them by :func:`tasks.model_state.layer_models`)."""

    params: PipelineParams
    dataset: Artifact
    float_model: Artifact
    calibrated: Artifact
    name: str
    calls: int
    previous: tuple[LayerResult, ...]
    chain: CaptureChain | None = None  # None: capture with a partial pass per batch
    block: tuple[str, ...] = ()  # granularity block: the layers of the block ``name``
    # the torchrun world size the result is keyed by; None: this process's (gc walks others)
    world_size: int | None = None
    capture_threads: int | None = None  # LayerPlan.capture_threads

    def _digest(self, *extra: object) -> str:
        payload = [self.dataset.digest, self.calibrated.digest, code_version(),
                   source_digest(self.params.model.factory), self.name,
                   self.calls, [r.digest for r in self.previous],
                   self.params.digest("quant", "calibration"),
                   compute_device(self.params).type,  # the GPU's sums differ
                   self._threads(),  # so may sums over other thread counts
                   torch.__version__,  # and those of another torch
                   *([{"block": list(self.block)}] if self.block else []),
                   *extra]
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def _threads(self) -> int | str:
        """``num_threads``, or what decides the automatic choice: the cores it may use."""
        requested = self.params.adaround.num_threads
        return requested if requested is not None else f"auto/{AVAILABLE_CPU_THREADS}"

    @property
    def quantizes_input(self) -> bool:
        """Whether the cache holds the layer's fake-quantized inputs (plain AdaRound) or
        those before its activation fake-quant (``drop_prob`` / ``activation_lr``: the
        unit path quantizes them itself)."""
        return not self.params.adaround.trains_activations

    @property
    def cache_key(self) -> str:
        """Key of the layer's cached activations (with ``guard: output``, of the batches
        that are not held out; unchanged for plain AdaRound's quantized inputs)."""
        held_out = held_out_settings(self.params)
        extra = [held_out] if held_out else []
        if not self.quantizes_input:
            extra.append({"quantize_input": False})
        return self._digest(*extra)

    @property
    def result_key(self) -> str:
        """Key of the layer's rounding result (adds the AdaRound settings)."""
        ignored = ROUNDING_KEYS_IGNORED | ({"guard_batches"} if not guards_output(self.params)
                                           else set())
        rounding = self.params.adaround.model_dump(mode="json", exclude=ignored)
        # torchrun: the sum over the ranks' slices is another sum
        world_size = self.result_world_size
        return self._digest(rounding, *([f"ranks/{world_size}"] if world_size else []))

    @property
    def result_world_size(self) -> int | None:
        """The torchrun world size of :attr:`result_key` (None: one process)."""
        if self.world_size is not None:
            return self.world_size
        ranks = current_group()
        return ranks.world_size if ranks else None

    def cache_dir(self) -> Path:
        return (Path(self.params.runtime.cache_dir) / "activations"
                / f"{self.name}--{self.cache_key[:KEY_CHARS_IN_NAMES]}")

    def frontier_dir(self) -> Path:
        """Where this layer's capture leaves the passes paused at its call, for the next
        layer's task: keyed by this layer's cache key (they depend on the same things)."""
        return (Path(self.params.runtime.cache_dir) / "frontiers"
                / f"{self.name}--{self.cache_key[:KEY_CHARS_IN_NAMES]}")

    def upstream_frontier_dir(self) -> Path | None:
        """The previous layer's :meth:`frontier_dir`, which this layer's capture continues
        from (None for the first layer, or without one-pass capture)."""
        if self.chain is None or not self.chain.upstream or not self.previous:
            return None
        return (Path(self.params.runtime.cache_dir) / "frontiers"
                / f"{self.previous[-1].name}--{self.chain.upstream[:KEY_CHARS_IN_NAMES]}")

    def result_path(self) -> Path:
        return (Path(self.params.runtime.results_dir) / "layers"
                / f"{self.name}--{self.result_key[:KEY_CHARS_IN_NAMES]}.safetensors")


def plan_job(params: PipelineParams, dataset: Artifact, float_model: Artifact,
             calibrated: Artifact, plan: LayerPlan, results: Sequence[LayerResult],
             upstream: LayerJob | None = None, world_size: int | None = None) -> LayerJob:
    """The job of the plan's unit (a layer, or a block) after ``results`` (the earlier units'
    results, in plan order); ``upstream`` is the previous unit's job (None for the first).
    Where the plan found the model segmentable the job continues the previous layer's pass.
    ``world_size`` keys the result as a torchrun run of that size would (for ``gc``)."""
    name = plan.names[len(results)]
    chain = None
    if plan.capture_method == ONE_PASS:
        chain = CaptureChain(tuple(plan.names), upstream.cache_key if upstream else "",
                             tuple(plan.blocks))
    return LayerJob(params, dataset, float_model, calibrated, name, plan.calls[name],
                    tuple(results), chain, plan.blocks.get(name, ()), world_size,
                    plan.capture_threads)
