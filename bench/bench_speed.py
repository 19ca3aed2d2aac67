"""Speed of AdaRound's optimisation loop, before and after the speed work, in one run.

"before" is the autograd loop kept in ``bench/speed_baseline.py``; "after" is the
engine's ``optimise_rounding``. Both run on the same calibrated DigitsCNN layers with
the same samples, interleaved (before, after, before, after, ...) with repeats, because
the machine is shared and timings drift. Prints per-layer time per step, the end-to-end
``weight_reconstruction`` wall time, and a per-step breakdown of the new loop.

    .venv/bin/python -m bench.bench_speed
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

from adaround_core import quantization as q
from adaround_core.reconstruction import layer_reconstruction
from adaround_core.reconstruction.adaround_math import beta_at
from adaround_core.reconstruction.layer_reconstruction import optimise_rounding
from adaround_core.reconstruction.reconstruction_config import AdaRoundConfig
from adaround_core.reconstruction.soft_rounding import FusedAdam, SoftRounding
from bench.digits_setup import CALIB_BATCH, LayerCase, calibrated, float_model, layer_cases, machine
from bench.speed_baseline import optimise_rounding_autograd

LOOPS: dict[str, Callable] = {"before": optimise_rounding_autograd, "after": optimise_rounding}


def per_layer(cases: list[LayerCase], cfg: AdaRoundConfig, repeats: int) -> dict:
    """Seconds per step of each loop on each layer; the loops alternate, and the hard
    weights of the two are compared (they should agree)."""
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    agree = {}
    for rep in range(repeats):
        for case in cases:
            weights = {}
            for label, loop in LOOPS.items():
                samples, generator = case.samples()
                start = time.perf_counter()
                weights[label] = loop(case.layer, samples, cfg, generator)
                times[(case.name, label)].append((time.perf_counter() - start) / cfg.num_steps)
            if rep == 0:
                agree[case.name] = float((weights["before"] == weights["after"]).float().mean())
    return {c.name: {label: times[(c.name, label)] for label in LOOPS} | {"agree": agree[c.name]}
            for c in cases}


def thread_options(cases: list[LayerCase], cfg: AdaRoundConfig, repeats: int,
                   options: list[int]) -> dict:
    """Seconds per step of the new loop per intra-op thread count, interleaved."""
    times: dict[tuple[str, int], list[float]] = defaultdict(list)
    previous = torch.get_num_threads()
    try:
        for _ in range(repeats):
            for case in cases:
                for n in options:
                    torch.set_num_threads(n)
                    samples, generator = case.samples()
                    start = time.perf_counter()
                    optimise_rounding(case.layer, samples, cfg, generator)
                    times[(case.name, n)].append((time.perf_counter() - start) / cfg.num_steps)
    finally:
        torch.set_num_threads(previous)
    return {c.name: {str(n): times[(c.name, n)] for n in options} for c in cases}


def end_to_end(model: torch.nn.Module, batches: list[torch.Tensor], bits: int, steps: int,
               repeats: int) -> dict:
    """Wall seconds of ``weight_reconstruction`` with each loop, interleaved."""
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeats):
        for label, loop in LOOPS.items():
            cm = calibrated(model, batches, bits)
            with mock.patch.object(layer_reconstruction, "optimise_rounding", loop):
                start = time.perf_counter()
                q.weight_reconstruction(cm, batches, None,
                                        {"num_steps": steps, "progress": False})
                times[label].append(time.perf_counter() - start)
    return dict(times)


def breakdown(case: LayerCase, cfg: AdaRoundConfig) -> dict[str, float]:
    """Median microseconds of each part of one step of the new loop on ``case``."""
    samples, generator = case.samples()
    scale, qmin, qmax = case.layer.weight_qparams()
    rounding = SoftRounding(case.layer.weight, scale, qmin, qmax)
    adam = FusedAdam(rounding.v, cfg.lr)
    parts: dict[str, list[float]] = defaultdict(list)
    clock = time.perf_counter
    for step in range(cfg.num_steps):
        beta = beta_at(step, cfg.num_steps, cfg.warm_up, cfg.b_range)
        t0 = clock()
        x, target = samples.sample(CALIB_BATCH, generator)
        t1 = clock()
        weight = rounding.update_soft_weight()
        t2 = clock()
        output, backward = case.layer.weight_vjp(x, weight)
        t3 = clock()
        with torch.no_grad():
            n = output.numel() // output.shape[case.layer.output_channel_dim]
            grad_weight = backward(torch.sub(output, target).mul_(2.0 / n))
        t4 = clock()
        grad_v = rounding.grad_v(grad_weight, cfg.weight, beta)
        t5 = clock()
        adam.step(grad_v)
        t6 = clock()
        for name, a, b in (("sample", t0, t1), ("soft weight", t1, t2), ("layer forward", t2, t3),
                           ("weight grad", t3, t4), ("dL/dV", t4, t5), ("Adam", t5, t6)):
            parts[name].append(b - a)
    return {name: statistics.median(v) * 1e6 for name, v in parts.items()}


def profile(cases: list[LayerCase], cfg: AdaRoundConfig, rows: int = 12) -> dict[str, str]:
    """torch.profiler tables (self CPU time) of each loop over all layers."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    tables = {}
    for label, loop in LOOPS.items():
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for case in cases:
                samples, generator = case.samples()
                loop(case.layer, samples, cfg, generator)
        tables[label] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)
    return tables


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:8.3f} {min(values) * 1e3:8.3f}"


def report(result: dict) -> str:
    """The printed tables."""
    lines = [f"W{result['bits']}A8, {result['steps']} steps/layer, {result['threads']} thread(s); "
             f"median and min of {result['repeats']} interleaved repeats", "",
             "time per step (ms)      before: median      min   after: median      min  speed-up"
             "  same weights"]
    for name, row in result["per_layer"].items():
        speedup = statistics.median(row["before"]) / statistics.median(row["after"])
        lines.append(f"{name:<24}{_ms(row['before']):>24}{_ms(row['after']):>24}"
                     f"{speedup:>9.2f}x{row['agree'] * 100:>12.1f}%")
    e2e = result["end_to_end"]
    speedup = statistics.median(e2e["before"]) / statistics.median(e2e["after"])
    lines += ["", f"weight_reconstruction wall (s): before median {statistics.median(e2e['before']):.3f}"
              f" (min {min(e2e['before']):.3f}), after median {statistics.median(e2e['after']):.3f}"
              f" (min {min(e2e['after']):.3f}): {speedup:.2f}x"]
    if result.get("threads_compare"):
        options = list(next(iter(result["threads_compare"].values())))
        lines += ["", "new loop, time per step (ms) by intra-op threads: median (min)",
                  f"{'layer':<8}" + "".join(f"{n + ' thr':>20}" for n in options)]
        for name, row in result["threads_compare"].items():
            lines.append(f"{name:<8}" + "".join(
                f"{statistics.median(row[n]) * 1e3:>12.3f} ({min(row[n]) * 1e3:.3f})"
                for n in options))
    lines += ["", "per-step breakdown of the new loop (median us):"]
    parts = next(iter(result["breakdown"].values()))
    lines.append(f"{'layer':<8}" + "".join(f"{p:>14}" for p in parts) + f"{'sum':>10}")
    for name, row in result["breakdown"].items():
        lines.append(f"{name:<8}" + "".join(f"{v:>14.0f}" for v in row.values())
                     + f"{sum(row.values()):>10.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--thread-options", type=int, nargs="*", default=[1, 2],
                   help="intra-op thread counts compared on the new loop (empty: skip)")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler tables")
    p.add_argument("--out", type=Path, default=Path("bench/results/speed.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, data = float_model()
    batches = list(data.calib_x.split(CALIB_BATCH))
    cases = layer_cases(calibrated(model, batches, args.bits), batches)
    cfg = AdaRoundConfig.from_dict({"num_steps": args.steps, "progress": False})
    result = {"bits": args.bits, "steps": args.steps, "repeats": args.repeats,
              "threads": args.threads, "machine": machine(),
              "per_layer": per_layer(cases, cfg, args.repeats),
              "end_to_end": end_to_end(model, batches, args.bits, args.steps, args.repeats),
              "breakdown": {c.name: breakdown(c, cfg) for c in cases},
              "threads_compare": thread_options(cases, cfg, args.repeats, args.thread_options)
              if args.thread_options else {}}
    print(report(result))
    if args.profile:
        result["profile"] = profile(cases, cfg)
        for label, table in result["profile"].items():
            print(f"\ntorch.profiler, {label} (all layers, {args.steps} steps each):\n{table}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
