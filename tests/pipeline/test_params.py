"""Bad input fails clearly and early: unknown keys, wrong types, callables that do not import."""

from __future__ import annotations

import sys

import pytest
import yaml
from conftest import REPO, project_env, run_cmd, write_params

from flows.pipeline import pipeline_flow
from flows.stages import adaround_flow, train_flow
from tasks.layout import Layout
from tasks.params import PipelineParams, PreflightError, load_params, parse_params
from tasks.preflight import callables_needed_from, check_callables, preflight


@pytest.mark.parametrize(("raw", "message"), [
    ({"adaround": {"num_step": 5}}, "adaround.num_step: unknown key; did you mean 'num_steps'?"),
    ({"adaroun": {"num_steps": 5}}, "adaroun: unknown key; did you mean 'adaround'?"),
    ({"tracking": {"uri": "x"}}, "tracking.uri: unknown key"),
])
def test_an_unknown_key_is_an_error_naming_it(raw, message):
    with pytest.raises(ValueError) as err:
        parse_params(raw)
    assert message in str(err.value)


@pytest.mark.parametrize(("raw", "key"), [
    ({"adaround": {"num_steps": "many"}}, "adaround.num_steps"),
    ({"quant": {"weight_bits": 2.5}}, "quant.weight_bits"),
    ({"tracking": {"enabled": "yes"}}, "tracking.enabled"),
    ({"runtime": {"task_runner": "ray"}}, "runtime.task_runner"),
    ({"train": {"kwargs": ["epochs", 2]}}, "train.kwargs"),
])
def test_a_value_of_the_wrong_type_is_an_error_naming_the_key(raw, key):
    with pytest.raises(ValueError) as err:
        parse_params(raw)
    assert str(err.value).startswith(f"params.yaml: {key}: ")


def test_the_repository_params_file_is_valid_and_lists_every_knob():
    params = load_params(REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(raw) == set(PipelineParams.model_fields)
    for section, field in PipelineParams.model_fields.items():
        assert set(raw[section]) == set(field.annotation.model_fields), section
    check_callables(params)  # the shipped callables import


@pytest.mark.parametrize(("key", "spec", "message"), [
    ("data.source", "no_such_module:digits", "cannot import module 'no_such_module'"),
    ("model.factory", "adaround_core.demo.models:NoSuchModel", "has no attribute 'NoSuchModel'"),
    ("eval.metric", "math:pi", "not a callable"),
    ("train.trainer", "adaround_core.demo.training:no_trainer", "has no attribute 'no_trainer'"),
    ("eval.metric", "top1", "is not of the form 'package.module:function'"),
])
def test_a_callable_that_does_not_import_is_an_error_naming_the_key(key, spec, message):
    section, name = key.split(".")
    params = parse_params({section: {name: spec}})
    with pytest.raises(PreflightError) as err:
        check_callables(params)
    assert str(err.value).startswith(f"params.yaml: {key}: ") and message in str(err.value)


def test_flows_check_the_callables_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, {"eval": {"metric": "adaround_core.demo.training:no_metric"}})
    params = load_params(tmp_path / "params.yaml")
    for flow in (pipeline_flow, train_flow, adaround_flow):
        with pytest.raises(PreflightError, match="eval.metric"):
            flow.fn(params)  # the flow body, without a Prefect run
    layout = Layout(params)
    assert not layout.dataset.exists() and not layout.float_checkpoint.exists()


def test_a_stage_checks_only_the_callables_it_or_a_later_stage_calls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, {"train": {"trainer": "no_such_module:train"}})
    params = load_params(tmp_path / "params.yaml")
    with pytest.raises(PreflightError, match="train.trainer"):
        preflight(params, "data")
    preflight(params, "calibrate")  # the trainer is not called again: not imported
    data, model = ["data.source", "data.batch_process"], ["model.factory", "eval.metric"]
    assert callables_needed_from("adaround") == data + model  # a Dataset source is streamed
    assert callables_needed_from("train") == [*data, "train.trainer", *model]


def test_optional_callables_set_to_null_are_not_checked(tmp_path):
    write_params(tmp_path, {"train": {"trainer": None}, "data": {"batch_process": None}})
    check_callables(load_params(tmp_path / "params.yaml"))


@pytest.mark.parametrize(("args", "overrides", "message"), [
    ([], {"adaround": {"num_step": 5}},
     "error: params.yaml: adaround.num_step: unknown key; did you mean 'num_steps'?"),
    (["-S", "adaround.num_steps=many"], {}, "error: params.yaml: adaround.num_steps: "),
])
def test_the_cli_reports_bad_params_in_one_line_before_any_work(tmp_path, args, overrides,
                                                                message):
    write_params(tmp_path, overrides)
    proc = run_cmd([sys.executable, "-m", "flows", "run", *args], tmp_path, project_env(),
                   check=False, timeout=120)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in proc.stdout
    assert not (tmp_path / "data").exists()


