"""Data-parallel AdaRound: time per layer-step under ``torchrun`` with 1 and with 2 processes.

For Conv2d and Linear layers from the digits model's size to ResNet-like ones, starts
``torchrun --standalone --nproc-per-node K`` for K = 1, 2 (interleaved, ``--repeats``
times, the machine being shared); each run times ``optimise_rounding`` per step on every
layer (2 processes: each takes half of every batch of ``BATCH`` samples and the gradient
is all-reduced over gloo). 1 process runs as without torchrun, with the engine's own
thread choice; torchrun gives each of 2 processes one thread (``OMP_NUM_THREADS=1``).
Prints the median milliseconds per step and the speed-up.

    .venv/bin/python -m bench.bench_ddp --repeats 3 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from adaround_core.reconstruction.distributed import join
from adaround_core.reconstruction.reconstruction_config import AdaRoundConfig
from adaround_core.reconstruction.step_flops import step_flops
from adaround_core.reconstruction.threads import intra_op_threads, layer_threads
from bench.digits_setup import machine
from bench.layer_case import LayerCase, step_seconds

BATCH = 32
ROWS = 64
PROCESSES = (1, 2)


def layer_specs() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """(name, float module, input row shape), from small to large."""
    return [("conv8-16k3@8", nn.Conv2d(8, 16, 3, 1, 1, bias=False), (8, 8, 8)),
            ("lin1024x1024", nn.Linear(1024, 1024), (1024,)),
            ("conv64-64k3@14", nn.Conv2d(64, 64, 3, 1, 1, bias=False), (64, 14, 14)),
            ("conv64-64k3@28", nn.Conv2d(64, 64, 3, 1, 1, bias=False), (64, 28, 28))]


def worker(steps: int, out: Path) -> None:
    """One rank: per-step seconds of every layer (rank 0 writes them to ``out``)."""
    ranks = join(torch.device("cpu"))
    cfg = AdaRoundConfig.from_dict({"num_steps": steps, "progress": False, "batch_size": BATCH})
    rows = []
    for name, module, row_shape in layer_specs():
        case = LayerCase(name, module, row_shape, ROWS)
        flops = step_flops(case.layer, row_shape, BATCH)
        threads = layer_threads(None, torch.device("cpu"), flops)
        with intra_op_threads(threads):
            seconds = step_seconds(case, cfg, ranks)
        rows.append({"layer": name, "step_flops": flops, "threads": threads,
                     "median_s": statistics.median(seconds)})
    if ranks is None or ranks.rank == 0:
        out.write_text(json.dumps(rows))


def launch(processes: int, steps: int, folder: Path) -> list[dict]:
    out = folder / f"ranks{processes}.json"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={processes}", "-m", "bench.bench_ddp", "--worker",
                    "--steps", str(steps), "--out", str(out)], check=True,
                   env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    return json.loads(out.read_text())


def table(runs: dict[int, list[list[dict]]]) -> str:
    lines = ["| layer | MFLOP/step (batch 32) | 1 process: threads, ms/step | "
             "2 processes: ms/step | speed-up |", "|---|---:|---:|---:|---:|"]
    for i, (name, _, _) in enumerate(layer_specs()):
        ms = {k: 1e3 * statistics.median(run[i]["median_s"] for run in runs[k]) for k in runs}
        first = runs[1][0][i]
        lines.append(f"| {name} | {first['step_flops'] / 1e6:.1f} | {first['threads']}, "
                     f"{ms[1]:.2f} | {ms[2]:.2f} | {ms[1] / ms[2]:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.steps, args.out)
        return
    runs: dict[int, list[list[dict]]] = {k: [] for k in PROCESSES}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            for k in PROCESSES:
                runs[k].append(launch(k, args.steps, Path(folder)))
    print(machine())
    print(f"1-minute load average after the runs: {os.getloadavg()[0]:.1f}")
    print(table(runs))


if __name__ == "__main__":
    main()
