"""One layer's AdaRound on a disk cache of ResNet-18 shapes: seconds per step.

Writes a cache of ``--rows`` random rows for one ResNet-18 layer shape (its inputs and the
float layer's outputs) under ``--cache`` and times ``reconstruct_layer`` on it with the
pipeline's process settings (huge pages, passive OpenMP waits and, unless ``--moving-threshold``,
glibc's mmap threshold fixed as ``flows.environment`` fixes it). Prints one JSON line: the
median step, the whole call, the threads used.

    .venv/bin/python -m bench.bench_disk_step layer1.0.conv1 --steps 30
    .venv/bin/python -m bench.bench_disk_step layer1.0.conv1 --steps 30 --moving-threshold
"""

from __future__ import annotations

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # before torch's first allocation
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from adaround_core.calibration.layer_samples import LayerSamples  # noqa: E402
from adaround_core.calibration.sample_store import write_layer_cache  # noqa: E402
from adaround_core.reconstruction.layer_reconstruction import (  # noqa: E402
    layer_generator,
    reconstruct_layer,
)
from adaround_core.reconstruction.reconstruction_config import AdaRoundConfig  # noqa: E402
from bench.layer_case import LayerCase  # noqa: E402
from flows.environment import map_large_allocations  # noqa: E402

# (layer, input row shape) of ResNet-18 at 224 px
SHAPES = {"conv1": (lambda: nn.Conv2d(3, 64, 7, 2, 3, bias=False), (3, 224, 224)),
          "layer1.0.conv1": (lambda: nn.Conv2d(64, 64, 3, 1, 1, bias=False), (64, 56, 56)),
          "layer2.0.conv1": (lambda: nn.Conv2d(64, 128, 3, 2, 1, bias=False), (64, 56, 56)),
          "layer4.0.conv1": (lambda: nn.Conv2d(256, 512, 3, 2, 1, bias=False), (256, 14, 14))}
BATCH = 32


def disk_samples(case: LayerCase, module: nn.Module, rows: int, directory: Path,
                 ) -> LayerSamples:
    """The layer's samples from a disk cache under ``directory`` (written once)."""
    if not (directory / "manifest.json").exists():
        directory.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(1)

        def pairs():
            for _ in range(rows // BATCH):
                with torch.no_grad():
                    x = case.layer.input_fake_quant(torch.rand(BATCH, *case.row_shape))
                    yield x, module(x)

        write_layer_cache(directory, pairs())
    return LayerSamples.from_cache(directory, 0.1, layer_generator(0, case.name))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("layer", choices=sorted(SHAPES))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--cache", type=Path, default=Path("bench/results/disk_step"))
    p.add_argument("--moving-threshold", action="store_true",
                   help="leave glibc's mmap threshold moving (its default)")
    args = p.parse_args(argv)
    if not args.moving_threshold:
        map_large_allocations()
    make, row_shape = SHAPES[args.layer]
    module = make()
    case = LayerCase(args.layer, module, row_shape, 64)
    samples = disk_samples(case, module, args.rows, args.cache / f"{args.layer}_{args.rows}")
    cfg = AdaRoundConfig.from_dict({"num_steps": args.steps, "progress": False})
    stamps = [time.perf_counter()]
    report = reconstruct_layer(args.layer, case.layer, samples, cfg,
                               layer_generator(0, args.layer),
                               on_step=lambda _: stamps.append(time.perf_counter()))
    steps = [b - a for a, b in zip(stamps[1:-1], stamps[2:], strict=True)]
    print(json.dumps({"layer": args.layer, "threads": report.threads,
                      "fixed_threshold": not args.moving_threshold,
                      "median_step_ms": round(1e3 * statistics.median(steps), 1),
                      "layer_s": round(report.seconds, 2),
                      "step_gflop": round(report.step_flops / 1e9, 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
