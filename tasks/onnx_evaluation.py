"""The exported model in ONNX Runtime: its metric, and its agreement with PyTorch."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tasks.artifacts import Artifact
from tasks.failures import pipeline_task
from tasks.io import import_object, load_tensors
from tasks.model_state import calibrated_model, compute_device
from tasks.params import PipelineParams
from tasks.run_logging import run_logger

MIN_AGREEMENT = 0.999  # share of evaluation samples whose prediction must be identical


class ParityError(ValueError):
    """ONNX Runtime's outputs disagree with the PyTorch fake-quant model beyond the bound."""


class OnnxModule(nn.Module):
    """An ONNX model in ONNX Runtime (CPU provider) behind ``nn.Module``'s call, so the
    pipeline's ``eval.metric`` scores it like any model."""

    def __init__(self, path: str, optimized: bool = True) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        if not optimized:  # ONNX's reference semantics: no fusion into integer kernels
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (out,) = self.session.run(None, {self.input_name: x.detach().cpu().numpy()})[:1]
        return torch.from_numpy(out).to(x.device)


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor, batch_size: int) -> np.ndarray:
    return torch.cat([model(x[i:i + batch_size]).cpu() for i in range(0, len(x), batch_size)]
                     ).numpy()


def agreement(expected: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Share of identical predictions and the largest output difference."""
    return {"agreement": float((expected.argmax(1) == got.argmax(1)).mean()),
            "max_abs_diff": float(np.abs(expected - got).max())}


def parity(expected: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """:func:`agreement`, or :class:`ParityError` naming the first disagreeing sample when
    fewer than ``MIN_AGREEMENT`` of the predictions agree."""
    same = expected.argmax(1) == got.argmax(1)
    if same.mean() < MIN_AGREEMENT:
        first = int(np.flatnonzero(~same)[0])
        raise ParityError(f"ONNX Runtime predicts class {int(got[first].argmax())} for "
                          f"evaluation sample {first} where PyTorch predicts "
                          f"{int(expected[first].argmax())}; only {same.mean():.2%} of the "
                          f"predictions agree (needed: {MIN_AGREEMENT:.1%}); nothing was "
                          f"recorded")
    return agreement(expected, got)


@pipeline_task(retries=1)
def evaluate_onnx(params: PipelineParams, dataset: Artifact, float_model: Artifact,
                  rounded: Artifact, onnx_model: Artifact) -> dict[str, float]:
    """The exported model on the test split in ONNX Runtime. Parity gate: with the reference
    kernels the graph must predict what the PyTorch AdaRound model predicts (it computes the
    same to float32 rounding). Recorded: ``eval.metric`` of the default (optimised) session,
    whose fused integer kernels may move an activation by a quantization step, and both
    sessions' agreement with PyTorch."""
    data = load_tensors(dataset.file)
    x, y, size = data["test_x"], data["test_y"], params.eval.batch_size
    torch_model = calibrated_model(params, dataset, float_model, rounded)
    expected = _outputs(torch_model, x.to(compute_device(params)), size)
    reference = parity(expected, _outputs(OnnxModule(onnx_model.path, optimized=False), x,
                                          size))
    deployed = OnnxModule(onnx_model.path)
    scores = {**agreement(expected, _outputs(deployed, x, size)),
              **{f"reference_{k}": v for k, v in reference.items()}}
    scores["top1"] = import_object(params.eval.metric)(deployed, x, y, batch_size=size)
    run_logger(__name__).info("ONNX Runtime: %s", scores)
    return scores
