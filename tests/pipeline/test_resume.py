"""Kill-and-resume: a real ``python -m flows adaround`` killed with SIGKILL, then rerun."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_checkpoints, prefect_server, pipe):
    """An uninterrupted adaround run: its checkpoint bytes and result file names."""
    project = pipe.project(tmp_path_factory.mktemp("uninterrupted"), tiny_checkpoints)
    out = pipe.run_flows(project, "adaround", api_url=prefect_server).stdout
    assert pipe.layer_counts(out) == (len(pipe.layers), 0)
    return (project / "checkpoints" / "adaround.safetensors").read_bytes(), \
        pipe.result_files(project)


def _finished(project: Path, trigger: str) -> int:
    if trigger == "results":
        folder, wanted = project / "results" / "layers", lambda p: p.suffix == ".safetensors"
    else:
        folder, wanted = project / "cache" / "activations", Path.is_dir
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.iterdir() if not p.name.startswith(".") and wanted(p))


def _corrupt_frontiers(project: Path) -> int:
    """Flip a byte in every saved frontier file (the passes one layer's capture leaves for
    the next); returns how many files were hit."""
    hit = 0
    for directory in (project / "cache" / "frontiers").glob("[!.]*"):
        for file in directory.rglob("frontier_*.pt"):
            data = bytearray(file.read_bytes())
            data[len(data) // 2] ^= 0x01
            file.write_bytes(bytes(data))
            hit += 1
    return hit


@pytest.mark.parametrize(("trigger", "count", "damage"),
                         [("results", 2, False), ("cache", 4, False), ("results", 2, True)],
                         ids=["results", "cache", "corrupt-frontiers"])
def test_killed_run_resumes_redoing_at_most_the_layer_in_flight(
        tmp_path, tiny_checkpoints, prefect_server, pipe, reference, trigger, count, damage):
    ref_checkpoint, ref_results = reference
    # frontiers on disk to damage; otherwise held in the memory of the killed process
    # (runtime.frontier_memory_mb), so the next capture starts from the model input
    overrides = {"runtime": {"frontier_memory_mb": 0}} if damage else None
    project = pipe.project(tmp_path / "p", tiny_checkpoints, overrides)
    pipe.run_and_kill(project, prefect_server, lambda: _finished(project, trigger) >= count)
    if damage:  # the next layer's capture cannot continue: it starts from the input
        assert _corrupt_frontiers(project) > 0

    done = pipe.result_files(project)
    cached = {p.name.split("--")[0] for p in (project / "cache" / "activations").iterdir()
              if not p.name.startswith(".")}
    assert 0 < len(done) < len(pipe.layers), "the kill did not land inside the run"
    assert not (project / "checkpoints" / "adaround.safetensors").exists()
    assert set(done) <= set(ref_results)  # results of the killed run are final, not partial

    out = pipe.run_flows(project, "adaround", api_url=prefect_server).stdout
    rounded, reused = pipe.layer_counts(out)
    assert reused == len(done), "a finished layer was redone"
    assert rounded == len(pipe.layers) - len(done)
    in_flight = {n for n in cached if not any(f.startswith(f"{n}--") for f in done)}
    for name in in_flight:  # its complete activation cache survived the kill: reused
        assert f"{name}: activation cache reused" in out
    if damage:
        assert "are unusable (CorruptCacheError" in out
    assert (project / "checkpoints" / "adaround.safetensors").read_bytes() == ref_checkpoint
    assert pipe.result_files(project) == ref_results
    assert not [p for p in (project / "results" / "layers").iterdir()
                if p.name.startswith(".")], "temporary files were left behind"
