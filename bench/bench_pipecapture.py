"""Capture time of the pipeline's adaround stage: per-layer passes (old) vs one continued pass.

A deeper model than the demo (``DeepDigitsCNN``: a stem conv, ``depth`` residual conv
blocks and a Linear head, on the digits images upsampled; ``depth + 2`` rounded layers) is made
the pipeline's model through ``model.factory``. Data, training (1 epoch) and calibration
run once; then the adaround stage's task bodies run layer by layer (``plan_layers``,
``cache_layer_activations``, ``adaround_layer``, ``assemble_checkpoint``, as
``flows/stages.py:_round_layers`` calls them, without Prefect) once per capture method,
each in its own process with its own cache and results. Prints the time spent in the
cache tasks (capture and shard writing, plus frontier save/load for one-pass), the whole
stage, and the checkpoints' SHA-256 (which must agree).

    .venv/bin/python -m bench.bench_pipecapture [--depth 16] [--width 32] [--upsample 2]
                                                [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from torch import nn

REPO = Path(__file__).resolve().parents[1]


class DeepDigitsCNN(nn.Module):
    """The 8x8 digits upsampled ``upsample`` times, a stem Conv-BN-ReLU, ``depth`` residual
    Conv-BN blocks, global average pooling and a Linear head."""

    def __init__(self, depth: int = 16, width: int = 32, upsample: int = 1,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=upsample) if upsample > 1 else nn.Identity()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1, bias=False)
                                   for _ in range(depth))
        self.norms = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(depth))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.upsample(x))
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = torch.relu(x + norm(conv(x)))
        return self.head(x.mean(dim=(2, 3)))


def _params(project: Path, args: argparse.Namespace, method: str | None = None):
    from flows.runtime import anchored
    from tasks.params import load_params

    overrides = ["model.factory=bench.bench_pipecapture:DeepDigitsCNN",
                 f"model.kwargs={{depth: {args.depth}, width: {args.width}, "
                 f"upsample: {args.upsample}}}",
                 "train.kwargs.epochs=1", f"adaround.num_steps={args.steps}",
                 "adaround.num_threads=1", "tracking.enabled=false",
                 f"calibration.num_samples={args.samples}",
                 f"calibration.batch_size={args.batch_size}"]
    if method:
        overrides += [f"runtime.cache_dir=cache-{method}", f"runtime.results_dir=results-{method}"]
    return anchored(load_params(REPO / "params.yaml", overrides), project)


def prepare(project: Path, args: argparse.Namespace) -> None:
    from tasks.calibration import calibrate
    from tasks.data import prepare_data
    from tasks.layout import Layout
    from tasks.training import train_float_model

    params = _params(project, args)
    layout = Layout(params)
    dataset = prepare_data.fn(params, str(layout.dataset))
    float_model = train_float_model.fn(params, dataset, str(layout.float_checkpoint))
    calibrate.fn(params, dataset, float_model, str(layout.calibrated_checkpoint))


def run_stage(project: Path, args: argparse.Namespace, method: str) -> dict:
    """The adaround stage's task bodies in order; seconds in the cache tasks and in all."""
    from tasks import capture
    from tasks.activation_cache import (
        cache_layer_activations,
        remove_layer_cache,
        remove_used_frontiers,
    )
    from tasks.layer_adaround import adaround_layer, assemble_checkpoint
    from tasks.layer_jobs import plan_job
    from tasks.layout import Layout, existing
    from tasks.planning import plan_layers

    capture.ONE_PASS_CAPTURE = method == "one_pass"
    params = _params(project, args, method)
    layout = Layout(params)
    inputs = (existing(layout.dataset, "data"), existing(layout.float_checkpoint, "train"),
              existing(layout.calibrated_checkpoint, "calibrate"))
    start = time.perf_counter()
    plan = plan_layers.fn(params, *inputs)
    capture_s, results, job = 0.0, [], None
    for _ in plan.names:
        job = plan_job(params, *inputs, plan, results, upstream=job)
        t = time.perf_counter()
        cache = cache_layer_activations.fn(job)
        capture_s += time.perf_counter() - t
        remove_used_frontiers(job)
        results.append(adaround_layer.fn(job, cache))
        remove_layer_cache(job)
    out = project / f"adaround-{method}.safetensors"
    checkpoint = assemble_checkpoint.fn(params, *inputs, results, str(out))
    return {"method": plan.capture_method, "layers": len(plan.names),
            "capture_s": round(capture_s, 2), "stage_s": round(time.perf_counter() - start, 2),
            "sha256": checkpoint.digest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=16)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--upsample", type=int, default=2, help="input scale (compute per layer)")
    parser.add_argument("--steps", type=int, default=20, help="adaround.num_steps")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--project", type=Path, help="reuse this directory")
    parser.add_argument("--child", choices=["per_layer", "one_pass"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_stage(args.project, args, args.child)))
        return
    project = args.project or Path(tempfile.mkdtemp(prefix="bench-pipecapture-"))
    torch.set_num_threads(1)
    prepare(project, args)
    common = ["--depth", str(args.depth), "--width", str(args.width), "--upsample",
              str(args.upsample), "--steps",
              str(args.steps), "--samples", str(args.samples), "--batch-size",
              str(args.batch_size), "--project", str(project)]
    results = {}
    for method in ("per_layer", "one_pass"):
        done = subprocess.run([sys.executable, "-m", "bench.bench_pipecapture", "--child",
                               method, *common], capture_output=True, text=True, check=True)
        results[method] = json.loads(done.stdout.strip().splitlines()[-1])
        print(method, results[method], flush=True)
    old, new = results["per_layer"], results["one_pass"]
    print(f"capture speed-up {old['capture_s'] / new['capture_s']:.1f}x, stage "
          f"{old['stage_s'] / new['stage_s']:.2f}x; checkpoints "
          f"{'identical' if old['sha256'] == new['sha256'] else 'DIFFER'}")
    print(yaml.safe_dump({"project": str(project)}), end="")


if __name__ == "__main__":
    main()
