"""Where more threads start to pay: AdaRound step time at 1 thread vs all cores, by layer size.

For Linear and Conv2d layers from tiny (the digits model) to ResNet-18's early layers
at 224 (batch 32, 56x56x64 maps), times the engine's ``optimise_rounding`` per step at
each thread count, interleaved (1, N, 1, N, ...) because the machine is shared, and
prints the median per-step time and the speed-up against the step's FLOPs. The
threshold ``PARALLEL_MIN_STEP_FLOPS`` in ``adaround_core/reconstruction/threads.py`` is
read off this table.

    .venv/bin/python -m bench.bench_threads
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from torch import nn

from adaround_core.reconstruction.reconstruction_config import AdaRoundConfig
from adaround_core.reconstruction.step_flops import step_flops
from adaround_core.reconstruction.threads import AVAILABLE_CPU_THREADS, intra_op_threads
from bench.digits_setup import machine
from bench.layer_case import LayerCase, step_seconds

BATCH = 32
ROWS = 40  # samples per layer (batch drawn with replacement from the training rows)


def layer_specs() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """(name, float module, input row shape), roughly from small to large."""
    convs = [(1, 8, 3, 1, 8), (8, 16, 3, 1, 8), (16, 32, 3, 1, 8), (32, 32, 3, 1, 14),
             (64, 64, 3, 1, 14), (128, 128, 3, 1, 7), (64, 64, 3, 1, 28), (256, 256, 3, 1, 14),
             (3, 64, 7, 2, 112), (64, 64, 3, 1, 56), (3, 64, 7, 2, 224)]
    linears = [(64, 10), (256, 256), (512, 1000), (1024, 1024), (2048, 2048)]
    specs = [(f"lin{i}x{o}", nn.Linear(i, o), (i,)) for i, o in linears]
    specs += [(f"conv{ci}-{co}k{k}s{s}@{hw}", nn.Conv2d(ci, co, k, s, k // 2, bias=False),
               (ci, hw, hw)) for ci, co, k, s, hw in convs]
    return specs


def measure(options: list[int], steps: int, repeats: int) -> list[dict]:
    """Median per-step seconds per layer and thread count."""
    cfg = AdaRoundConfig.from_dict({"num_steps": steps, "progress": False,
                                    "batch_size": BATCH})
    rows = []
    for name, module, row_shape in layer_specs():
        case = LayerCase(name, module, row_shape, ROWS)
        times: dict[int, list[float]] = defaultdict(list)
        for _ in range(repeats):
            for n in options:
                with intra_op_threads(n):
                    times[n] += step_seconds(case, cfg)
        medians = {n: statistics.median(times[n]) for n in options}
        rows.append({"layer": name, "step_flops": step_flops(case.layer, row_shape, BATCH),
                     "median_s": medians, "times_s": dict(times),
                     "speedup": medians[options[0]] / medians[options[-1]]})
        print(_format_row(rows[-1], options), flush=True)
    return rows


def _format_row(r: dict, options: list[int]) -> str:
    times = "".join(f"{r['median_s'][n] * 1e3:>11.3f}" for n in options)
    return f"{r['layer']:<22}{r['step_flops'] / 1e6:>12.2f}{times}{r['speedup']:>9.2f}"


def header(options: list[int]) -> str:
    cols = "".join(f"{f'ms @{n}thr':>11}" for n in options)
    return f"{'layer':<22}{'MFLOP/step':>12}{cols}{'speedup':>9}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, AVAILABLE_CPU_THREADS])
    p.add_argument("--steps", type=int, default=6, help="steps per timed run (first dropped)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved runs per thread count")
    p.add_argument("--out", type=Path, default=Path("bench/results/threads.json"))
    args = p.parse_args(argv)
    env = machine()
    print(f"{env['cpu']}, {env['cpu_count']} CPUs, torch {env['torch']}, load {env['loadavg']}; "
          f"batch {BATCH}, median of {args.repeats} x {args.steps - 1} steps")
    print(header(args.threads))
    rows = measure(args.threads, args.steps, args.repeats)
    env["loadavg_end"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": env, "threads": args.threads, "rows": rows},
                                   indent=1))
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
