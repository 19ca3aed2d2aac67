"""Distance to the limit: AdaRound's time per step on each layer against its FLOP floor.

One optimisation step of a layer runs the layer forward on a batch with the soft
weight ``W~`` and takes the gradient of the loss with respect to ``W~`` only (the
layer's input is data, so no input gradient is needed). The matrix-multiply FLOPs of
that step are counted by ``torch.utils.flop_counter.FlopCounterMode`` while one real
step runs: a conv/linear forward costs 2 x MACs, and its weight gradient costs the
same 2 x MACs again (one GEMM of the same size: ``dW = dY^T X``), so a step costs about
twice the forward. Elementwise work (the rectified sigmoid, the regulariser, Adam on
``V``) is not counted: the floor is what the step cannot avoid. The floor divides those
FLOPs by the best matrix-multiply rate measured with ``torch.mm`` in the same run, at
the same thread setting.

    .venv/bin/python -m bench.flop_floor --bits 4 --steps 100 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from adaround_core.reconstruction.layer_reconstruction import (
    _reconstruction_grad,
    optimise_rounding,
)
from adaround_core.reconstruction.reconstruction_config import AdaRoundConfig
from adaround_core.reconstruction.soft_rounding import SoftRounding
from bench.digits_setup import CALIB_BATCH, LayerCase, calibrated, float_model, layer_cases, machine

MM_SIZES = (256, 384, 512, 768, 1024)


def step_flops(case: LayerCase, batch_size: int) -> dict:
    """Forward and weight-gradient FLOPs of one optimisation step on ``case``."""
    samples, generator = case.samples()
    x, target = samples.sample(batch_size, generator)
    scale, qmin, qmax = case.layer.weight_qparams()
    weight = SoftRounding(case.layer.weight, scale, qmin, qmax).update_soft_weight()
    with FlopCounterMode(display=False) as fwd:
        with torch.enable_grad():
            output = case.layer.forward_with_weight(x, weight)
    with FlopCounterMode(display=False) as total:
        _reconstruction_grad(case.layer, x, target, weight)
    forward = fwd.get_total_flops()
    return {"forward": forward, "backward": total.get_total_flops() - forward,
            "input_shape": list(x.shape), "output_shape": list(output.shape),
            "weight_numel": weight.numel()}


def matmul_rate(repeats: int = 5, sizes: tuple[int, ...] = MM_SIZES) -> dict:
    """Best ``torch.mm`` rate (GFLOP/s) over square sizes, best of ``repeats`` each."""
    rates = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(3):
            torch.mm(a, b)
        calls = max(3, int(4e8 / (2 * n**3)))
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                torch.mm(a, b)
            best = min(best, (time.perf_counter() - start) / calls)
        rates[n] = 2 * n**3 / best / 1e9
    return {"gflops": max(rates.values()), "by_size": rates}


def time_per_step(case: LayerCase, cfg: AdaRoundConfig) -> float:
    """Seconds per step of ``optimise_rounding`` on ``case`` (one run of cfg.num_steps)."""
    samples, generator = case.samples()
    start = time.perf_counter()
    optimise_rounding(case.layer, samples, cfg, generator)
    return (time.perf_counter() - start) / cfg.num_steps


def measure(bits: int, steps: int, repeats: int, seed: int = 0) -> dict:
    """Per layer: FLOPs, floor and measured time per step (repeats interleaved over layers);
    the matmul rate is measured before and after the step timings."""
    model, data = float_model(seed)
    batches = list(data.calib_x.split(CALIB_BATCH))
    cases = layer_cases(calibrated(model, batches, bits), batches)
    cfg = AdaRoundConfig.from_dict({"num_steps": steps, "progress": False})
    rate_before = matmul_rate()
    times: dict[str, list[float]] = {c.name: [] for c in cases}
    for _ in range(repeats):
        for case in cases:
            times[case.name].append(time_per_step(case, cfg))
    rate_after = matmul_rate()
    rate = max(rate_before["gflops"], rate_after["gflops"])
    rows = []
    for case in cases:
        flops = step_flops(case, CALIB_BATCH)
        floor = (flops["forward"] + flops["backward"]) / (rate * 1e9)
        median = statistics.median(times[case.name])
        rows.append({"layer": case.name, **flops, "floor_s": floor, "step_s_median": median,
                     "step_s_min": min(times[case.name]), "times_s": times[case.name],
                     "ratio_median": median / floor, "ratio_min": min(times[case.name]) / floor})
    total = sum(r["step_s_median"] for r in rows)
    for r in rows:
        r["share_of_run"] = r["step_s_median"] / total
    return {"bits": bits, "steps": steps, "repeats": repeats, "threads": torch.get_num_threads(),
            "matmul_gflops": rate, "matmul_before": rate_before, "matmul_after": rate_after,
            "layers": rows}


def format_table(result: dict) -> str:
    """The per-layer table."""
    lines = [f"W{result['bits']}A8, {result['steps']} steps, {result['threads']} thread(s), "
             f"matmul rate {result['matmul_gflops']:.1f} GFLOP/s (best torch.mm, same run); "
             f"median of {result['repeats']} interleaved repeats",
             f"{'layer':<7}{'V size':>8}{'fwd MFLOP':>11}{'bwd MFLOP':>11}{'floor ms':>10}"
             f"{'step ms':>9}{'min ms':>8}{'x floor':>9}{'share':>7}"]
    for r in result["layers"]:
        lines.append(f"{r['layer']:<7}{r['weight_numel']:>8}{r['forward'] / 1e6:>11.2f}"
                     f"{r['backward'] / 1e6:>11.2f}{r['floor_s'] * 1e3:>10.3f}"
                     f"{r['step_s_median'] * 1e3:>9.3f}{r['step_s_min'] * 1e3:>8.3f}"
                     f"{r['ratio_median']:>9.1f}{r['share_of_run'] * 100:>6.0f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (AdaRound's "
                   "default on CPU is 1)")
    p.add_argument("--out", type=Path, default=Path("bench/results/flop_floor.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(args.bits, args.steps, args.repeats)
    result["machine"] = machine()
    print(format_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
