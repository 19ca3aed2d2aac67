"""``python -m adaround_core.demo``: float vs baseline calibration vs AdaRound on digits."""

from __future__ import annotations

import argparse
import logging

import torch

from adaround_core import quantization as q
from adaround_core.demo.digits import load_digits_splits
from adaround_core.demo.models import DigitsCNN
from adaround_core.demo.training import top1, train_classifier


def _parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--weight-bits", type=int, default=3)
    p.add_argument("--activation-bits", type=int, default=8)
    p.add_argument("--weight-observer", default="mse", choices=["minmax", "mse"])
    p.add_argument("--num-steps", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = _parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)
    data = load_digits_splits(seed=args.seed)
    model = train_classifier(DigitsCNN(), data.train_x, data.train_y, seed=args.seed)
    qconfig = q.QConfig(weight_bits=args.weight_bits, activation_bits=args.activation_bits,
                        weight_observer=args.weight_observer)
    calib_model = q.prepare_qat_fx(model, qconfig).eval()
    q.set_fake_quantize(calib_model, q.FakeQuantState.CALIBRATION)
    batches = list(data.calib_x.split(32))
    with torch.no_grad():
        for batch in batches:
            calib_model(batch)
    q.set_fake_quantize(calib_model, q.FakeQuantState.VALIDATION)
    baseline = top1(calib_model, data.test_x, data.test_y)
    q.set_fake_quantize(calib_model, q.FakeQuantState.CALIBRATION)
    report = q.weight_reconstruction(calib_model, batches, None, {"num_steps": args.num_steps})
    q.set_fake_quantize(calib_model, q.FakeQuantState.VALIDATION)
    adaround = top1(calib_model, data.test_x, data.test_y)
    print(report.format_table())
    print(f"\nW{args.weight_bits}A{args.activation_bits}, {args.num_steps} steps per layer")
    print(f"{'float':<22}{top1(model, data.test_x, data.test_y):7.2f} %")
    print(f"{'baseline calibration':<22}{baseline:7.2f} %")
    print(f"{'AdaRound':<22}{adaround:7.2f} %  ({adaround - baseline:+.2f} vs baseline)")


if __name__ == "__main__":
    main()
