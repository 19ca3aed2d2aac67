"""What the fast optimisation loop must keep: the algorithm and path-independence.

* The hand-written gradient of :class:`SoftRounding` equals autograd through the
  reference equations of :mod:`adaround_core.reconstruction.adaround_math` (docs/weight_reconstruction.md).
* :class:`FusedAdam` is ``torch.optim.Adam(fused=True)`` step for step.
* The whole loop rounds like the plain autograd loop it replaced.
* The in-memory library path (``LayerSamples.from_tensors``) and the pipeline path
  (``LayerSamples.from_cache`` over disk shards) give bit-identical weights and
  reports for the same seed.
"""

from __future__ import annotations

import copy

import pytest
import torch

from adaround_core.calibration.layer_capture import first_call_order, iter_layer_io
from adaround_core.calibration.layer_samples import LayerSamples
from adaround_core.calibration.sample_store import write_layer_cache
from adaround_core.quant.fake_quantize import FakeQuantState
from adaround_core.quant.model_modes import eval_mode, fake_quant_state, float_reference
from adaround_core.quant.qconfig import QConfig
from adaround_core.quant.quant_layers import quant_layers
from adaround_core.quantization import prepare_qat_fx
from adaround_core.reconstruction import adaround_math as am
from adaround_core.reconstruction.layer_reconstruction import (
    layer_generator,
    optimise_rounding,
    reconstruct_layer,
)
from adaround_core.reconstruction.reconstruction_config import AdaRoundConfig
from adaround_core.reconstruction.soft_rounding import FusedAdam, SoftRounding


def _grid_case(shape=(6, 5, 3, 3), bits=3, seed=0):
    """A weight whose grid has clamped entries on both sides and exact grid points."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=g)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    amax = weight.abs().flatten(1).amax(1)
    scale = (amax / (qmax + 0.5) * 0.7).reshape(-1, *[1] * (len(shape) - 1))  # clips
    weight.view(-1)[:4] = (torch.arange(4) - 2.0) * scale.view(-1)[0]  # on the grid
    return weight, scale, qmin, qmax


def _autograd_grad(weight, scale, qmin, qmax, v, x, target, reg_weight, beta):
    """dL/dV by autograd through the reference equations, for a conv layer."""
    w_floor, _ = am.split_on_grid(weight, scale)
    v = v.clone().requires_grad_(True)
    h = am.rectified_sigmoid(v)
    out = torch.nn.functional.conv2d(x, am.soft_quantized_weight(w_floor, h, scale, qmin, qmax))
    loss = am.reconstruction_loss(out, target, 1)
    if beta is not None:
        loss = loss + reg_weight * am.rounding_regularizer(h, beta)
    loss.backward()
    return v.grad


@pytest.mark.parametrize("beta", [None, 20.0, 7.3, 2.0, 1.0])
def test_hand_gradient_matches_autograd(beta):
    weight, scale, qmin, qmax = _grid_case()
    rounding = SoftRounding(weight, scale, qmin, qmax)
    g = torch.Generator().manual_seed(1)
    # spread V so that some h(V) are clamped at 0 and 1
    rounding.v.add_(torch.randn(rounding.v.shape, generator=g) * 3)
    x = torch.randn(4, 5, 7, 7, generator=g)
    target = torch.randn(4, 6, 5, 5, generator=g)
    soft = rounding.update_soft_weight()
    w_floor, _ = am.split_on_grid(weight, scale)
    reference = am.soft_quantized_weight(w_floor, am.rectified_sigmoid(rounding.v), scale,
                                         qmin, qmax)
    assert torch.allclose(soft, reference, rtol=1e-6, atol=1e-7)
    leaf = soft.clone().requires_grad_(True)
    out = torch.nn.functional.conv2d(x, leaf)
    grad_out = (out - target).detach() * (2.0 / (out.numel() // out.shape[1]))
    (grad_w,) = torch.autograd.grad(out, leaf, grad_out)
    got = rounding.grad_v(grad_w, 0.05, beta)
    expected = _autograd_grad(weight, scale, qmin, qmax, rounding.v, x, target, 0.05, beta)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)
    assert (expected == 0).any() and (expected != 0).any()
    assert torch.equal(got == 0, expected == 0)  # the same entries are cut off by the clamps


def test_hard_weight_matches_the_reference():
    weight, scale, qmin, qmax = _grid_case()
    rounding = SoftRounding(weight, scale, qmin, qmax)
    rounding.v.add_(torch.randn(rounding.v.shape))
    w_floor, _ = am.split_on_grid(weight, scale)
    expected = am.hard_quantized_weight(w_floor, rounding.v, scale, qmin, qmax)
    assert torch.equal(rounding.hard_weight(), expected)


LAYERS = {
    "linear": (lambda: torch.nn.Linear(7, 5), (6, 7)),
    "linear-3d-input": (lambda: torch.nn.Linear(7, 5), (3, 4, 7)),
    "conv1d": (lambda: torch.nn.Conv1d(4, 6, 3, stride=2, padding=1), (3, 4, 11)),
    "conv2d-groups-dilation": (lambda: torch.nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2,
                                                       groups=2), (3, 4, 9, 9)),
    "conv3d": (lambda: torch.nn.Conv3d(2, 3, 2, bias=False), (2, 2, 4, 4, 4)),
    "conv2d-reflect": (lambda: torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
                       (2, 3, 6, 6)),
    "conv2d-same": (lambda: torch.nn.Conv2d(3, 4, 3, padding="same"), (2, 3, 6, 6)),
    "convtranspose2d": (lambda: torch.nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1,
                                                         output_padding=1, groups=2),
                        (3, 4, 5, 5)),
    "convtranspose1d": (lambda: torch.nn.ConvTranspose1d(3, 2, 4, stride=3), (2, 3, 7)),
    "conv2d-unbatched": (lambda: torch.nn.Conv2d(3, 4, 3), (3, 6, 6)),
    "linear-1d-input": (lambda: torch.nn.Linear(7, 5), (7,)),
}


@pytest.mark.parametrize("kind", list(LAYERS))
def test_weight_vjp_matches_autograd(kind, device):
    make, shape = LAYERS[kind]
    layer = prepare_qat_fx(torch.nn.Sequential(make()), QConfig(activation_bits=None))[0]
    layer.to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device)
    weight = torch.randn(layer.weight.shape, generator=g).to(device)
    output, backward = layer.weight_vjp(x, weight)
    leaf = weight.clone().requires_grad_(True)
    expected = layer.forward_with_weight(x, leaf)
    grad_output = torch.randn(expected.shape, generator=g).to(device)
    (expected_grad,) = torch.autograd.grad(expected, leaf, grad_output)
    assert not output.requires_grad
    assert torch.allclose(output, expected.detach(), rtol=1e-5, atol=1e-6)
    output.fill_(float("nan"))  # the output is the caller's to overwrite (the loss's gradient)
    assert torch.allclose(backward(grad_output), expected_grad, rtol=1e-4, atol=1e-5)
    assert layer.bias is None or layer.bias.grad is None  # the bias is never differentiated


def test_fused_adam_is_torch_adam_step_for_step(device):
    g = torch.Generator().manual_seed(0)
    ours = torch.randn(300, generator=g).to(device)
    theirs = ours.clone().requires_grad_(True)
    adam = FusedAdam(ours, lr=0.01)
    reference = torch.optim.Adam([theirs], lr=0.01, fused=True)
    plain = ours.clone().requires_grad_(True)
    plain_adam = torch.optim.Adam([plain], lr=0.01)
    for _ in range(25):
        grad = torch.randn(300, generator=g).to(device)
        adam.step(grad.clone())
        theirs.grad = grad.clone()
        reference.step()
        plain.grad = grad.clone()
        plain_adam.step()
    assert torch.equal(ours, theirs.detach())
    assert torch.allclose(ours, plain.detach(), rtol=1e-5, atol=1e-6)


def _autograd_loop(layer, samples, cfg, generator):
    """The plain autograd loop the fast one replaced (reference equations, torch Adam)."""
    scale, qmin, qmax = layer.weight_qparams()
    w_floor, rest = am.split_on_grid(layer.weight.detach(), scale)
    v = am.init_rounding_variable(rest).requires_grad_(True)
    optimizer = torch.optim.Adam([v], lr=cfg.lr)
    for step in range(cfg.num_steps):
        x, target = samples.sample(cfg.batch_size or samples.default_batch_size, generator)
        h = am.rectified_sigmoid(v)
        out = layer.forward_with_weight(x, am.soft_quantized_weight(w_floor, h, scale, qmin, qmax))
        loss = am.reconstruction_loss(out, target, layer.output_channel_dim)
        beta = am.beta_at(step, cfg.num_steps, cfg.warm_up, cfg.b_range)
        if beta is not None:
            loss = loss + cfg.weight * am.rounding_regularizer(h, beta)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return am.hard_quantized_weight(w_floor, v.detach(), scale, qmin, qmax)


def test_fast_loop_rounds_like_the_autograd_loop(h):
    _, model, batches = h.calibrated_cnn(num_batches=6, batch=8)
    cfg = AdaRoundConfig.from_dict({"num_steps": 60, "progress": False})
    float_model = float_reference(model)
    layers = quant_layers(model)
    agree = total = 0
    with eval_mode(model), fake_quant_state(model, FakeQuantState.VALIDATION):
        for name, layer in layers.items():
            layer.freeze_weight_qparams()
            pairs = list(iter_layer_io(model, float_model, name, 1, batches))
            results = []
            for loop in (optimise_rounding, _autograd_loop):
                gen = torch.Generator().manual_seed(3)
                samples = LayerSamples.from_tensors([p[0] for p in pairs],
                                                    [p[1] for p in pairs], 0.1, gen)
                results.append(loop(layer, samples, cfg, gen))
            agree += int((results[0] == results[1]).sum())
            total += results[0].numel()
    # float rounding differs between the two (sums in another order), so a weight whose
    # h(V) ends exactly at 0.5 could flip; none does here
    assert agree == total


def _capture_and_cache(model, float_model, name, batches, directory):
    pairs = list(iter_layer_io(model, float_model, name, 1, batches))
    directory.mkdir()
    write_layer_cache(directory, pairs)
    return [p[0] for p in pairs], [p[1] for p in pairs]


@pytest.mark.parametrize("two_shapes", [False, True])
def test_memory_and_disk_paths_give_bit_identical_weights(h, tmp_path, two_shapes, device):
    _, model, batches = h.calibrated_cnn(num_batches=5, batch=6)
    if two_shapes:  # a second input resolution: two sample groups, drawn by multinomial
        batches = batches + h.make_batches(3, (6, 3, 8, 8), seed=9)
    model.to(device)
    batches = [b.to(device) for b in batches]
    cfg = AdaRoundConfig.from_dict({"num_steps": 40, "progress": False, "seed": 5})
    memory_model, disk_model = model, copy.deepcopy(model)
    float_model = float_reference(model)
    with eval_mode(memory_model), eval_mode(disk_model), \
            fake_quant_state(memory_model, FakeQuantState.VALIDATION), \
            fake_quant_state(disk_model, FakeQuantState.VALIDATION):
        order, _ = first_call_order(memory_model, quant_layers(memory_model), batches[0])
        for name in order:
            mem_layer = quant_layers(memory_model)[name]
            disk_layer = quant_layers(disk_model)[name]
            mem_layer.freeze_weight_qparams()
            disk_layer.freeze_weight_qparams()
            inputs, targets = _capture_and_cache(memory_model, float_model, name, batches,
                                                 tmp_path / name)
            gen = layer_generator(cfg.seed, name)
            mem = reconstruct_layer(name, mem_layer, LayerSamples.from_tensors(
                inputs, targets, cfg.holdout_fraction, gen), cfg, gen)
            gen = layer_generator(cfg.seed, name)
            disk = reconstruct_layer(name, disk_layer, LayerSamples.from_cache(
                tmp_path / name, cfg.holdout_fraction, gen, device), cfg, gen)
            assert torch.equal(mem_layer.weight, disk_layer.weight), name
            assert (mem.nearest_mse, mem.adaround_mse, mem.decision) == \
                (disk.nearest_mse, disk.adaround_mse, disk.decision), name
    assert order == ["conv1", "conv2", "head"]
