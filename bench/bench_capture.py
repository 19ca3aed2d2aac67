"""Capture cost: a partial forward pass per layer (old) vs one continued pass (one-pass).

On a ResNet-18-shaped CNN (21 convs and a Linear head, narrow channels) at 64x64, each
method captures every layer's inputs and targets in rounding order, writing each
layer's nearest rounding before the next capture (a stand-in for AdaRound, so later
inputs depend on earlier roundings, as in a real run, at no optimisation cost). Each
method runs in its own process so its peak RSS is its own. Checks the captured tensors
agree by a checksum. ``--granularity block`` captures the units of block reconstruction
instead (the 8 residual blocks, the stem and the head): a block's call arguments and float
output, its layers rounded before the next unit's capture.

    .venv/bin/python -m bench.bench_capture [--batches 8] [--batch-size 16] [--threads 1]
                                            [--memory-mib 256] [--only one_pass]
                                            [--granularity block]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch import nn

from adaround_core import quantization as q
from adaround_core.calibration.capture_method import LayerCapturer, layer_capturer
from adaround_core.calibration.frontier_store import FRONTIER_MEMORY_BUDGET
from adaround_core.quant.fake_quantize import FakeQuantize
from adaround_core.quant.model_modes import float_reference
from adaround_core.quant.quant_layers import QuantLayerMixin, quant_layers
from adaround_core.reconstruction.layer_reconstruction import nearest_weight
from adaround_core.reconstruction.reconstruction_config import AdaRoundConfig
from adaround_core.reconstruction.rounding_mode import rounding_mode
from adaround_core.reconstruction.unit_order import block_calls
from adaround_core.reconstruction.units import Unit, plan_units
from adaround_core.reconstruction.weight_reconstruction import rounding_order
from adaround_core.torch_private import tree_leaves


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                  nn.BatchNorm2d(cout)) if stride > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.b2(self.c2(self.relu(self.b1(self.c1(x)))))
        out += x if self.down is None else self.down(x)
        return self.relu(out)


class ResNet18Narrow(nn.Module):
    """ResNet-18's layout (stem, 4 stages of 2 basic blocks, head) at a quarter width."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [_Block(cin, w, 1 if i == 0 else 2), _Block(w, w, 1)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


def _calibrated(batches: list[torch.Tensor]) -> nn.Module:
    torch.manual_seed(0)
    model = ResNet18Narrow().eval()
    prepared = q.prepare_qat_fx(model, example_inputs=batches[0][:1])
    q.set_fake_quantize(prepared, q.FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for b in batches:
            prepared(b)
    q.set_fake_quantize(prepared, q.FakeQuantState.VALIDATION)
    return prepared


def _captured_sum(capturer: LayerCapturer, unit: Unit, calls: int) -> float:
    """Capture ``unit`` (every batch) and sum what was captured."""
    items = capturer.iter_unit_calls(unit.name, calls) if unit.is_block else \
        capturer.iter_layer_io(unit.name, calls)
    return sum(float(t.double().sum()) for item in items for t in tree_leaves(item)
               if isinstance(t, torch.Tensor))


def run_method(one_pass: bool, num_batches: int, batch_size: int, threads: int,
               memory_budget: int, granularity: str = "layer") -> dict:
    """Capture every unit once with one method; seconds, peak RSS and a checksum."""
    torch.manual_seed(1)
    batches = [torch.randn(batch_size, 3, 64, 64) for _ in range(num_batches)]
    model = _calibrated(batches)
    names, calls, _ = rounding_order(model, batches[0], [])
    units = plan_units(model, names, AdaRoundConfig(granularity=granularity))
    calls |= block_calls(model, units, batches[0])
    layers = quant_layers(model)
    checksum = 0.0
    with rounding_mode(model, threads):
        start = time.perf_counter()
        capturer = layer_capturer(model, float_reference(model), [u.name for u in units],
                                  batches, batches[0], (QuantLayerMixin, FakeQuantize), one_pass,
                                  memory_budget=memory_budget,
                                  blocks=[u.name for u in units if u.is_block])
        for unit in units:
            for name in unit.layers:
                layers[name].freeze_weight_qparams()
            checksum += _captured_sum(capturer, unit, calls[unit.name])
            with torch.no_grad():
                for name in unit.layers:
                    layers[name].weight.copy_(nearest_weight(layers[name]))
        capturer.close()
        seconds = time.perf_counter() - start
    return {"method": capturer.method, "units": len(units), "seconds": round(seconds, 3),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "checksum": checksum}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--memory-mib", type=int, default=FRONTIER_MEMORY_BUDGET >> 20,
                        help="frontier bytes kept in memory per model (the rest on disk)")
    parser.add_argument("--only", choices=["old", "one_pass"], help="run one method only")
    parser.add_argument("--granularity", choices=["layer", "block"], default="layer",
                        help="capture layers, or the units of block reconstruction")
    parser.add_argument("--child", choices=["old", "one_pass"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_method(args.child == "one_pass", args.batches, args.batch_size, args.threads,
                            args.memory_mib << 20, args.granularity)
        print(json.dumps(result))
        return
    results = {}
    for method in [args.only] if args.only else ["old", "one_pass"]:
        done = subprocess.run([sys.executable, "-m", "bench.bench_capture", "--child", method,
                               "--batches", str(args.batches), "--batch-size",
                               str(args.batch_size), "--threads", str(args.threads),
                               "--memory-mib", str(args.memory_mib),
                               "--granularity", args.granularity],
                              capture_output=True, text=True, check=True)
        results[method] = json.loads(done.stdout.strip().splitlines()[-1])
        print(method, results[method])
    if args.only:
        return
    old, new = results["old"], results["one_pass"]
    print(f"speed-up {old['seconds'] / new['seconds']:.1f}x; checksums "
          f"{'agree' if old['checksum'] == new['checksum'] else 'DIFFER'}")


if __name__ == "__main__":
    main()
