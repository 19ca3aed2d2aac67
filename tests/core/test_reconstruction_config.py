"""``AdaRoundConfig``: the seed's defaults, and a clear error for every bad value."""

from __future__ import annotations

import pydantic
import pytest

from adaround_core.reconstruction.reconstruction_config import AdaRoundConfig

SEED_DEFAULTS = {
    "num_batches": 10,
    "num_steps": 100,
    "exclude_prefix": [],
    "warm_up": 0.2,
    "weight": 0.01,
    "b_range": [20, 2],
}


@pytest.mark.parametrize("custom", [None, {}])
def test_defaults_equal_the_seeds(custom):
    cfg = AdaRoundConfig.from_dict(custom)
    assert cfg.num_batches == 10
    assert cfg.num_steps == 100
    assert cfg.exclude_prefix == []
    assert cfg.warm_up == 0.2
    assert cfg.weight == 0.01
    assert cfg.b_range == (20, 2)
    assert cfg.lr > 0 and cfg.guard == "layer" and cfg.batch_size is None


def test_the_seeds_dict_is_accepted_verbatim():
    cfg = AdaRoundConfig.from_dict(SEED_DEFAULTS)
    assert cfg == AdaRoundConfig.from_dict(None)
    assert cfg.b_range == (20.0, 2.0)


def test_the_seeds_example_dict():
    seed_example = {"num_batches": 16, "num_steps": 100, "exclude_prefix": ["head"]}
    cfg = AdaRoundConfig.from_dict(seed_example)
    assert (cfg.num_batches, cfg.num_steps, cfg.exclude_prefix) == (16, 100, ["head"])


def test_tuple_prefixes_become_a_list():
    assert AdaRoundConfig.from_dict({"exclude_prefix": ("a", "b.c")}).exclude_prefix == ["a", "b.c"]


def test_config_is_frozen():
    cfg = AdaRoundConfig.from_dict(None)
    with pytest.raises(pydantic.ValidationError):
        cfg.num_steps = 5


def test_input_dict_is_not_modified():
    custom = {"num_steps": 5}
    AdaRoundConfig.from_dict(custom)
    assert custom == {"num_steps": 5}


@pytest.mark.parametrize(("key", "suggestion"), [("num_step", "num_steps"), ("warmup", "warm_up"),
                                                 ("brange", "b_range")])
def test_unknown_key_suggests_the_closest(key, suggestion):
    with pytest.raises(ValueError, match=rf"unknown key '{key}'.*did you mean '{suggestion}'"):
        AdaRoundConfig.from_dict({key: 1})


def test_unknown_key_without_close_match_lists_known_keys():
    with pytest.raises(ValueError, match=r"unknown key 'zzz'.*known keys: .*num_steps"):
        AdaRoundConfig.from_dict({"zzz": 1})


@pytest.mark.parametrize(
    ("custom", "key"),
    [
        ({"num_steps": 1.5}, "num_steps"),
        ({"num_steps": True}, "num_steps"),
        ({"num_steps": "100"}, "num_steps"),
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": -3}, "num_steps"),
        ({"num_batches": 0}, "num_batches"),
        ({"num_batches": 2.0}, "num_batches"),
        ({"warm_up": -0.1}, "warm_up"),
        ({"warm_up": 1.5}, "warm_up"),
        ({"warm_up": "0.2"}, "warm_up"),
        ({"weight": -0.01}, "weight"),
        ({"b_range": [2, 20]}, "b_range"),
        ({"b_range": [5, 5]}, "b_range"),
        ({"b_range": [20, 0]}, "b_range"),
        ({"b_range": [-1, -2]}, "b_range"),
        ({"b_range": [20]}, "b_range"),
        ({"exclude_prefix": "head"}, "exclude_prefix"),
        ({"exclude_prefix": [1]}, "exclude_prefix"),
        ({"lr": 0.0}, "lr"),
        ({"batch_size": 0}, "batch_size"),
        ({"holdout_fraction": 1.0}, "holdout_fraction"),
        ({"num_threads": 0}, "num_threads"),
        ({"guard": "yes"}, "guard"),
        ({"guard_batches": 0}, "guard_batches"),
    ],
)
def test_bad_values_are_value_errors_naming_the_key(custom, key):
    with pytest.raises(ValueError, match=rf"custom_config_dict\['{key}"):
        AdaRoundConfig.from_dict(custom)


def test_prefix_string_error_shows_the_fix():
    with pytest.raises(ValueError, match=r"\['head'\]"):
        AdaRoundConfig.from_dict({"exclude_prefix": "head"})


@pytest.mark.parametrize(
    ("custom", "check"),
    [
        ({"warm_up": 0}, lambda c: c.warm_up == 0.0),
        ({"warm_up": 1}, lambda c: c.warm_up == 1.0),
        ({"b_range": (10, 1)}, lambda c: c.b_range == (10.0, 1.0)),
        ({"num_steps": 1}, lambda c: c.num_steps == 1),
        ({"weight": 0}, lambda c: c.weight == 0.0),
    ],
)
def test_edge_values_accepted(custom, check):
    assert check(AdaRoundConfig.from_dict(custom))
