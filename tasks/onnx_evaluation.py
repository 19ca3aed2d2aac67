"""The exported model in ONNX Runtime: its metric, its agreement with PyTorch, and the
parity gate.

The gate is teacher-forced (:mod:`adaround_core.export.forced_parity`): every quantization
point of the graph is fed PyTorch's integer codes, and what ONNX Runtime's reference kernels
compute from them must match PyTorch's codes to one step (float32 rounding at a boundary)
and its outputs to float32 rounding. End to end, a deep model with 8-bit activations can
disagree with itself under another float32 kernel; the end-to-end agreement is recorded,
not gated. Agreement is judged per evaluation sample: for classifier logits (one 2-D output)
the predicted class must be the same (``argmax``); for any other output (embeddings, several
outputs) the outputs' cosine similarity must reach ``MIN_COSINE`` (``cosine``);
``eval.onnx_parity`` picks one, ``auto`` by the output's shape.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from adaround_core.calibration.batches import call_model
from adaround_core.export.forced_parity import ForcedParity, forced_parity
from adaround_core.export.onnx_export import input_feed
from adaround_core.torch_private import tree_leaves
from tasks.artifacts import Artifact
from tasks.failures import pipeline_task
from tasks.metrics import score
from tasks.model_state import calibrated_model, compute_device, load_float_model
from tasks.params import PipelineParams
from tasks.run_logging import run_logger
from tasks.stage_data import StageData, open_data

MIN_COSINE = 0.999  # cosine parity: a sample agrees when its outputs are at least this close
FORCED_SAMPLES = 256  # evaluation samples the teacher-forced gate checks (whole batches)


class ParityError(ValueError):
    """ONNX Runtime's outputs disagree with the PyTorch fake-quant model beyond the bound."""


class OnnxModule(nn.Module):
    """An ONNX model in ONNX Runtime (CPU provider) behind ``nn.Module``'s call, so the
    pipeline's ``eval.metric`` scores it like any model. It takes the model's inputs as the
    model does (positional tensors, keyword tensors) and feeds them to the graph's inputs by
    name; it returns one tensor, or a tuple for several outputs."""

    def __init__(self, path: str, optimized: bool = True) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        if not optimized:  # ONNX's reference semantics: no fusion into integer kernels
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        feed = input_feed((*args, kwargs) if kwargs else args)
        device = next(iter(feed.values())).device
        outputs = self.session.run(None, {name: feed[name].detach().cpu().numpy()
                                          for name in self.input_names})
        tensors = tuple(torch.from_numpy(out).to(device) for out in outputs)
        return tensors[0] if len(tensors) == 1 else tensors


@torch.no_grad()
def _outputs(model: nn.Module, data: StageData, device: torch.device) -> list[np.ndarray]:
    """Every output tensor of ``model`` over the evaluation data, samples concatenated."""
    per_batch = [[t.float().cpu().numpy() for t in tree_leaves(call_model(model, data.model_input(b)))
                  if isinstance(t, torch.Tensor)] for b in data.evaluation(device)]
    return [np.concatenate(parts) for parts in zip(*per_batch, strict=True)]


def parity_mode(params: PipelineParams, outputs: list[np.ndarray]) -> str:
    """``argmax`` or ``cosine``: ``eval.onnx_parity``, ``auto`` by the outputs' shape."""
    if params.eval.onnx_parity != "auto":
        return params.eval.onnx_parity
    classifier = len(outputs) == 1 and outputs[0].ndim == 2 and outputs[0].shape[1] > 1
    return "argmax" if classifier else "cosine"


def _per_sample(outputs: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([o.reshape(len(o), -1) for o in outputs], axis=1)


def _cosines(expected: list[np.ndarray], got: list[np.ndarray]) -> np.ndarray:
    a, b = _per_sample(expected).astype(np.float64), _per_sample(got).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    same = np.isclose(a, b).all(axis=1)  # zero vectors included
    return np.where(same, 1.0, (a * b).sum(1) / np.maximum(norms, 1e-30))


def agreement(expected: list[np.ndarray], got: list[np.ndarray], mode: str
              ) -> tuple[dict[str, float], np.ndarray]:
    """The recorded numbers (share of agreeing samples, largest output difference; with
    ``cosine`` also the smallest cosine) and which samples agree."""
    diff = max(float(np.abs(e - g).max()) for e, g in zip(expected, got, strict=True))
    if mode == "argmax":
        same = expected[0].argmax(1) == got[0].argmax(1)
        return {"agreement": float(same.mean()), "max_abs_diff": diff}, same
    cosines = _cosines(expected, got)
    same = cosines >= MIN_COSINE
    return {"agreement": float(same.mean()), "max_abs_diff": diff,
            "min_cosine": float(cosines.min())}, same


def forced_gate(model: nn.Module, onnx_path: str, data: StageData,
                device: torch.device) -> ForcedParity:
    """Teacher-forced parity on the first ``FORCED_SAMPLES`` evaluation samples, or
    :class:`ParityError` naming the first quantization point (or the outputs) beyond it."""
    import onnx

    result = forced_parity(model, onnx.load(onnx_path), _first_inputs(data, device))
    problem = result.violation()
    if problem is not None:
        raise ParityError(f"the exported graph does not compute what the PyTorch model "
                          f"computes: {problem}; nothing was recorded")
    return result


def _first_inputs(data: StageData, device: torch.device):
    seen = 0
    for batch in data.evaluation(device):
        if seen >= FORCED_SAMPLES:
            return
        inputs = data.model_input(batch)
        yield inputs
        seen += len(tree_leaves(inputs)[0])


@pipeline_task(retries=1)
def evaluate_onnx(params: PipelineParams, dataset: Artifact, float_model: Artifact,
                  rounded: Artifact, onnx_model: Artifact) -> dict[str, float]:
    """The exported model on the evaluation data in ONNX Runtime. Parity gate: teacher-forced
    (:func:`forced_gate`, reference kernels). Recorded: ``eval.metric`` of the default
    (optimised) session, whose fused integer kernels may move an activation by a
    quantization step, both sessions' end-to-end agreement with PyTorch, and the gate's
    numbers (``forced_*``)."""
    data = open_data(params, dataset)
    cpu = torch.device("cpu")
    torch_model = calibrated_model(params, dataset, float_model, rounded)
    expected = _outputs(torch_model, data, compute_device(params))
    forced = forced_gate(torch_model, onnx_model.path, data, compute_device(params))
    mode = parity_mode(params, expected)
    reference = agreement(expected, _outputs(OnnxModule(onnx_model.path, optimized=False),
                                             data, cpu), mode)[0]
    deployed = OnnxModule(onnx_model.path)
    scores = {**agreement(expected, _outputs(deployed, data, cpu), mode)[0],
              **{f"reference_{k}": v for k, v in reference.items()}, **forced.summary()}
    float_cpu = load_float_model(params, float_model.file).cpu()
    scores.update(score(params, deployed, data.evaluation(cpu), float_cpu))
    run_logger(__name__).info("ONNX Runtime: %s", scores)
    return scores
