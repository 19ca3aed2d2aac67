"""Block discovery: residual, inverted-residual and transformer blocks; given blocks checked."""

from __future__ import annotations

import pytest
from block_models import TinyMobileNet, TinyResNet, tiny_bert
from torch import nn

from adaround_core.quantization import prepare_qat_fx
from adaround_core.reconstruction.block_discovery import adds_its_input, check_blocks, find_blocks
from adaround_core.reconstruction.reconstruction_config import AdaRoundConfig
from adaround_core.reconstruction.units import plan_units


def test_residual_blocks_of_a_stage_are_found():
    assert find_blocks(prepare_qat_fx(TinyResNet())) == ["stage.0", "stage.1"]


def test_inverted_residuals_are_blocks_with_or_without_shortcut():
    model = prepare_qat_fx(TinyMobileNet())
    assert adds_its_input(model.features[3]) and not adds_its_input(model.features[2])
    assert find_blocks(model) == ["features.2", "features.3"]


def test_transformer_layers_of_bert_are_blocks():
    assert find_blocks(prepare_qat_fx(tiny_bert())) == ["layers.0", "layers.1"]


def test_a_plain_stack_has_no_blocks():
    model = prepare_qat_fx(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(
        nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))))
    assert find_blocks(model) == []


def test_units_keep_layers_outside_blocks_alone_in_call_order():
    model = prepare_qat_fx(TinyResNet())
    selected = ["stem", "stage.0.conv1", "stage.0.conv2", "stage.1.conv1", "stage.1.conv2",
                "stage.1.shortcut", "head"]
    units = plan_units(model, selected, AdaRoundConfig(granularity="block"))
    assert [(u.name, u.layers, u.is_block) for u in units] == [
        ("stem", ("stem",), False),
        ("stage.0", ("stage.0.conv1", "stage.0.conv2"), True),
        ("stage.1", ("stage.1.conv1", "stage.1.conv2", "stage.1.shortcut"), True),
        ("head", ("head",), False)]


def test_given_blocks_replace_discovery():
    model = prepare_qat_fx(TinyResNet())
    cfg = AdaRoundConfig(granularity="block", blocks=["stage."])
    units = plan_units(model, ["stem", "stage.0.conv1", "stage.1.conv2", "head"], cfg)
    assert [u.name for u in units] == ["stem", "stage", "head"]


@pytest.mark.parametrize(("blocks", "message"), [
    (["stage.2"], "no module named 'stage.2'"),
    (["stage.0.conv1.bias"], "no module named"),
    (["stage", "stage.0"], "'stage.0' lies inside 'stage'"),
])
def test_bad_blocks_are_errors_naming_the_key(blocks, message):
    with pytest.raises(ValueError, match="custom_config_dict\\['blocks'\\]") as err:
        check_blocks(prepare_qat_fx(TinyResNet()), blocks)
    assert message in str(err.value)


def test_a_block_without_quantized_layers_is_an_error():
    model = prepare_qat_fx(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    with pytest.raises(ValueError, match="holds no quantized layer"):
        check_blocks(model, ["1"])


@pytest.mark.parametrize(("config", "key"), [
    ({"granularity": "blocks"}, "granularity"),
    ({"blocks": ["stage"]}, "blocks"),
    ({"granularity": "block", "blocks": "stage"}, "blocks"),
    ({"drop_prob": 1.0}, "drop_prob"),
    ({"drop_prob": -0.1}, "drop_prob"),
    ({"activation_lr": 0.0}, "activation_lr"),
    ({"activation_lr": "1e-3"}, "activation_lr"),
])
def test_new_keys_are_validated_naming_the_key(config, key):
    with pytest.raises(ValueError, match=key):
        AdaRoundConfig.from_dict(config)


def test_defaults_are_plain_layer_wise_adaround():
    cfg = AdaRoundConfig.from_dict({})
    assert (cfg.granularity, cfg.blocks, cfg.drop_prob, cfg.activation_lr) == \
        ("layer", None, 0.0, None)
    assert not cfg.trains_activations
