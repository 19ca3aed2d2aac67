"""``weight_reconstruction`` end to end: the seed's flow, data paths, guard, and results."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from adaround_core.quant.fake_quantize import get_fake_quantize_states
from adaround_core.quant.quant_layers import quant_layers
from adaround_core.quantization import (
    FakeQuantState,
    QConfig,
    mix_calibration,
    prepare_qat_fx,
    set_fake_quantize,
    weight_reconstruction,
)

LAYERS = ["conv1", "conv2", "head"]


def _output(model, x):
    with torch.no_grad():
        return model(x)


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in quant_layers(model).items()}


def _nearest(weight: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Nearest rounding on the min-max symmetric per-channel grid, computed from scratch."""
    qmax = 2 ** (bits - 1) - 1
    scale = weight.abs().amax(dim=tuple(range(1, weight.dim()))) / (qmax + 0.5)
    zp = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(weight, scale, zp, 0, -qmax - 1, qmax)


def _activation_scales(model) -> dict[str, torch.Tensor]:
    return {n: m.input_fake_quant.scale.clone() for n, m in quant_layers(model).items()}


def _assert_on_grid(model) -> None:
    for name, layer in quant_layers(model).items():
        fq = layer.weight_fake_quant
        w = layer.weight.detach()
        assert bool(fq.frozen), name
        with torch.no_grad():
            assert torch.equal(fq(w), w), name  # the weight fake-quant reproduces it exactly
        zp = torch.zeros(fq.scale.numel(), dtype=torch.int32)
        ref = torch.fake_quantize_per_channel_affine(w, fq.scale, zp, layer.weight_axis,
                                                     fq.qmin, fq.qmax)
        assert torch.equal(ref, w), name


# --- the seed's flow -----------------------------------------------------------------


def test_mix_calibration_is_an_alias():
    assert mix_calibration is weight_reconstruction


def test_weights_end_on_the_grid_and_validation_is_idempotent(h, fast_cfg):
    float_model, q, batches = h.calibrated_cnn()
    before = _weights(q)
    report = weight_reconstruction(q, batches, None, fast_cfg)
    assert [r.name for r in report] == LAYERS
    assert len(report) == 3 and report[0].num_steps == 20
    set_fake_quantize(q, FakeQuantState.VALIDATION)
    _assert_on_grid(q)
    assert any(not torch.equal(before[n], w) for n, w in _weights(q).items())
    x = torch.randn(4, 3, 6, 6)
    first = _output(q, x)
    assert torch.equal(_output(q, x), first)
    set_fake_quantize(q, FakeQuantState.VALIDATION)
    assert torch.equal(_output(q, x), first)
    set_fake_quantize(q, FakeQuantState.VALIDATION)
    assert torch.equal(_output(q, x), first)
    _assert_on_grid(q)


def test_rounded_weights_are_within_one_step_of_the_float_weight(h, fast_cfg):
    _, q, batches = h.calibrated_cnn()
    before = _weights(q)
    weight_reconstruction(q, batches, None, fast_cfg)
    for name, layer in quant_layers(q).items():
        scale = layer.weight_fake_quant.scale.reshape(-1, *[1] * (layer.weight.dim() - 1))
        step = (layer.weight.detach() - before[name]).abs() / scale
        assert step.max().item() <= 1.0 + 1e-5, name  # floor or ceil, never further


def test_bias_is_untouched(h, fast_cfg):
    _, q, batches = h.calibrated_cnn()
    bias = {n: m.bias.detach().clone() for n, m in quant_layers(q).items()}
    weight_reconstruction(q, batches, None, fast_cfg)
    for n, m in quant_layers(q).items():
        assert torch.equal(m.bias, bias[n])


def test_called_in_calibration_state(h, fast_cfg):
    _, q, batches = h.calibrated_cnn()
    untouched = copy.deepcopy(q)
    states = get_fake_quantize_states(q)
    stats = {n: (m.input_fake_quant.observer.min_val.clone(),
                 m.input_fake_quant.observer.max_val.clone())
             for n, m in quant_layers(q).items()}
    weight_reconstruction(q, batches, None, fast_cfg)
    assert get_fake_quantize_states(q) == states  # still CALIBRATION
    assert set(states.values()) == {FakeQuantState.CALIBRATION}
    for n, m in quant_layers(q).items():
        obs = m.input_fake_quant.observer
        assert torch.equal(obs.min_val, stats[n][0]) and torch.equal(obs.max_val, stats[n][1])
    set_fake_quantize(q, FakeQuantState.VALIDATION)
    set_fake_quantize(untouched, FakeQuantState.VALIDATION)
    expected = _activation_scales(untouched)
    for n, s in _activation_scales(q).items():
        assert torch.equal(s, expected[n]), n
    _assert_on_grid(q)


def test_called_in_validation_state(h, fast_cfg):
    _, q, batches = h.calibrated_cnn()
    set_fake_quantize(q, FakeQuantState.VALIDATION)
    scales = _activation_scales(q)
    x = torch.randn(4, 3, 6, 6)
    nearest_out = _output(q, x)
    report = weight_reconstruction(q, batches, None, fast_cfg)
    assert len(report) == 3
    assert set(get_fake_quantize_states(q).values()) == {FakeQuantState.VALIDATION}
    assert all(torch.equal(s, scales[n]) for n, s in _activation_scales(q).items())
    _assert_on_grid(q)
    assert not torch.equal(_output(q, x), nearest_out)


@pytest.mark.parametrize("training", [True, False])
def test_training_flag_is_restored(h, fast_cfg, training):
    _, q, batches = h.calibrated_cnn()
    q.train(training)
    weight_reconstruction(q, batches, None, fast_cfg)
    assert all(m.training is training for m in q.modules())


def test_per_module_training_flags_are_restored(h, fast_cfg):
    _, q, batches = h.calibrated_cnn()
    q.train()
    q.conv2.eval()  # e.g. a frozen part of a model being fine-tuned
    flags = {n: m.training for n, m in q.named_modules()}
    weight_reconstruction(q, batches, None, fast_cfg)
    assert {n: m.training for n, m in q.named_modules()} == flags


def test_thread_setting_is_restored(h, fast_cfg):
    _, q, batches = h.calibrated_cnn()
    torch.set_num_threads(2)
    report = weight_reconstruction(q, batches, None, fast_cfg)
    assert torch.get_num_threads() == 2
    assert report.num_threads == 1  # the CPU default
    torch.set_num_threads(1)
    report = weight_reconstruction(q, batches, None, {**fast_cfg, "num_threads": 2, "num_steps": 2})
    assert report.num_threads == 2 and torch.get_num_threads() == 1


def test_original_float_model_is_untouched(h, fast_cfg):
    float_model, q, batches = h.calibrated_cnn()
    before = h.state_snapshot(float_model)
    weight_reconstruction(q, batches, None, fast_cfg)
    h.assert_same_state(before, float_model)


def test_same_inputs_same_result(h, fast_cfg):
    results = []
    for _ in range(2):
        _, q, batches = h.calibrated_cnn()
        weight_reconstruction(q, batches, None, fast_cfg)
        results.append(_weights(q))
    assert all(torch.equal(results[0][n], results[1][n]) for n in LAYERS)


# --- exclusion and order ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefixes", "rounded"),
    [(["head"], ["conv1", "conv2"]), (["conv"], ["head"]), (["conv1", "he"], ["conv2"])],
)
def test_excluded_layers_are_untouched(h, fast_cfg, prefixes, rounded):
    _, q, batches = h.calibrated_cnn()
    before = _weights(q)
    report = weight_reconstruction(q, batches, None, {**fast_cfg, "exclude_prefix": prefixes})
    assert [r.name for r in report] == rounded
    after = _weights(q)
    for name in LAYERS:
        if name not in rounded:
            assert torch.equal(after[name], before[name]), name
            assert not bool(q.get_submodule(name).weight_fake_quant.frozen)
    assert all(not torch.equal(after[n], before[n]) for n in rounded)


class CallOrder(nn.Module):
    """Registration order (head, mid, stem) is the reverse of the call order."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 2)
        self.mid = nn.Conv2d(4, 4, 1)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        x = self.mid(torch.relu(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


def test_rounding_order_is_the_first_call_order(h, fast_cfg):
    torch.manual_seed(0)
    q = prepare_qat_fx(CallOrder().eval())
    batches = h.make_batches(3, (2, 3, 5, 5))
    h.calibrate(q, batches)
    assert list(quant_layers(q)) == ["head", "mid", "stem"]
    report = weight_reconstruction(q, batches, None, fast_cfg)
    assert [r.name for r in report] == ["stem", "mid", "head"]


class SharedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.block = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        x = torch.relu(self.inp(x))
        x = torch.relu(self.block(x))
        x = torch.relu(self.block(x))  # the same module, called a second time
        return self.out(x)


def test_a_module_called_twice_is_rounded_once(h, fast_cfg):
    torch.manual_seed(0)
    q = prepare_qat_fx(SharedLayer().eval())
    batches = h.make_batches(3, (8, 5))
    h.calibrate(q, batches)
    report = weight_reconstruction(q, batches, None, fast_cfg)
    assert [r.name for r in report] == ["inp", "block", "out"]
    set_fake_quantize(q, FakeQuantState.VALIDATION)
    _assert_on_grid(q)


# --- data paths -----------------------------------------------------------------------


class ImageLabels(Dataset):
    """(image, label) pairs that record which indices were read."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(11)
        self.images = torch.randn(n, 3, 6, 6, generator=g)
        self.fetched: list[int] = []

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        self.fetched.append(i)
        return self.images[i], i % 3


def test_dataloader_path_uses_num_batches_and_matches_the_list_path(h, fast_cfg):
    ds = ImageLabels(40)
    loader = DataLoader(ds, batch_size=4)  # 10 batches
    _, q_loader, _ = h.calibrated_cnn()
    q_list = copy.deepcopy(q_loader)
    ds.fetched.clear()
    report = mix_calibration(q_loader, loader, lambda b: b[0], {**fast_cfg, "num_batches": 3})
    assert len(report) == 3
    assert set(ds.fetched) == set(range(12))  # only the first 3 batches were ever read
    first_three = [ds.images[i:i + 4] for i in range(0, 12, 4)]
    weight_reconstruction(q_list, first_three, None, fast_cfg)
    a, b = _weights(q_loader), _weights(q_list)
    assert all(torch.equal(a[n], b[n]) for n in LAYERS)


def test_list_path_uses_every_batch_whatever_num_batches(h, fast_cfg):
    _, q, _ = h.calibrated_cnn()
    batches = h.make_batches(5, (2, 3, 6, 6), seed=4)
    seen = set()
    q.register_forward_pre_hook(lambda m, args: seen.add(args[0].data_ptr()))
    weight_reconstruction(q, batches, None, {**fast_cfg, "num_batches": 2})
    assert {b.data_ptr() for b in batches} <= seen


def test_a_tuple_of_batches_works(h, fast_cfg):
    _, q, batches = h.calibrated_cnn()
    assert len(weight_reconstruction(q, tuple(batches), None, fast_cfg)) == 3


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.img = nn.Conv2d(3, 4, 3, padding=1)
        self.vec = nn.Linear(5, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x, y):
        return self.head(torch.relu(self.img(x).mean(dim=(2, 3)) + self.vec(y)))


def _two_input_setup(h):
    torch.manual_seed(0)
    q = prepare_qat_fx(TwoInputs().eval())
    g = torch.Generator().manual_seed(2)
    raw = [{"image": torch.randn(4, 3, 5, 5, generator=g), "aux": torch.randn(4, 5, generator=g),
            "label": torch.arange(4)} for _ in range(3)]
    h.calibrate(q, raw, lambda b: (b["image"], b["aux"]))
    return q, raw


def test_processed_tuple_is_positional_and_dict_is_keywords(h, fast_cfg):
    q_tuple, raw = _two_input_setup(h)
    q_dict = copy.deepcopy(q_tuple)
    as_tuple = weight_reconstruction(q_tuple, raw, lambda b: (b["image"], b["aux"]), fast_cfg)
    # keys in the reverse order of the parameters: only keyword passing gets this right
    as_dict = weight_reconstruction(q_dict, raw, lambda b: {"y": b["aux"], "x": b["image"]},
                                    fast_cfg)
    assert [r.name for r in as_tuple] == [r.name for r in as_dict] == ["img", "vec", "head"]
    a, b = _weights(q_tuple), _weights(q_dict)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_unprocessed_tuple_batches_are_positional(h, fast_cfg):
    q, raw = _two_input_setup(h)
    batches = [(b["image"], b["aux"]) for b in raw]
    assert len(weight_reconstruction(q, batches, None, fast_cfg)) == 3


# --- the guard ------------------------------------------------------------------------


def test_guard_keeps_nearest_rounding_where_adaround_is_worse(h):
    _, q, batches = h.calibrated_cnn()
    before = _weights(q)
    # a huge learning rate and no regulariser: the learned rounding is close to random
    bad = {"num_steps": 5, "lr": 100.0, "warm_up": 1.0, "progress": False}
    report = weight_reconstruction(q, batches, None, bad)
    kept = [r for r in report if r.decision == "nearest(layer)"]
    assert kept, report.format_table()
    for r in report:
        assert r.decision in ("nearest(layer)", "adaround")
        assert r.kept_nearest == (r.adaround_mse > r.nearest_mse)
    for r in kept:
        assert torch.equal(q.get_submodule(r.name).weight, _nearest(before[r.name])), r.name


def test_without_guard_the_learned_rounding_is_always_written(h):
    _, q, batches = h.calibrated_cnn()
    before = _weights(q)
    bad = {"num_steps": 5, "lr": 100.0, "warm_up": 1.0, "progress": False, "guard": False}
    report = weight_reconstruction(q, batches, None, bad)
    assert {r.decision for r in report} == {"adaround"}
    assert any(r.adaround_mse > r.nearest_mse for r in report)
    worse = [r.name for r in report if r.adaround_mse > r.nearest_mse]
    assert all(not torch.equal(q.get_submodule(n).weight, _nearest(before[n])) for n in worse)


# --- end to end: AdaRound beats nearest rounding -----------------------------------------


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(x)))
        x = F.avg_pool2d(x, 2).flatten(1)
        return self.head(torch.relu(self.fc(x)))


def _smooth_images(n: int, seed: int) -> torch.Tensor:
    """Images with spatially correlated pixels (upsampled noise), like natural images."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=(8, 8), mode="bilinear",
                         align_corners=False)


def test_adaround_beats_nearest_rounding_end_to_end(h):
    torch.manual_seed(0)
    float_model = h.randomize_batchnorms(SmallNet()).eval()
    batches = [_smooth_images(16, seed) for seed in range(8)]
    q = prepare_qat_fx(float_model, QConfig(weight_bits=3))
    h.calibrate(q, batches)
    nearest_model = copy.deepcopy(q)
    report = weight_reconstruction(q, batches, None, {"num_steps": 200, "progress": False})
    assert [r.name for r in report] == ["conv1", "conv2", "fc", "head"]
    better = [r.name for r in report if r.adaround_mse < r.nearest_mse]
    assert len(better) >= 3, report.format_table()
    assert all(r.adaround_mse <= r.nearest_mse or r.kept_nearest for r in report)

    x = _smooth_images(128, seed=100)
    ref = _output(float_model, x)
    set_fake_quantize(q, FakeQuantState.VALIDATION)
    set_fake_quantize(nearest_model, FakeQuantState.VALIDATION)
    adaround_err = (_output(q, x) - ref).pow(2).mean().item()
    nearest_err = (_output(nearest_model, x) - ref).pow(2).mean().item()
    assert adaround_err < nearest_err, (adaround_err, nearest_err)


# --- bad input: a clear error, and the model left exactly as it was ------------------------


def _fq_states_and_flags(model):
    return get_fake_quantize_states(model), [m.training for m in model.modules()]


def _assert_rejected(h, model, batches, exc, fragment, process=None, cfg=None):
    before = h.state_snapshot(model)
    states = _fq_states_and_flags(model)
    with pytest.raises(exc, match=fragment):
        weight_reconstruction(model, batches, process, cfg)
    h.assert_same_state(before, model)
    assert _fq_states_and_flags(model) == states


@pytest.mark.parametrize(
    ("cfg", "fragment"),
    [
        ({"num_step": 10}, r"unknown key 'num_step'.*did you mean 'num_steps'"),
        ({"num_steps": 1.5}, "num_steps"),
        ({"num_steps": True}, "num_steps"),
        ({"num_steps": 0}, "num_steps"),
        ({"num_batches": 0}, "num_batches"),
        ({"warm_up": -0.01}, "warm_up"),
        ({"warm_up": 1.01}, "warm_up"),
        ({"b_range": [2, 20]}, r"b_range.*decrease"),
        ({"b_range": [20, 0]}, r"b_range.*positive"),
        ({"b_range": [0, -2]}, r"b_range.*positive"),
        ({"exclude_prefix": "head"}, "exclude_prefix"),
        ({"exclude_prefix": ["conv", "head"]}, "exclude_prefix"),
    ],
)
def test_bad_config_is_rejected_before_anything_changes(h, cfg, fragment):
    _, q, batches = h.calibrated_cnn()
    _assert_rejected(h, q, batches, ValueError, fragment, cfg=cfg)


def test_empty_list_is_rejected(h):
    _, q, _ = h.calibrated_cnn()
    _assert_rejected(h, q, [], ValueError, "empty")


def test_empty_dataloader_is_rejected(h):
    _, q, _ = h.calibrated_cnn()
    _assert_rejected(h, q, DataLoader(ImageLabels(0), batch_size=4), ValueError, "empty",
                     process=lambda b: b[0])


def test_not_a_batch_source_is_rejected(h):
    _, q, _ = h.calibrated_cnn()
    _assert_rejected(h, q, 42, TypeError, "batches")


def test_one_shot_generator_is_rejected(h):
    _, q, batches = h.calibrated_cnn()
    _assert_rejected(h, q, (b for b in batches), ValueError, "one-shot iterator")


def test_plain_module_is_rejected(h):
    model = h.cnn()
    _assert_rejected(h, model, [torch.randn(2, 3, 6, 6)], ValueError, "never prepared")


def test_not_a_module_is_rejected():
    with pytest.raises(TypeError, match="calib_model"):
        weight_reconstruction(lambda x: x, [torch.randn(2, 3)])


def test_prepared_but_never_calibrated_is_rejected(h):
    q = prepare_qat_fx(h.cnn())  # the seed's way: no example inputs, BatchNorm fold pending
    q.eval()
    set_fake_quantize(q, FakeQuantState.CALIBRATION)
    _assert_rejected(h, q, [torch.randn(2, 3, 6, 6)], ValueError, "never calibrated")


def test_prepared_but_never_calibrated_after_a_float_forward_is_rejected(h):
    q = prepare_qat_fx(h.cnn())
    _output(q.eval(), torch.randn(2, 3, 6, 6))  # folded, but nothing observed
    _assert_rejected(h, q, [torch.randn(2, 3, 6, 6)], ValueError, "never calibrated")


def _with(value, index, n=4):
    """``n`` batches, batch ``index`` holding one ``value``."""
    g = torch.Generator().manual_seed(9)
    batches = [torch.randn(4, 3, 6, 6, generator=g) for _ in range(n)]
    batches[index][0, 0, 0, 0] = value
    return batches


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("index", [0, 2])
def test_non_finite_values_in_a_list_are_rejected(h, value, index):
    _, q, _ = h.calibrated_cnn()
    _assert_rejected(h, q, _with(value, index), ValueError, rf"batch {index} .*NaN or Inf")


class ListDataset(Dataset):
    def __init__(self, images: list[torch.Tensor]) -> None:
        self.images = torch.cat(images)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], 0


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("index", [0, 2])
def test_non_finite_values_in_a_dataloader_are_rejected(h, value, index):
    _, q, _ = h.calibrated_cnn()
    loader = DataLoader(ListDataset(_with(value, index)), batch_size=4)
    _assert_rejected(h, q, loader, ValueError, rf"batch {index} .*NaN or Inf",
                     process=lambda b: b[0])


def test_batch_on_another_device_is_rejected(h):
    _, q, batches = h.calibrated_cnn()
    on_meta = [b.to("meta") for b in batches]
    _assert_rejected(h, q, on_meta, ValueError, r"meta")


def test_streamed_batch_on_another_device_is_rejected(h):
    _, q, batches = h.calibrated_cnn()
    loader = DataLoader(ListDataset(batches), batch_size=4)
    _assert_rejected(h, q, loader, ValueError, r"meta", process=lambda b: b[0].to("meta"))
