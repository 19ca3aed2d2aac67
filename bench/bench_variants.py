"""Reconstruction variants on real models: layer-wise AdaRound vs block (BRECQ), QDrop and
learned activation scales (LSQ), at the same calibration data and steps per unit.

For one model and one bit width: build the float model and data (the examples' factories:
all-MiniLM-L6-v2, torchvision ResNet-18 / MobileNetV2 at 224 px with random weights; or the
bundled digits CNN, trained here), calibrate once, score float and nearest rounding, then for
each variant round a copy of the calibrated model with ``weight_reconstruction`` and score it
with the example's metric (MiniLM: cosine to float and retrieval agreement; vision: top-1
agreement with float and output SNR; digits: top-1 on the test split). Each variant's result is
appended to the JSON file as soon as it is done, so a killed run keeps what it finished and
``--resume`` skips it. Run from the repo root, one model and bit width per piece:

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python -m bench.bench_variants --model minilm \
        --bits 4,4 --num-calibration 256 --steps 200
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from adaround_core import quantization as q
from examples.chain import calibrate

QDROP, LSQ = 0.5, 1e-2  # QDrop's paper rate; the learned scales' rate (relative to each scale)
VARIANTS = {
    "layer": {},
    "block": {"granularity": "block"},
    "block + qdrop": {"granularity": "block", "drop_prob": QDROP},
    "block + qdrop + lsq": {"granularity": "block", "drop_prob": QDROP, "activation_lr": LSQ},
    "layer + qdrop": {"drop_prob": QDROP},
    "layer + lsq": {"activation_lr": LSQ},
}


def _minilm(args: argparse.Namespace) -> tuple[torch.nn.Module, dict, Callable]:
    from examples.minilm.data import stdlib_text
    from examples.minilm.metrics import embedding_agreement
    from examples.minilm.model import minilm

    data = stdlib_text(args.num_calibration, args.num_evaluation, 48, args.seed)
    return minilm(), data, embedding_agreement


def _vision(name: str) -> Callable:
    def build(args: argparse.Namespace) -> tuple[torch.nn.Module, dict, Callable]:
        from examples.vision import models
        from examples.vision.data import photo_crops
        from examples.vision.metrics import output_agreement

        model = getattr(models, name)(seed=args.seed, image_size=args.image_size)
        data = photo_crops(args.num_calibration, args.num_evaluation, args.image_size,
                           args.seed)
        return model, data, output_agreement
    return build


def _digits(args: argparse.Namespace) -> tuple[torch.nn.Module, dict, Callable]:
    from adaround_core.demo.digits import load_digits_splits
    from adaround_core.demo.training import top1_metric
    from bench.bench_digits import train_float

    splits = load_digits_splits(seed=0)
    model, _, _ = train_float(splits, args.seed)
    data = {"calibration": splits.calib_x, "evaluation": TensorDataset(splits.test_x,
                                                                       splits.test_y)}
    return model, data, top1_metric


MODELS = {"minilm": _minilm, "resnet18": _vision("resnet18"),
          "mobilenet_v2": _vision("mobilenet_v2"), "digits": _digits}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, choices=sorted(MODELS))
    p.add_argument("--bits", default="4,4", help="weight,activation bit widths")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   metavar="VARIANT", help=f"any of {list(VARIANTS)}")
    p.add_argument("--num-calibration", type=int, default=256)
    p.add_argument("--num-evaluation", type=int, default=512)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=200, help="AdaRound steps per unit")
    p.add_argument("--weight-observer", default="minmax", choices=["minmax", "mse"])
    p.add_argument("--batch-size", type=int, default=32, help="calibration batch size")
    p.add_argument("--adaround-batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--activation-lr", type=float, default=LSQ,
                   help=f"the learned scales' learning rate in the lsq variants (default {LSQ})")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON file (default: bench/results/variants_<model>_W<w>A<a>.json)")
    p.add_argument("--resume", action="store_true", help="skip variants already in --out")
    return p.parse_args(argv)


def environment() -> dict:
    return {"machine": platform.processor() or platform.machine(),
            "cores": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__}


def calibrated_model(model: torch.nn.Module, batches: list[Any], args: argparse.Namespace
                     ) -> torch.nn.Module:
    w, a = (int(b) for b in args.bits.split(","))
    qconfig = q.QConfig(weight_bits=w, activation_bits=a or None,
                        weight_observer=args.weight_observer)
    calib_model = q.prepare_qat_fx(model, qconfig, example_inputs=batches[0]).eval()
    calibrate(calib_model, batches)
    return calib_model


def run_variant(calib_model: torch.nn.Module, batches: list[Any], config: dict,
                score: Callable[[torch.nn.Module], dict], args: argparse.Namespace) -> dict:
    """Round a copy of ``calib_model`` with ``config`` and score it."""
    model = copy.deepcopy(calib_model)
    start = time.perf_counter()
    report = q.weight_reconstruction(model, batches, None, {
        "num_steps": args.steps, "batch_size": args.adaround_batch_size, "seed": args.seed,
        "progress": False, **config})
    seconds = time.perf_counter() - start
    q.set_fake_quantize(model, q.FakeQuantState.VALIDATION)
    return {"config": config, "seconds": round(seconds, 1), "metrics": score(model),
            "units": len(report), "capture": report.capture_method,
            "decisions": dict(Counter(r.decision for r in report))}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    w, a = args.bits.split(",")
    out = args.out or Path(f"bench/results/variants_{args.model}_W{w}A{a}.json")
    done = json.loads(out.read_text()) if args.resume and out.exists() else None
    if done and all(name in done["variants"] for name in args.variants):
        print(f"{out}: every variant asked for is done", flush=True)
        return 0  # before building the model and calibrating it (minutes on 224 px models)
    model, data, metric = MODELS[args.model](args)
    model.eval()
    batches = list(DataLoader(data["calibration"], batch_size=args.batch_size))
    evaluation = DataLoader(data["evaluation"], batch_size=args.batch_size)

    def score(m: torch.nn.Module) -> dict:
        with torch.no_grad():
            return metric(m, evaluation, float_model=model)

    calib_model = calibrated_model(model, batches, args)
    q.set_fake_quantize(calib_model, q.FakeQuantState.VALIDATION)
    result = done or {"environment": environment(), "args": {k: str(v) for k, v in
                                                             vars(args).items()},
                      "float": score(model), "nearest": score(calib_model), "variants": {}}
    print(f"{args.model} W{w}A{a}: float {result['float']}, nearest {result['nearest']}",
          flush=True)
    q.set_fake_quantize(calib_model, q.FakeQuantState.CALIBRATION)
    for name in args.variants:
        if name in result["variants"]:
            continue
        config = {**VARIANTS[name]}
        if "activation_lr" in config:
            config["activation_lr"] = args.activation_lr
        result["variants"][name] = run_variant(calib_model, batches, config, score, args)
        print(f"{name:<22} {result['variants'][name]['seconds']:>8.1f} s  "
              f"{result['variants'][name]['metrics']}", flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
