"""The guard at the model's output vs the per-layer guard on the bundled digits model.

For each seed and quantization (W2A8, W4A4 by default; MSE weight scales, min-max
activation scales, as the pipeline's default): train the float DigitsCNN, calibrate on 256
samples (8 batches of 32), run ``weight_reconstruction`` with ``guard: layer`` and with
``guard: output``, and measure top-1 on the test split, the MSE of the logits against the
float model's, the wall time and the decisions. Writes JSON and prints a table. Run from the
repo root:

    .venv/bin/python -m bench.bench_guard
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch

from adaround_core import quantization as q
from adaround_core.demo.digits import DigitsSplits, load_digits_splits
from adaround_core.reconstruction.output_guard import OutputGuard
from bench.bench_digits import CALIB_BATCH, environment, train_float

GUARD_SECONDS: list[float] = []  # time spent in OutputGuard.compare (two model forwards)
_compare = OutputGuard.compare


def _timed_compare(self, *args):
    start = time.perf_counter()
    try:
        return _compare(self, *args)
    finally:
        GUARD_SECONDS.append(time.perf_counter() - start)


OutputGuard.compare = _timed_compare


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", nargs="+", default=["2,8", "4,4"],
                   help="weight,activation bit widths")
    p.add_argument("--guards", nargs="+", default=["layer", "output"])
    p.add_argument("--guard-batches", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--out", type=Path, default=Path("bench/results/guard.json"))
    return p.parse_args(argv)


def calibrated(model: torch.nn.Module, weight_bits: int, activation_bits: int,
               batches: list[torch.Tensor]) -> torch.nn.Module:
    cm = q.prepare_qat_fx(model, q.QConfig(weight_bits=weight_bits,
                                           activation_bits=activation_bits,
                                           weight_observer="mse"))
    q.set_fake_quantize(cm, q.FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for batch in batches:
            cm(batch)
    return cm


@torch.no_grad()
def scores(cm: torch.nn.Module, model: torch.nn.Module, data: DigitsSplits) -> tuple[float, float]:
    """Top-1 (%) and the logits' MSE against the float model, on the test split."""
    q.set_fake_quantize(cm, q.FakeQuantState.VALIDATION)
    logits = cm(data.test_x)
    top1 = 100.0 * (logits.argmax(1) == data.test_y).float().mean().item()
    return top1, (logits - model(data.test_x)).pow(2).mean().item()


def run(model, data, bits: tuple[int, int], guard: str, args, seed: int) -> dict:
    batches = list(data.calib_x.split(CALIB_BATCH))
    cm = calibrated(model, *bits, batches)
    nearest_top1, nearest_mse = scores(cm, model, data)
    q.set_fake_quantize(cm, q.FakeQuantState.CALIBRATION)
    config = {"num_steps": args.steps, "seed": seed, "guard": guard,
              "guard_batches": args.guard_batches, "progress": False}
    GUARD_SECONDS.clear()
    start = time.perf_counter()
    report = q.weight_reconstruction(cm, batches, None, config)
    wall = time.perf_counter() - start
    top1, mse = scores(cm, model, data)
    return {"seed": seed, "bits": f"W{bits[0]}A{bits[1]}", "guard": guard,
            "nearest_top1": nearest_top1, "nearest_logit_mse": nearest_mse,
            "adaround_top1": top1, "logit_mse": mse, "wall_s": wall,
            "guard_s": sum(GUARD_SECONDS),
            "decisions": dict(Counter(r.decision for r in report)),
            "per_layer": report.to_records()}


def format_rows(rows: list[dict]) -> str:
    header = (f"{'seed':>4} {'bits':>5} {'guard':>7} {'nearest':>8} {'top1':>7} "
              f"{'logit MSE':>10} {'wall s':>7} {'guard s':>7}  decisions")
    return "\n".join([header, *(
        f"{r['seed']:>4} {r['bits']:>5} {r['guard']:>7} {r['nearest_top1']:>8.2f} "
        f"{r['adaround_top1']:>7.2f} {r['logit_mse']:>10.4g} {r['wall_s']:>7.1f} "
        f"{r['guard_s']:>7.2f}  {r['decisions']}" for r in rows)])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # training and evaluation; AdaRound picks its own threads
    env, rows = environment(), []
    for seed in args.seeds:
        data = load_digits_splits(seed=0)
        model, float_top1, _ = train_float(data, seed)
        print(f"seed {seed}: float top-1 {float_top1:.2f}", flush=True)
        for spec in args.bits:
            bits = tuple(int(b) for b in spec.split(","))
            for guard in args.guards:
                rows.append({**run(model, data, bits, guard, args, seed),
                             "float_top1": float_top1})
                print(format_rows(rows[-1:]).splitlines()[1], flush=True)
    print(format_rows(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": env, "args": {k: str(v) for k, v in
                                                                 vars(args).items()},
                                    "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
