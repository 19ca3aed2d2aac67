"""Block reconstruction, QDrop and learned activation scales against layer-wise AdaRound.

A ResNet-18-shaped network (``bench/resnet_like.py``, random weights, 32x32 inputs, 10
classes) at W4A4: for each variant, the wall and CPU time (all threads, less sensitive to
other load) of ``weight_reconstruction`` at the same steps per unit and the output MSE against the float model on held-out inputs. Run from the
repo root (``OMP_WAIT_POLICY=PASSIVE`` on a shared machine):

    .venv/bin/python -m bench.bench_block_reconstruction --steps 100
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from adaround_core import quantization as q
from bench.resnet_like import ResNet18Like

VARIANTS = {  # the wall-time comparison (layer, block) first
    "nearest": None,
    "layer": {},
    "block": {"granularity": "block"},
    "block + qdrop + lsq": {"granularity": "block", "drop_prob": 0.5, "activation_lr": 1e-2},
    "layer + lsq": {"activation_lr": 1e-2},
    "layer + qdrop": {"drop_prob": 0.5},
    "block, guard output": {"granularity": "block", "guard": "output"},
    "block + qdrop + lsq, guard output": {"granularity": "block", "drop_prob": 0.5,
                                          "activation_lr": 1e-2, "guard": "output"},
}


def _data(seed: int, batches: int, batch: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    calibration = [torch.rand(batch, 3, 32, 32, generator=g) for _ in range(batches)]
    return calibration, torch.rand(64, 3, 32, 32, generator=g)


def run_variant(float_model: torch.nn.Module, calibration: list[torch.Tensor],
                held_out: torch.Tensor, config: dict | None, steps: int) -> dict:
    model = q.prepare_qat_fx(float_model, q.QConfig(weight_bits=4, activation_bits=4))
    q.set_fake_quantize(model, q.FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for batch in calibration:
            model(batch)
    seconds = cpu_seconds = 0.0
    kept_nearest = None
    if config is not None:
        start, cpu_start = time.perf_counter(), time.process_time()
        report = q.weight_reconstruction(model, calibration, None,
                                         {"num_steps": steps, "progress": False, **config})
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
        kept_nearest = [row.name for row in report if row.kept_nearest]
    q.set_fake_quantize(model, q.FakeQuantState.VALIDATION)
    with torch.no_grad():
        mse = (model(held_out) - float_model(held_out)).pow(2).mean().item()
    return {"seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
            "output_mse": mse, "kept_nearest": kept_nearest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        metavar="VARIANT", help=f"any of {list(VARIANTS)}")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    float_model = ResNet18Like(num_classes=10).eval()
    calibration, held_out = _data(args.seed, args.batches, args.batch)
    results = {}
    for name in args.variants:
        config = VARIANTS[name]
        results[name] = run_variant(float_model, calibration, held_out, config, args.steps)
        print(f"{name:<34} {results[name]['seconds']:>8.2f} s  (CPU "
              f"{results[name]['cpu_seconds']:.2f} s)  output MSE "
              f"{results[name]['output_mse']:.4g}  units kept nearest: "
              f"{results[name]['kept_nearest']}", flush=True)
    if "layer" in results and "block" in results:
        ratios = [results["block"][k] / results["layer"][k] for k in ("seconds", "cpu_seconds")]
        print(f"block / layer wall time: {ratios[0]:.2f}, CPU time: {ratios[1]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": platform.processor() or platform.machine(),
                       "torch": torch.__version__, "args": vars(args), "results": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
