"""Garbage collection: caches and results the current settings no longer reach."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from flows.stages import adaround_flow
from tasks.garbage import Garbage, collect_garbage, format_garbage, human_size

STEPS_A, STEPS_B = 20, 5  # the tiny params' num_steps, and another setting
FOLDERS = (Path("results") / "layers", Path("cache") / "activations", Path("cache") / "frontiers")
CHECKPOINT = Path("checkpoints") / "adaround.safetensors"


@pytest.fixture
def project(tmp_path, tiny_checkpoints, pipe) -> Path:
    return pipe.project(tmp_path / "p", tiny_checkpoints)


def _with_steps(params, steps: int):
    return params.model_copy(update={"adaround": params.adaround.model_copy(
        update={"num_steps": steps})})


def _entries(project: Path) -> dict[Path, int]:
    """Every entry of the two folders, relative to the project, with its mtime."""
    return {p.relative_to(project): p.stat().st_mtime_ns for folder in FOLDERS
            if (project / folder).is_dir() for p in (project / folder).iterdir()}


def _layer(entry: Path) -> str:
    return entry.name.split("--")[0]


def _round(params, pipe, caplog) -> tuple[int, int]:
    """Run the adaround stage; ``(rounded, reused)`` layers."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert adaround_flow(params, return_state=True).is_completed()
    return pipe.layer_counts(caplog.text)


def _owned_by_b(a: set[Path], after_b: set[Path]) -> set[Path]:
    """B's entries: its new result files, and per layer its new cache (and frontiers) or
    else A's (reused: the same key)."""
    new = after_b - a
    new_cache_layers = {_layer(p) for p in new if p.parent == FOLDERS[1]}
    reused = {p for p in a if p.parent in FOLDERS[1:] and _layer(p) not in new_cache_layers}
    return new | reused


def test_gc_removes_exactly_what_only_other_settings_use(prefect_harness, project, pipe,
                                                         caplog):
    params_a = pipe.params(project)
    assert params_a.adaround.num_steps == STEPS_A and params_a.runtime.keep_cache
    params_b = _with_steps(params_a, STEPS_B)
    assert _round(params_a, pipe, caplog) == (len(pipe.layers), 0)
    checkpoint_a, entries_a = (project / CHECKPOINT).read_bytes(), set(_entries(project))
    assert _round(params_b, pipe, caplog) == (len(pipe.layers), 0)
    checkpoint_b = (project / CHECKPOINT).read_bytes()
    owned_b = _owned_by_b(entries_a, set(_entries(project)))
    assert sum(p.parent == FOLDERS[0] for p in owned_b) == len(pipe.layers)
    assert sum(p.parent == FOLDERS[1] for p in owned_b) == len(pipe.layers)
    assert sum(p.parent == FOLDERS[2] for p in owned_b) == len(pipe.layers) - 1  # none after the last
    tmp_file = FOLDERS[0] / ".conv1--0123.safetensors.x1y2.tmp"  # what killed runs leave
    tmp_dir = FOLDERS[1] / ".conv2--4567.tmp-999999"
    (project / tmp_file).write_bytes(b"half")
    (project / tmp_dir).mkdir()
    (project / tmp_dir / "shard").write_bytes(b"x" * 100)
    expected = (entries_a - owned_b) | {tmp_file, tmp_dir}
    results_a = {p for p in entries_a if p.parent == FOLDERS[0]}
    assert {p for p in expected if p.parent == FOLDERS[0]} == results_a | {tmp_file}
    before = _entries(project)

    dry = collect_garbage(params_b, dry_run=True)
    assert {item.path.relative_to(project) for item in dry} == expected
    assert _entries(project) == before  # a dry run removes nothing
    assert all(item.bytes > 0 for item in dry)
    assert next(i.bytes for i in dry if i.path == project / tmp_dir) == 100
    report = format_garbage(dry, dry_run=True).splitlines()
    assert len(report) == len(expected) + 1
    assert all(line.startswith("would remove ") for line in report[:-1])
    assert report[-1] == (f"would free {human_size(sum(i.bytes for i in dry))} "
                          f"({len(expected)} items)")

    removed = collect_garbage(params_b, dry_run=False)
    assert removed == dry
    assert set(_entries(project)) == owned_b
    assert format_garbage(removed, dry_run=False).splitlines()[-1].startswith("freed ")
    assert collect_garbage(params_b, dry_run=True) == []

    kept = _entries(project)
    assert _round(params_b, pipe, caplog) == (0, len(pipe.layers))  # every layer reused
    assert _entries(project) == kept and (project / CHECKPOINT).read_bytes() == checkpoint_b
    assert _round(params_a, pipe, caplog) == (len(pipe.layers), 0)  # A's results are gone
    assert (project / CHECKPOINT).read_bytes() == checkpoint_a
    assert set(_entries(project)) == entries_a | owned_b


def test_gc_without_checkpoints_says_to_run_the_pipeline(project, pipe):
    (project / "checkpoints" / "float.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"^cannot tell which caches and results are "
                                                r"in use: .*float.safetensors does not exist: "
                                                r"run `python -m flows train`"):
        collect_garbage(pipe.params(project), dry_run=True)


def test_sizes_and_report_lines():
    assert [human_size(n) for n in (0, 1023, 1536, 5 * 2**20, 3 * 2**40)] \
        == ["0 B", "1023 B", "1.5 KiB", "5.0 MiB", "3.0 TiB"]
    items = [Garbage(Path("/r/layers/a.safetensors"), 2048)]
    assert format_garbage(items, dry_run=False) \
        == "removed    2.0 KiB  /r/layers/a.safetensors\nfreed 2.0 KiB (1 item)"
    assert format_garbage([], dry_run=True) == "would free 0 B (0 items)"


def test_gc_keeps_the_results_of_a_torchrun_run(project, pipe):
    """Results keyed by a number of ranks (what a torchrun run of the same settings writes)
    are reachable; those of other settings are garbage as in one process."""
    import torch

    from tasks.garbage import _inputs
    from tasks.layer_jobs import plan_job
    from tasks.layer_results import write_result
    from tasks.planning import plan_layers

    def write_ranked(params, count: int) -> list[Path]:
        inputs = _inputs(params)
        plan = plan_layers.fn(params, *inputs)
        results, job = [], None
        for _ in plan.names[:count]:
            job = plan_job(params, *inputs, plan, results, upstream=job, world_size=2)
            results.append(write_result(job, {"weight": torch.randn(4)}, {"seconds": 0.0}))
        return [Path(r.path) for r in results]

    params = pipe.params(project)
    kept = write_ranked(params, len(pipe.layers))
    other = write_ranked(_with_steps(params, STEPS_B), 2)
    assert set(kept).isdisjoint(other)
    garbage = {item.path for item in collect_garbage(params, dry_run=False)}
    assert garbage == set(other)
    assert all(path.exists() for path in kept)
