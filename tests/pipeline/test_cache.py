"""What a change invalidates: per-layer results and activation caches, in-process flows."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from adaround_core.calibration.sample_store import read_manifest
from flows.stages import adaround_flow
from tasks.io import load_tensors

CHECKPOINT = Path("checkpoints") / "adaround.safetensors"


@pytest.fixture(scope="module")
def baseline(prefect_harness, tmp_path_factory, tiny_checkpoints, pipe) -> Path:
    """A project whose adaround stage has run once."""
    project = pipe.project(tmp_path_factory.mktemp("cache-baseline"), tiny_checkpoints)
    assert adaround_flow(pipe.params(project), return_state=True).is_completed()
    return project


@pytest.fixture
def project(baseline, tmp_path) -> Path:
    """A private copy of the baseline project (results, caches and all)."""
    return Path(shutil.copytree(baseline, tmp_path / "p"))


def _stamps(project: Path) -> dict[str, int]:
    files = [*(project / "results" / "layers").glob("*.safetensors"),
             *(project / "cache" / "activations").glob("*/manifest.json")]
    return {str(p.relative_to(project)): p.stat().st_mtime_ns for p in files}


def _layer(path: str) -> str:
    return Path(path).name.split("--")[0] if path.endswith(".safetensors") \
        else Path(path).parent.name.split("--")[0]


def _rerun(project: Path, pipe, **overrides) -> tuple[set[str], set[str], set[str]]:
    """Run the adaround stage with ``overrides`` (section -> values) written to params.yaml;
    return the layers whose result was written, whose cache was written, and files touched."""
    path = project / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    for section, values in overrides.items():
        raw[section].update(values)
    path.write_text(yaml.safe_dump(raw))
    before = _stamps(project)
    state = adaround_flow(pipe.params(project), return_state=True)
    assert state.is_completed(), state
    after = _stamps(project)
    touched = {k for k in before if k in after and after[k] != before[k]}
    new = {k for k in after if k not in before} | touched
    results = {_layer(k) for k in new if k.endswith(".safetensors")}
    caches = {_layer(k) for k in new if k.endswith("manifest.json")}
    return results, caches, touched


def test_nothing_changed_reuses_everything(project, pipe):
    before = (project / CHECKPOINT).read_bytes()
    assert _rerun(project, pipe) == (set(), set(), set())
    assert (project / CHECKPOINT).read_bytes() == before


def test_settings_that_cannot_change_a_result_reuse_everything(project, pipe):
    before = (project / CHECKPOINT).read_bytes()
    results, caches, _ = _rerun(project, pipe, eval={"batch_size": 7},
                                adaround={"progress": True}, tracking={"experiment": "x"},
                                train={"kwargs": {"epochs": 9}})
    assert (results, caches) == (set(), set())
    assert (project / CHECKPOINT).read_bytes() == before


def _weights_changed(project: Path, layers: list[str]) -> list[bool]:
    """Per layer (two results each: old and new settings): did the rounded weight change?"""
    changed = []
    for name in layers:
        old, new = (load_tensors(p)["weight"]
                    for p in (project / "results" / "layers").glob(f"{name}--*"))
        changed.append(not torch.equal(old, new))
    return changed


def test_num_steps_recomputes_every_result_but_reuses_the_first_cache(project, pipe):
    before = (project / CHECKPOINT).read_bytes()
    results, caches, touched = _rerun(project, pipe, adaround={"num_steps": 25})
    assert results == set(pipe.layers)
    assert not touched  # nothing was overwritten: the old results are still there
    # A layer's cache depends on the rounded weights before it: the first layer's stays
    # valid; a later one is new exactly when some earlier layer's weight changed.
    changed = _weights_changed(project, pipe.layers)
    expected = {name for i, name in enumerate(pipe.layers) if any(changed[:i])}
    assert expected, "num_steps 25 changed no rounded weight: the test would prove nothing"
    assert "conv1" not in caches
    assert caches == expected
    results, caches, _ = _rerun(project, pipe, adaround={"num_steps": 20})  # and back
    assert (results, caches) == (set(), set())
    assert (project / CHECKPOINT).read_bytes() == before


def test_excluding_a_layer_invalidates_only_the_layers_after_it(project, pipe):
    results, caches, _ = _rerun(project, pipe, adaround={"exclude_prefix": ["conv3"]})
    assert results == {"fc1", "head"}
    assert caches == {"fc1", "head"}


def test_recomputing_an_earlier_layer_to_the_same_weight_invalidates_nothing_after(
        project, pipe):
    before = (project / CHECKPOINT).read_bytes()
    (conv1,) = (project / "results" / "layers").glob("conv1--*.safetensors")
    conv1.unlink()
    results, caches, _ = _rerun(project, pipe)
    assert results == {"conv1"} and caches == set()
    assert (project / CHECKPOINT).read_bytes() == before


def _shard(project: Path, layer: str, kind: str) -> Path:
    (cache,) = (project / "cache" / "activations").glob(f"{layer}--*")
    return sorted(cache.glob(f"{kind}_*.bin"))[0]


def test_corrupt_or_partial_shards_are_detected_and_recomputed(project, pipe):
    before = (project / CHECKPOINT).read_bytes()
    flipped = _shard(project, "conv1", "inputs")
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    truncated = _shard(project, "conv2", "targets")
    truncated.write_bytes(truncated.read_bytes()[:-7])
    (no_manifest,) = (project / "cache" / "activations").glob("conv3--*")
    (no_manifest / "manifest.json").unlink()
    for name in ("conv1", "conv2", "conv3"):  # results gone: the caches are needed again
        for result in (project / "results" / "layers").glob(f"{name}--*"):
            result.unlink()

    results, caches, _ = _rerun(project, pipe)
    assert results == {"conv1", "conv2", "conv3"}
    assert caches == {"conv1", "conv2", "conv3"}
    for layer in ("conv1", "conv2", "conv3"):
        (cache,) = (project / "cache" / "activations").glob(f"{layer}--*")
        read_manifest(cache, verify=True)  # intact again
    assert (project / CHECKPOINT).read_bytes() == before  # same caches, same rounding
