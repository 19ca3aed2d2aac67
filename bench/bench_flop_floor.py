"""Per-layer AdaRound step time against the FLOP floor of the machine, on a ResNet-18 stack.

The floor of a layer's step is its FLOPs (forward + weight gradient on one batch,
``adaround_core.reconstruction.step_flops``) divided by the machine's rate with all
cores: the best of a large GEMM (``torch.mm``) and a ResNet-ish convolution forward +
weight gradient, median of repeats, measured before and after the layer timings. Each
layer then runs the engine's own ``reconstruct_layer`` for a few steps on synthetic
samples of its input shape; the step time is the median over steps (the first of each
run dropped) and interleaved repeats. Prints, per layer: FLOPs/step, floor, measured
step, ratio, threads chosen; and the share of FLOPs in layers within 2x of the floor.

    .venv/bin/python -m bench.bench_flop_floor                # ResNet-18 at 224, batch 32
    .venv/bin/python -m bench.bench_flop_floor --size 112 --modes auto 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from adaround_core.reconstruction.layer_reconstruction import reconstruct_layer
from adaround_core.reconstruction.reconstruction_config import AdaRoundConfig
from adaround_core.reconstruction.threads import AVAILABLE_CPU_THREADS, intra_op_threads
from bench.digits_setup import machine
from bench.layer_case import LayerCase
from bench.resnet_like import ResNet18Like, layer_row_shapes

BATCH = 32
ROWS = 16  # samples per layer; the batch is drawn with replacement
WITHIN = 2.0  # the target: step time within this factor of the floor
FLOP_SHARE = 0.9  # ... for the layers that hold this share of the FLOPs
GEMM_SIZE = 2048
RATE_CONV = (32, 64, 56)  # batch, channels, map size of the ResNet-ish 3x3 convolution


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, kernel selection
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_rate(repeats: int) -> float:
    """FLOP/s of a ``GEMM_SIZE`` square ``torch.mm``."""
    a, b = torch.randn(GEMM_SIZE, GEMM_SIZE), torch.randn(GEMM_SIZE, GEMM_SIZE)
    return 2 * GEMM_SIZE**3 / _median_seconds(lambda: torch.mm(a, b), repeats)


def conv_rate(repeats: int) -> float:
    """FLOP/s of a 3x3 convolution forward + weight gradient (an AdaRound step's GEMMs)."""
    n, c, hw = RATE_CONV
    x, w = torch.randn(n, c, hw, hw), torch.randn(c, c, 3, 3)

    def step() -> None:
        y = F.conv2d(x, w, padding=1)
        torch.ops.aten.convolution_backward(y, x, w, None, [1, 1], [1, 1], [1, 1], False,
                                            [0, 0], 1, [False, True, False])

    return 2 * 2 * n * hw * hw * c * c * 9 / _median_seconds(step, repeats)


def machine_rates(repeats: int) -> dict:
    """GEMM and convolution rates with all available cores."""
    with intra_op_threads(AVAILABLE_CPU_THREADS):
        return {"gemm": gemm_rate(repeats), "conv": conv_rate(repeats)}


def layer_cases(size: int) -> list[LayerCase]:
    torch.manual_seed(0)
    model = ResNet18Like()
    return [LayerCase(name, copy.deepcopy(layer), shape, ROWS)
            for name, layer, shape in layer_row_shapes(model, size)]


def time_layer(case: LayerCase, cfg: AdaRoundConfig) -> tuple[list[float], object]:
    """Per-step seconds (first step dropped) of one ``reconstruct_layer`` run, and its report."""
    samples, generator = case.samples()
    stamps = [time.perf_counter()]
    with intra_op_threads(1):  # what rounding_mode sets around every layer on CPU
        report = reconstruct_layer(case.name, case.layer, samples, cfg, generator,
                                   on_step=lambda _: stamps.append(time.perf_counter()))
    return [b - a for a, b in zip(stamps[1:-1], stamps[2:], strict=True)], report


def measure(size: int, modes: list[str], steps: int, repeats: int) -> dict:
    cases = layer_cases(size)
    configs = {m: AdaRoundConfig.from_dict({
        "num_steps": steps, "batch_size": BATCH, "progress": False,
        "num_threads": None if m == "auto" else int(m)}) for m in modes}
    rates = [machine_rates(repeats)]
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    reports = {}
    for _ in range(repeats):
        for case in cases:
            for mode, cfg in configs.items():
                step_times, reports[(mode, case.name)] = time_layer(case, cfg)
                times[(mode, case.name)] += step_times
    rates.append(machine_rates(repeats))
    rate = max(max(r.values()) for r in rates)
    tables = {m: _rows(cases, m, times, reports, rate) for m in modes}
    return {"size": size, "batch": BATCH, "steps": steps, "repeats": repeats,
            "rates_before_after": rates, "floor_rate": rate, "tables": tables}


def _rows(cases, mode, times, reports, rate) -> list[dict]:
    rows = []
    for case in cases:
        report = reports[(mode, case.name)]
        step = statistics.median(times[(mode, case.name)])
        floor = report.step_flops / rate
        rows.append({"layer": case.name, "step_flops": report.step_flops,
                     "threads": report.threads, "floor_s": floor, "step_s": step,
                     "ratio": step / floor, "times_s": times[(mode, case.name)]})
    return rows


def summary(rows: list[dict]) -> dict:
    """Share of FLOPs within WITHIN x of the floor, and whether the layers holding
    FLOP_SHARE of the FLOPs (largest first) all are."""
    total = sum(r["step_flops"] for r in rows)
    within = sum(r["step_flops"] for r in rows if r["ratio"] <= WITHIN) / total
    top, held = [], 0
    for r in sorted(rows, key=lambda r: -r["step_flops"]):
        if held >= FLOP_SHARE * total:
            break
        top.append(r)
        held += r["step_flops"]
    worst = max(r["ratio"] for r in top)
    return {"share_within": within, "top_layers": len(top), "top_worst_ratio": worst,
            "total_step_s": sum(r["step_s"] for r in rows),
            "total_floor_s": sum(r["floor_s"] for r in rows)}


def format_table(mode: str, rows: list[dict]) -> str:
    s = summary(rows)
    lines = [f"num_threads={mode}",
             f"{'layer':<22}{'GFLOP/step':>11}{'thr':>4}{'floor ms':>10}{'step ms':>10}"
             f"{'x floor':>9}"]
    for r in rows:
        lines.append(f"{r['layer']:<22}{r['step_flops'] / 1e9:>11.3f}{r['threads']:>4}"
                     f"{r['floor_s'] * 1e3:>10.2f}{r['step_s'] * 1e3:>10.2f}{r['ratio']:>9.2f}")
    lines.append(f"{'all layers':<22}{sum(r['step_flops'] for r in rows) / 1e9:>11.3f}{'':>4}"
                 f"{s['total_floor_s'] * 1e3:>10.2f}{s['total_step_s'] * 1e3:>10.2f}"
                 f"{s['total_step_s'] / s['total_floor_s']:>9.2f}")
    lines.append(f"FLOPs in layers within {WITHIN:g}x of the floor: {s['share_within']:.1%}; "
                 f"the {s['top_layers']} largest layers ({FLOP_SHARE:.0%} of the FLOPs): worst "
                 f"{s['top_worst_ratio']:.2f}x -> {'PASS' if s['top_worst_ratio'] <= WITHIN else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=224, help="input image size")
    p.add_argument("--modes", nargs="+", default=["auto"],
                   help="num_threads values, interleaved per layer ('auto': the engine's choice)")
    p.add_argument("--steps", type=int, default=3, help="steps per reconstruct_layer run")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per layer and mode")
    p.add_argument("--out", type=Path, default=Path("bench/results/flop_floor_resnet18.json"))
    args = p.parse_args(argv)
    env = machine()
    result = measure(args.size, args.modes, args.steps, args.repeats)
    env["loadavg_end"] = os.getloadavg()
    r0, r1 = result["rates_before_after"]
    print(f"{env['cpu']}, {env['cpu_count']} CPUs ({AVAILABLE_CPU_THREADS} threads available), "
          f"torch {env['torch']}, load {env['loadavg']} -> {env['loadavg_end']}")
    print(f"ResNet-18 stack at {args.size}, batch {BATCH}; rates with all cores, GFLOP/s: "
          f"GEMM {r0['gemm'] / 1e9:.1f} / {r1['gemm'] / 1e9:.1f}, conv fwd+wgrad "
          f"{r0['conv'] / 1e9:.1f} / {r1['conv'] / 1e9:.1f} (before / after); floor at "
          f"{result['floor_rate'] / 1e9:.1f}; median of {args.repeats} x {args.steps - 1} steps")
    for mode, rows in result["tables"].items():
        print()
        print(format_table(mode, rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": env, **result}, indent=1))
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
