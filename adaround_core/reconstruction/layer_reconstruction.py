"""AdaRound for one layer: learn up/down rounding, judge it on held-out samples, write it.

This is the one implementation of the per-layer algorithm: the in-memory
``weight_reconstruction`` and the pipeline's per-layer task both call
:func:`reconstruct_layer`.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from adaround_core.calibration.layer_samples import LayerSamples
from adaround_core.quant.quant_layers import QuantLayerMixin
from adaround_core.quant.quant_math import fake_quantize
from adaround_core.reconstruction.adaround_math import beta_at
from adaround_core.reconstruction.distributed import RankGroup
from adaround_core.reconstruction.output_guard import ADAROUND, OutputGuard, decide
from adaround_core.reconstruction.reconstruction_config import AdaRoundConfig
from adaround_core.reconstruction.soft_rounding import FusedAdam, SoftRounding
from adaround_core.reconstruction.step_flops import step_flops
from adaround_core.reconstruction.threads import intra_op_threads, layer_threads
from adaround_core.reconstruction.unit_state import LEARNED, NEAREST, UnitState

logger = logging.getLogger(__name__)

# Multiplies the seed in a layer's random stream (a prime, larger than any realistic seed
# difference), so that seed s of one layer and seed s + 1 of another rarely coincide.
SEED_STRIDE = 1_000_003


def layer_generator(seed: int, name: str) -> torch.Generator:
    """Random source of one layer, fixed by the seed and the layer's name alone, so a
    layer's result does not depend on which layers ran before it in this process."""
    return torch.Generator().manual_seed(seed * SEED_STRIDE + zlib.crc32(name.encode()))


@dataclass(frozen=True)
class LayerReport:
    """Outcome of AdaRound on one layer (errors are output MSE on held-out samples: the
    layer's, and with ``guard: output`` the model's)."""

    name: str
    nearest_mse: float
    adaround_mse: float
    decision: str  # "adaround", "nearest(layer)" or "nearest(output)": which guard kept nearest
    num_steps: int
    seconds: float
    threads: int = 1  # torch intra-op threads the layer was rounded with
    step_flops: int = 0  # FLOPs of one step (forward + weight gradient on one batch)
    nearest_output_mse: float | None = None  # the model's output error (guard: output only)
    adaround_output_mse: float | None = None
    layers: tuple[str, ...] = ()  # the layers a block unit rounded jointly (empty: just this one)

    @property
    def kept_nearest(self) -> bool:
        return self.decision != ADAROUND


def optimise_rounding(layer: QuantLayerMixin, samples: LayerSamples, cfg: AdaRoundConfig,
                      generator: torch.Generator,
                      on_step: Callable[[int], None] | None = None,
                      ranks: RankGroup | None = None) -> torch.Tensor:
    """Run ``cfg.num_steps`` Adam steps on the rounding variable ``V``; return the hard weight.

    The loss is that of ``docs/weight_reconstruction.md`` (``adaround_math.reconstruction_loss`` plus ``cfg.weight``
    times ``adaround_math.rounding_regularizer``); its gradient is taken by hand
    (:class:`SoftRounding`), with autograd only through the layer itself. With ``ranks``
    (data-parallel, :mod:`~.distributed`) each rank takes its slice of every batch and the
    slices' gradients are summed across the ranks before the step.
    """
    scale, qmin, qmax = layer.weight_qparams()
    rounding = SoftRounding(layer.weight, scale, qmin, qmax)
    adam = FusedAdam(rounding.v, cfg.lr)
    batch_size = cfg.batch_size or samples.default_batch_size
    part, world = None, 1
    if ranks is not None:
        source = "batch_size" if cfg.batch_size else "the calibration batch size " \
            "(batch_size is None)"
        ranks.check_divides(batch_size, source, "batch_size")
        part, world = ranks.part(batch_size), ranks.world_size
    betas = [beta_at(step, cfg.num_steps, cfg.warm_up, cfg.b_range)
             for step in range(cfg.num_steps)]
    draws = samples.draws(cfg.num_steps, batch_size, generator, part)
    for step, (beta, (x, target)) in enumerate(zip(betas, draws, strict=True)):
        grad_weight = _reconstruction_grad(layer, x, target, rounding.update_soft_weight(), world)
        if ranks is not None:
            ranks.all_reduce_sum(grad_weight, f"step {step} of AdaRound")
        adam.step(rounding.grad_v(grad_weight, cfg.weight, beta))
        if on_step is not None:
            on_step(step)
    return rounding.hard_weight()


def _reconstruction_grad(layer: QuantLayerMixin, x: torch.Tensor, target: torch.Tensor,
                         weight: torch.Tensor, world: int = 1) -> torch.Tensor:
    """``d reconstruction_loss / d weight`` of the layer's output on ``x``.

    The loss is a squared error summed over output channels and averaged over the
    other ``n`` positions, so ``dL/d output = 2 (output - target) / n``; ``x`` is one of
    ``world`` equal slices of the batch, whose ``n`` is ``world`` times that of ``x``."""
    output, backward = layer.weight_vjp(x, weight)
    with torch.no_grad():
        n = output.numel() // output.shape[layer.output_channel_dim] * world
        return backward(output.sub_(target).mul_(2.0 / n))


def nearest_weight(layer: QuantLayerMixin) -> torch.Tensor:
    """The layer's weight rounded to nearest on its frozen grid."""
    fq = layer.weight_fake_quant
    return fake_quantize(layer.weight.detach(), fq.scale, fq.zero_point, fq.qmin, fq.qmax,
                         layer.weight_axis)


@torch.no_grad()
def holdout_mse(layer: QuantLayerMixin, weight: torch.Tensor, samples: LayerSamples) -> float:
    """Mean squared output error of ``layer`` with ``weight`` on the held-out samples."""
    total, count = 0.0, 0
    for x, target in samples.holdout():
        total += (layer.forward_with_weight(x, weight) - target).pow(2).sum().item()
        count += target.numel()
    return total / max(count, 1)


def expected_step_flops(layer: QuantLayerMixin, samples: LayerSamples, batch_size: int) -> int:
    """FLOPs of one step, averaged over the row shapes as often as each is drawn."""
    shapes = samples.train_row_shapes()
    total = sum(count for _, count in shapes)
    return round(sum(step_flops(layer, shape, batch_size) * count
                     for shape, count in shapes) / max(total, 1))


def reconstruct_layer(name: str, layer: QuantLayerMixin, samples: LayerSamples,
                      cfg: AdaRoundConfig, generator: torch.Generator,
                      on_step: Callable[[int], None] | None = None,
                      output_guard: OutputGuard | None = None,
                      ranks: RankGroup | None = None) -> LayerReport:
    """AdaRound ``layer`` in place (its weight scale must be frozen) and report the outcome.

    Runs with the layer's own thread count (:func:`~.threads.layer_threads` of its step
    FLOPs, or ``cfg.num_threads``); the previous setting is restored afterwards. With
    ``guard: output``, ``output_guard`` judges the rounding on the model's output (with the
    model's thread count). With ``ranks`` every rank optimises its share of each batch,
    judges the (identical) result on all held-out samples and leaves the layer as every
    other rank does."""
    start = time.perf_counter()
    flops = expected_step_flops(layer, samples, cfg.batch_size or samples.default_batch_size)
    threads = layer_threads(cfg.num_threads, layer.weight.device, flops)
    with intra_op_threads(threads):
        nearest = nearest_weight(layer)
        rounded = optimise_rounding(layer, samples, cfg, generator, on_step, ranks)
        nearest_err = holdout_mse(layer, nearest, samples)
        adaround_err = holdout_mse(layer, rounded, samples)
    state = UnitState()
    state.add(layer.weight, nearest, rounded)
    output_errs = output_guard.compare(state) if output_guard else None
    decision = decide(cfg.guard, (nearest_err, adaround_err), output_errs)
    if ranks is not None:  # no rank moves on (e.g. removes the samples) before all are done
        ranks.barrier(f"the end of layer {name}")
    state.write(LEARNED if decision == ADAROUND else NEAREST)
    report = LayerReport(name, nearest_err, adaround_err, decision, cfg.num_steps,
                         time.perf_counter() - start, threads, flops,
                         *(output_errs or (None, None)))
    logger.info("%s: output MSE nearest %.4g, adaround %.4g%s -> %s (%.2fs, %d thread(s), "
                "%.3g FLOP/step)", name, nearest_err, adaround_err, model_errors(output_errs),
                report.decision, report.seconds, threads, flops)
    return report


def model_errors(errors: tuple[float, float] | None) -> str:
    return "" if errors is None else f"; model output MSE nearest {errors[0]:.4g}, " \
                                     f"adaround {errors[1]:.4g}"
