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

    def __init__(self, path: str) -> None:
        super().__init__()
        import onnxruntime as ort

        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (out,) = self.session.run(None, {self.input_name: x.detach().cpu().numpy()})[:1]
        return torch.from_numpy(out).to(x.device)


@torch.no_grad()
def _outputs(model: nn.Module, x: torch.Tensor, batch_size: int) -> np.ndarray:
    return torch.cat([model(x[i:i + batch_size]).cpu() for i in range(0, len(x), batch_size)]
                     ).numpy()


def parity(expected: np.ndarray, got: np.ndarray) -> dict[str, float]:
    """Prediction agreement and largest output difference; :class:`ParityError` naming the
    first disagreeing sample when fewer than ``MIN_AGREEMENT`` of them agree."""
    same = expected.argmax(1) == got.argmax(1)
    if same.mean() < MIN_AGREEMENT:
        first = int(np.flatnonzero(~same)[0])
        raise ParityError(f"ONNX Runtime predicts class {int(got[first].argmax())} for "
                          f"evaluation sample {first} where PyTorch predicts "
                          f"{int(expected[first].argmax())}; only {same.mean():.2%} of the "
                          f"predictions agree (needed: {MIN_AGREEMENT:.1%}); nothing was "
                          f"recorded")
    return {"agreement": float(same.mean()),
            "max_abs_diff": float(np.abs(expected - got).max())}


@pipeline_task(retries=1)
def evaluate_onnx(params: PipelineParams, dataset: Artifact, float_model: Artifact,
                  rounded: Artifact, onnx_model: Artifact) -> dict[str, float]:
    """``eval.metric`` of the exported model in ONNX Runtime, and its parity with the
    PyTorch AdaRound model on the test split."""
    data = load_tensors(dataset.file)
    x, y = data["test_x"], data["test_y"]
    onnx_module = OnnxModule(onnx_model.path)
    torch_model = calibrated_model(params, dataset, float_model, rounded)
    device = compute_device(params)
    expected = _outputs(torch_model, x.to(device), params.eval.batch_size)
    scores = parity(expected, _outputs(onnx_module, x, params.eval.batch_size))
    metric = import_object(params.eval.metric)
    scores["top1"] = metric(onnx_module, x, y, batch_size=params.eval.batch_size)
    run_logger(__name__).info("ONNX Runtime: %s", scores)
    return scores
