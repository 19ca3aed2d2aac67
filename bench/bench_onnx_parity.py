"""ONNX Runtime parity of the exported examples (a script, not a test).

    python -m bench.bench_onnx_parity [--steps 20] [--num-calibration 32] [--image-size 224]

For all-MiniLM-L6-v2 (W4A8) and ResNet-18 / MobileNetV2 (W4A8, random weights): prepare,
calibrate, AdaRound (few steps: parity, not accuracy, is measured), ``export_quantized``, then
run the ONNX model in ONNX Runtime (reference kernels, and the default optimised session) on
the evaluation samples and compare with the PyTorch fake-quant model: prediction agreement
(classifiers), cosine (embeddings), and the largest output difference in units of the
PyTorch output's range. Two more rows per model:

* ``torch-float64``: the same PyTorch model computed in float64 against float32: the
  model's own sensitivity to float32 rounding. Two correct float32 runtimes each differ from
  the exact result by float32 rounding, so end to end they can differ from each other by
  about as much as this row shows;
* ``forced``: teacher-forced parity (``adaround_core.export.forced_parity``): every
  quantization point fed PyTorch's codes; the largest code difference, the largest share of
  a point's codes that differ, and the output difference.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import onnxruntime as ort
import torch
from torch.utils.data import DataLoader

from adaround_core import quantization as q
from adaround_core.export.forced_parity import forced_parity
from adaround_core.export.onnx_export import export_quantized, run_onnx_inputs
from examples.chain import calibrate
from examples.outputs import run_model


def _session(proto, optimized: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(proto.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


@torch.no_grad()
def _compare(model, proto, loader, optimized: bool) -> dict[str, float]:
    session = _session(proto, optimized)
    torch_out, onnx_out = [], []
    for batch in loader:
        torch_out.append(run_model(model, batch).float().numpy())
        onnx_out.append(session.run(None, run_onnx_inputs(batch, proto))[0])
    return _scores(np.concatenate(torch_out), np.concatenate(onnx_out))


@torch.no_grad()
def _torch_float64(model, loader) -> dict[str, float]:
    """The same fake-quant model in float64: as close to exact as PyTorch gets."""
    exact = copy.deepcopy(model).double()
    torch_out, exact_out = [], []
    for batch in loader:
        torch_out.append(run_model(model, batch).float().numpy())
        exact_out.append(run_model(exact, _double(batch)).float().numpy())
    return _scores(np.concatenate(torch_out), np.concatenate(exact_out))


def _double(batch):
    if isinstance(batch, dict):
        return {k: _double(v) for k, v in batch.items()}
    return batch.double() if batch.is_floating_point() else batch


def _scores(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"agreement": float((a.argmax(1) == b.argmax(1)).mean()),
            "min_cosine": float(cos.min()),
            "max_abs_diff_of_range": float(np.abs(a - b).max() / (a.max() - a.min()))}


def _example(name: str, args):
    if name == "minilm":
        from examples.minilm.data import stdlib_text
        from examples.minilm.model import minilm

        data = stdlib_text(num_calibration=args.num_calibration, num_evaluation=128)
        return minilm(), data
    from examples.vision.data import photo_crops
    from examples.vision.models import build

    data = photo_crops(num_calibration=args.num_calibration, num_evaluation=64,
                       image_size=args.image_size)
    return build(name, 1000, None, 0, 16, args.image_size), data


def run(name: str, args) -> None:
    start = time.perf_counter()
    model, data = _example(name, args)
    batches = list(DataLoader(data["calibration"], batch_size=16))
    calib = q.prepare_qat_fx(model, q.QConfig(weight_bits=4, activation_bits=args.activation_bits or None),
                             example_inputs=batches[0]).eval()
    calibrate(calib, batches)
    q.weight_reconstruction(calib, batches, None, {"num_steps": args.steps, "progress": False})
    q.set_fake_quantize(calib, q.FakeQuantState.VALIDATION)
    example = {k: v[:2] for k, v in batches[0].items()} if isinstance(batches[0], dict) \
        else batches[0][:2]
    proto = export_quantized(calib, example).onnx_model
    loader = DataLoader(data["evaluation"], batch_size=32)
    rows = {"reference": _compare(calib, proto, loader, False),
            "optimised": _compare(calib, proto, loader, True),
            "torch-float64": _torch_float64(calib, loader)}
    forced = forced_parity(calib, proto, loader)
    rows["forced"] = {"max_code_step": max((p.max_step for p in forced.points), default=0),
                      "max_flip_share": forced.max_flip_share,
                      "max_diff_of_range": forced.output_diff_of_range,
                      "violation": forced.violation() or "none"}
    for kind, scores in rows.items():
        print(f"{name:<13} {kind:<13} " + "  ".join(
            f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in scores.items()),
              flush=True)
    print(f"{name:<13} seconds {time.perf_counter() - start:.0f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--num-calibration", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--activation-bits", type=int, default=8, help="0: weight-only")
    parser.add_argument("--only", nargs="*", default=["minilm", "resnet18", "mobilenet_v2"])
    args = parser.parse_args()
    for name in args.only:
        run(name, args)


if __name__ == "__main__":
    main()
