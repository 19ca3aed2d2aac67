"""Forward-pass plumbing: the order layers run in, and capturing one layer's I/O.

Capturing stops the forward pass as soon as the layer has fired (for a layer
called several times, after its last call): nothing past it is computed.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from adaround_core.calibration.activation_codes import ActivationCodes, cached_input
from adaround_core.calibration.batches import call_model


class _LayerReached(Exception):
    """Raised inside a forward pass once the captured layer has fired for the last time."""


def first_call_order(model: nn.Module, layers: dict[str, nn.Module],
                     batch: Any) -> tuple[list[str], Counter[str]]:
    """Names of ``layers`` in the order a forward pass first calls them, and call counts.

    Layers the forward pass never calls are left out.
    """
    names = {module: name for name, module in layers.items()}
    order: list[str] = []
    calls: Counter[str] = Counter()

    def pre_hook(module: nn.Module, args: tuple) -> None:
        name = names[module]
        if name not in calls:
            order.append(name)
        calls[name] += 1

    with _hooks([m.register_forward_pre_hook(pre_hook) for m in names]), torch.no_grad():
        call_model(model, batch)
    return order, calls


@contextlib.contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _run_until(model: nn.Module, batch: Any) -> None:
    with contextlib.suppress(_LayerReached), torch.no_grad():
        call_model(model, batch)


def _check_single_input(name: str, args: tuple, kwargs: dict) -> None:
    if len(args) != 1 or kwargs:
        raise ValueError(f"layer {name!r} is called with extra arguments, which AdaRound does "
                         f"not replay; leave it out with exclude_prefix")


def iter_layer_io(quant_model: nn.Module, float_model: nn.Module, name: str,
                  expected_calls: int, batches: Iterable[Any], quantize_input: bool = True,
                  codes: bool = False,
                  ) -> Iterator[tuple[torch.Tensor | ActivationCodes, torch.Tensor]]:
    """Per batch (and per call of the layer): the layer's fake-quantized input in
    ``quant_model`` (its input before ``input_fake_quant`` when ``quantize_input`` is
    False; with ``codes``, as integer codes where its quantizer gives them) and its output
    in ``float_model`` (same qualified ``name`` in both).

    Streams: only one batch's tensors are alive at a time.
    """
    # With several calls the pass runs on after the first, and a later in-place op (a
    # ``relu_``) could change what was taken: then every taken tensor is a copy.
    own = (lambda t: t.clone()) if expected_calls > 1 else (lambda t: t)

    def take_input(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        _check_single_input(name, args, kwargs)
        return cached_input(module, args[0], quantize_input, codes, own)

    yield from iter_module_calls(quant_model, float_model, name, expected_calls, batches,
                                 take_input, lambda output: own(output.detach()))


def iter_module_calls(quant_model: nn.Module, float_model: nn.Module, name: str,
                      expected_calls: int, batches: Iterable[Any],
                      take_input: Callable[[nn.Module, tuple, dict], Any],
                      take_output: Callable[[Any], Any]) -> Iterator[tuple[Any, Any]]:
    """Per batch (and per call of module ``name``): ``take_input`` of the module's call
    arguments in ``quant_model`` and ``take_output`` of its output in ``float_model``.
    Each pass stops once the module has been called ``expected_calls`` times."""
    quant_module = quant_model.get_submodule(name)
    float_module = float_model.get_submodule(name)
    inputs: list[Any] = []
    targets: list[Any] = []

    def grab_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
        inputs.append(take_input(module, args, kwargs))
        if len(inputs) == expected_calls:
            raise _LayerReached

    def grab_output(module: nn.Module, args: tuple, output: Any) -> None:
        targets.append(take_output(output))
        if len(targets) == expected_calls:
            raise _LayerReached

    handles = [quant_module.register_forward_pre_hook(grab_input, with_kwargs=True),
               float_module.register_forward_hook(grab_output)]
    with _hooks(handles):
        for batch in batches:
            inputs.clear()
            targets.clear()
            _run_until(quant_model, batch)
            _run_until(float_model, batch)
            if len(inputs) != len(targets):
                raise RuntimeError(f"module {name!r} ran {len(inputs)} times in the quantized "
                                   f"model but {len(targets)} times in the float model")
            yield from zip(list(inputs), list(targets), strict=True)


def capture_layer_io(quant_model: nn.Module, float_model: nn.Module, name: str,
                     expected_calls: int, batches: Iterable[Any], quantize_input: bool = True,
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """All of :func:`iter_layer_io` as two lists (inputs, targets), in memory."""
    pairs = list(iter_layer_io(quant_model, float_model, name, expected_calls, batches,
                               quantize_input))
    return [x for x, _ in pairs], [y for _, y in pairs]
