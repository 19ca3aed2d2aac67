"""Block reconstruction (BRECQ): blocks rounded jointly, the rest as before."""

from __future__ import annotations

import pytest
import torch
from block_models import TinyResNet, bert_batches, tiny_bert

from adaround_core.calibration.layer_samples import LayerSamples
from adaround_core.calibration.unit_samples import unit_samples
from adaround_core.quantization import (
    FakeQuantState,
    QConfig,
    prepare_qat_fx,
    set_fake_quantize,
    weight_reconstruction,
)
from adaround_core.reconstruction.layer_reconstruction import layer_generator, reconstruct_layer
from adaround_core.reconstruction.reconstruction_config import AdaRoundConfig
from adaround_core.reconstruction.unit_reconstruction import reconstruct_unit
from adaround_core.reconstruction.units import Unit

W4A4 = QConfig(weight_bits=4, activation_bits=4)


def _calibrated(h, float_model, batches, qconfig=W4A4):
    q = prepare_qat_fx(float_model, qconfig)
    h.calibrate(q, batches)
    return q


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith("weight")}


def test_block_reconstruction_lowers_each_block_output_error_below_nearest(h):
    torch.manual_seed(0)
    batches = h.make_batches(6, (8, 3, 8, 8))
    q = _calibrated(h, TinyResNet().eval(), batches)
    report = weight_reconstruction(q, batches, None, {
        "granularity": "block", "num_steps": 60, "progress": False, "guard": False})
    rows = {r.name: r for r in report}
    assert list(rows) == ["stem", "stage.0", "stage.1", "head"]
    assert rows["stage.1"].layers == ("stage.1.conv1", "stage.1.conv2", "stage.1.shortcut")
    for block in ("stage.0", "stage.1"):
        assert rows[block].adaround_mse < rows[block].nearest_mse
    assert "stage.1" in report.format_table()


def test_block_weights_end_on_their_grid(h):
    batches = h.make_batches(3, (4, 3, 8, 8))
    q = _calibrated(h, TinyResNet().eval(), batches)
    weight_reconstruction(q, batches, None, {"granularity": "block", "num_steps": 10,
                                             "progress": False, "guard": False})
    set_fake_quantize(q, FakeQuantState.VALIDATION)
    for name in ("stage.0.conv1", "stage.1.shortcut"):
        layer = q.get_submodule(name)
        assert torch.equal(layer.weight_fake_quant(layer.weight), layer.weight)


def test_block_granularity_without_blocks_is_layer_wise_adaround_bit_for_bit(h, fast_cfg):
    results = []
    for granularity in ("layer", "block"):
        _, q, batches = h.calibrated_cnn()
        weight_reconstruction(q, batches, None, {**fast_cfg, "granularity": granularity})
        results.append(_weights(q))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])


def test_bert_layers_take_hidden_states_and_mask_and_excluded_layers_stay(h):
    batches = bert_batches(4)
    q = _calibrated(h, tiny_bert(), batches, QConfig(weight_bits=4, activation_bits=8))
    before = _weights(q)
    report = weight_reconstruction(q, batches, None, {
        "granularity": "block", "num_steps": 10, "progress": False,
        "exclude_prefix": ["layers.0.attention.query"]})
    rows = {r.name: r for r in report}
    assert list(rows) == ["layers.0", "layers.1"]
    assert "layers.0.attention.query" not in rows["layers.0"].layers
    assert len(rows["layers.1"].layers) == 6
    after = _weights(q)
    assert torch.equal(after["layers.0.attention.query.weight"],
                       before["layers.0.attention.query.weight"])
    assert not torch.equal(after["layers.0.ffn_in.weight"], before["layers.0.ffn_in.weight"])


@pytest.mark.parametrize("extra", [{"drop_prob": 0.5}, {"activation_lr": 1e-3}])
def test_blocks_take_qdrop_and_learned_scales(h, extra):
    batches = h.make_batches(3, (4, 3, 8, 8))
    q = _calibrated(h, TinyResNet().eval(), batches)
    report = weight_reconstruction(q, batches, None, {
        "granularity": "block", "num_steps": 10, "progress": False, **extra})
    assert [r.name for r in report] == ["stem", "stage.0", "stage.1", "head"]


def test_a_block_its_forward_never_calls_is_an_error_naming_it(h):
    class Direct(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))

        def forward(self, x):
            return self.block[1](self.block[0](x))

    batches = h.make_batches(2, (4, 4))
    q = _calibrated(h, Direct().eval(), batches)
    before = h.state_snapshot(q)
    with pytest.raises(ValueError, match="block 'block' is never called"):
        weight_reconstruction(q, batches, None, {"granularity": "block", "blocks": ["block"],
                                                 "progress": False})
    h.assert_same_state(before, q)


def test_the_autograd_unit_path_on_one_layer_learns_the_fast_paths_rounding(h):
    """Same loss, same schedule, same draws: the two gradients differ only by float
    rounding, so (almost) every weight rounds the same way."""
    cfg = AdaRoundConfig(num_steps=50, progress=False, guard=False)
    results = []
    for path in ("fast", "autograd"):
        _, q, batches = h.calibrated_mlp(qconfig=QConfig(activation_bits=None))
        set_fake_quantize(q, FakeQuantState.VALIDATION)
        layer = q.fc2
        layer.freeze_weight_qparams()
        with torch.no_grad():
            inputs = [torch.relu(q.fc1(b)) for b in batches]
            targets = [layer(x) for x in inputs]
        generator = layer_generator(cfg.seed, "fc2")
        if path == "fast":
            samples = LayerSamples.from_tensors(inputs, targets, cfg.holdout_fraction, generator)
            reconstruct_layer("fc2", layer, samples, cfg, generator)
        else:
            calls = [((x,), {}, y) for x, y in zip(inputs, targets, strict=True)]
            samples = unit_samples("fc2", calls, cfg.holdout_fraction, generator)
            reconstruct_unit(Unit("fc2", ("fc2",)), layer, {"fc2": layer}, samples, cfg, generator)
        results.append(layer.weight.detach().clone())
    same = (results[0] == results[1]).float().mean().item()
    assert same >= 0.98, f"only {same:.1%} of the weights round the same way"
