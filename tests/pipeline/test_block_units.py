"""``granularity: block`` in the pipeline: each residual block is one task and one result
file (every layer's weight), cached as its calls; the checkpoint equals the library's, and a
run resumes at the first unfinished unit."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from tasks import capture
from tasks.calibration import calibrate
from tasks.data import prepare_data
from tasks.io import load_tensors
from tasks.layer_adaround import assemble_checkpoint
from tasks.layout import Layout, existing
from tasks.planning import plan_layers
from tasks.training import train_float_model

BLOCKS = ["stage.0", "stage.1"]
QDROP_LSQ = {"drop_prob": 0.5, "activation_lr": 1e-3}
VARIANTS = {"block": {"granularity": "block"},
            "block+qdrop+lsq": {"granularity": "block", **QDROP_LSQ},
            "block+guard=output": {"granularity": "block", "guard": "output"},
            "block+qdrop+lsq+guard=output": {"granularity": "block", "guard": "output",
                                             **QDROP_LSQ}}
OUTPUT_GUARDED = [name for name, variant in VARIANTS.items() if variant.get("guard") == "output"]


@pytest.fixture(scope="module", params=list(VARIANTS))
def rounded(request, tmp_path_factory, pipe):
    overrides = {"model": {"factory": "adaround_core.demo.models:TinyResNet",
                           "kwargs": {"width": 4, "in_channels": 1, "num_classes": 10}},
                 "adaround": {"num_steps": 10, "progress": False, **VARIANTS[request.param]}}
    project = pipe.project(tmp_path_factory.mktemp("blocks"), None, overrides)
    params = pipe.params(project)
    layout = Layout(params)
    dataset = prepare_data.fn(params, str(layout.dataset))
    float_model = train_float_model.fn(params, dataset, str(layout.float_checkpoint))
    calibrated = calibrate.fn(params, dataset, float_model, str(layout.calibrated_checkpoint))
    inputs = (existing(layout.dataset, "data"), existing(layout.float_checkpoint, "train"),
              existing(layout.calibrated_checkpoint, "calibrate"))
    assert calibrated.digest == inputs[2].digest
    results = pipe.round_units(params, inputs)
    assemble_checkpoint.fn(params, *inputs, results, str(layout.adaround_checkpoint))
    return params, layout, inputs, results


def test_each_block_is_one_unit_with_every_layer_in_one_result(rounded):
    params, _, inputs, results = rounded
    plan = plan_layers.fn(params, *inputs)
    assert plan.names == ["stem", *BLOCKS, "head"]
    for result in results:
        tensors = load_tensors(Path(result.path))
        if result.name in BLOCKS:
            assert tuple(result.report["layers"]) == plan.blocks[result.name]
            assert {f"{layer}:weight" for layer in plan.blocks[result.name]} <= set(tensors)
        else:
            assert "weight" in tensors and not result.report["layers"]


def test_the_pipeline_reconstructs_blocks_as_the_library_does(rounded, pipe):
    params, layout, _, _ = rounded
    differ = pipe.differs_from_library(params, layout)
    assert not differ, f"pipeline and library differ in {differ}"


@pytest.mark.parametrize("rounded", OUTPUT_GUARDED, indirect=True)
def test_the_output_guard_judges_each_unit_and_its_result_holds_what_was_kept(rounded):
    *_, results = rounded
    for result in results:
        row = result.report
        worse = row["adaround_output_mse"] > row["nearest_output_mse"]
        assert row["decision"] == ("nearest(output)" if worse else "adaround"), row
        scales = [k for k in load_tensors(Path(result.path)) if k.endswith("input_scale")]
        assert not (worse and scales), f"{result.name} kept nearest yet stores {scales}"


def test_a_run_resumes_at_the_first_unfinished_unit(rounded, pipe):
    params, _, inputs, results = rounded
    Path(results[2].path).unlink()  # killed after the first block
    Path(results[3].path).unlink()
    again = pipe.round_units(params, inputs)
    assert [r.reused for r in again] == [True, True, False, False]
    assert [r.digest for r in again] == [r.digest for r in results]


def _stage_project(params, tmp_path: Path) -> Path:
    """A copy of the fixture's project with its data and checkpoints, no AdaRound yet."""
    project = Path(params.runtime.results_dir).parent
    copy = tmp_path / "stage"
    copy.mkdir()
    for sub in ("params.yaml", "data", "checkpoints"):
        (shutil.copytree if (project / sub).is_dir() else shutil.copy)(project / sub, copy / sub)
    (copy / "checkpoints" / "adaround.safetensors").unlink()
    return copy


@pytest.mark.parametrize("rounded", ["block+qdrop+lsq"], indirect=True)  # one is enough
def test_the_adaround_stage_rounds_blocks_and_a_rerun_reuses_every_unit(rounded, tmp_path,
                                                                         prefect_server, pipe):
    params, layout, _, results = rounded
    copy = _stage_project(params, tmp_path)
    first = pipe.run_flows(copy, "adaround", api_url=prefect_server).stdout
    assert pipe.layer_counts(first) == (len(results), 0)
    assert (copy / "checkpoints" / "adaround.safetensors").read_bytes() == \
        layout.adaround_checkpoint.read_bytes()
    again = pipe.run_flows(copy, "adaround", api_url=prefect_server).stdout
    assert pipe.layer_counts(again) == (0, len(results))


def _remove(results, cache_dirs) -> None:
    for result in results:
        Path(result.path).unlink()
    for directory in cache_dirs:
        shutil.rmtree(directory)


@pytest.mark.parametrize("rounded", ["block"], indirect=True)
def test_each_unit_continues_the_previous_units_pass_with_the_per_unit_results(
        rounded, pipe, monkeypatch, caplog):
    params, _, inputs, results = rounded
    plan = plan_layers.fn(params, *inputs)
    assert (plan.capture_method, plan.capture_note) == ("one_pass", "")
    cache = Path(params.runtime.cache_dir)  # frontiers kept: runtime.keep_cache
    assert sorted(p.name.split("--")[0] for p in (cache / "frontiers").iterdir()) == \
        sorted(plan.names[:-1])
    # the last block and the head again, from the frontiers the units before them left
    _remove(results[2:], [p for p in (cache / "activations").iterdir()
                          if p.name.split("--")[0] in plan.names[2:]])
    with caplog.at_level(logging.INFO):
        again = pipe.round_units(params, inputs)
    for name, before in zip(plan.names[2:], plan.names[1:], strict=False):
        assert any(f"{name}: cached" in r.message and f"continued from {cache}" in r.message
                   and f"/{before}--" in r.message for r in caplog.records), name
    assert [r.digest for r in again] == [r.digest for r in results]
    # every unit with its own passes: the same results
    _remove(results, [cache])
    monkeypatch.setattr(capture, "ONE_PASS_CAPTURE", False)
    again = pipe.round_units(params, inputs)
    assert plan_layers.fn(params, *inputs).capture_method == "per_layer"
    assert [r.digest for r in again] == [r.digest for r in results]


@pytest.mark.parametrize("rounded", ["block"], indirect=True)
def test_a_stage_killed_after_the_first_block_resumes_without_recomputing_it(
        rounded, tmp_path, prefect_server, pipe):
    """SIGKILL once the first block's result is on disk; the rerun reuses every finished
    unit (the block's result file untouched) and writes the uninterrupted checkpoint."""
    params, layout, _, results = rounded
    copy = _stage_project(params, tmp_path)
    folder = copy / "results" / "layers"

    def first_block_written() -> bool:
        return folder.is_dir() and any(folder.glob(f"{BLOCKS[0]}--*.safetensors"))

    pipe.run_and_kill(copy, prefect_server, first_block_written)
    done = pipe.result_files(copy)
    assert 0 < len(done) < len(results), "the kill did not land inside the run"
    [block] = [folder / name for name in done if name.startswith(f"{BLOCKS[0]}--")]
    block_bytes, block_mtime = block.read_bytes(), block.stat().st_mtime_ns

    out = pipe.run_flows(copy, "adaround", api_url=prefect_server).stdout
    assert pipe.layer_counts(out) == (len(results) - len(done), len(done))
    assert f"{BLOCKS[0]}: result reused" in out
    assert block.read_bytes() == block_bytes and block.stat().st_mtime_ns == block_mtime
    assert (copy / "checkpoints" / "adaround.safetensors").read_bytes() == \
        layout.adaround_checkpoint.read_bytes()
    assert pipe.result_files(copy) == sorted(Path(r.path).name for r in results)
