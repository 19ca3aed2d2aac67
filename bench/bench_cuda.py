"""AdaRound with the model on a CUDA GPU: the list/tuple fast path against a streamed
DataLoader and against the CPU.

The trained demo DigitsCNN at W``bits``A8 (mse weight observer), 256 calibration samples
in batches of 32. For each path: wall time of ``weight_reconstruction``, validation top-1,
and whether its weights equal the list path's. From the repo root, on a GPU machine:

    python -m bench.bench_cuda --out bench/results/cuda.json      # ~1 min on an H100
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from adaround_core.demo.training import top1
from adaround_core.quantization import FakeQuantState, set_fake_quantize, weight_reconstruction
from bench.digits_setup import CALIB_BATCH, calibrated, float_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per path (median)")
    p.add_argument("--device", default="cuda",
                   help="the accelerator (cpu: a smoke test of this script without a GPU)")
    p.add_argument("--out", type=Path, default=Path("bench/results/cuda.json"))
    return p.parse_args(argv)


def timed_call(model, batches, config: dict, device: torch.device) -> tuple[float, object]:
    """Seconds of one ``weight_reconstruction`` call (synchronised) and the rounded model."""
    model = copy.deepcopy(model)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    weight_reconstruction(model, batches, None, config)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, model


def measure(name: str, model, batches, config: dict, device: torch.device, data,
            repeats: int) -> dict:
    """Median time over ``repeats`` calls, top-1 of the last, and its state dict."""
    times, rounded = [], None
    for _ in range(repeats):
        seconds, rounded = timed_call(model, batches, config, device)
        times.append(seconds)
    accuracy = quantized_top1(rounded, data, device)
    print(f"{name:<22} {sorted(times)[len(times) // 2]:8.2f} s   top-1 {accuracy:6.2f}")
    return {"path": name, "seconds": sorted(times)[len(times) // 2], "all_seconds": times,
            "top1": accuracy, "state": {k: v.cpu() for k, v in rounded.state_dict().items()}}


def quantized_top1(model, data, device: torch.device) -> float:
    """Top-1 on the test split with the fake quantizers on (VALIDATION)."""
    set_fake_quantize(model, FakeQuantState.VALIDATION)
    return top1(model, data.test_x.to(device), data.test_y.to(device))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpu, cpu = torch.device(args.device), torch.device("cpu")
    if gpu.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU (or --device cpu)")
    model, data = float_model()
    model.eval()
    calib = data.calib_x
    cpu_batches = [calib[i:i + CALIB_BATCH] for i in range(0, len(calib), CALIB_BATCH)]
    cm = calibrated(model, cpu_batches, args.bits, "mse")  # calibrated on the CPU, then moved
    config = {"num_steps": args.steps, "progress": False}
    gpu_model = copy.deepcopy(cm).to(gpu)
    loader = DataLoader(calib, batch_size=CALIB_BATCH)
    timed_call(gpu_model, cpu_batches, {**config, "num_steps": 20}, gpu)  # CUDA warm-up
    rows = [measure("gpu list (CPU tensors)", gpu_model, cpu_batches, config, gpu, data,
                    args.repeats),
            measure("gpu tuple (on GPU)", gpu_model, tuple(b.to(gpu) for b in cpu_batches),
                    config, gpu, data, args.repeats),
            measure("gpu DataLoader", gpu_model, loader, {**config, "num_batches":
                                                         len(cpu_batches)}, gpu, data,
                    args.repeats),
            measure("cpu list", cm, cpu_batches, config, cpu, data, 1)]
    reference = rows[0]["state"]
    for row in rows:
        state = row.pop("state")
        row["weights_equal_gpu_list"] = all(torch.equal(state[k], reference[k])
                                            for k in reference)
    float_top1 = top1(model, data.test_x, data.test_y)
    nearest_top1 = quantized_top1(copy.deepcopy(cm), data, cpu)
    report = {"device": torch.cuda.get_device_name(0) if gpu.type == "cuda" else "cpu", "torch": torch.__version__,
              "cpu_threads": torch.get_num_threads(), "python": platform.python_version(),
              "bits": args.bits, "steps": args.steps, "float_top1": float_top1,
              "nearest_top1": nearest_top1, "rows": rows}
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
