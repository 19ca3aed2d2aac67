"""Bad input and faults: each a clear error or a clean recovery, never a silent wrong result."""

from __future__ import annotations

import errno
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, subprocess_env, tmpfs
from filelock import FileLock

from adaround_core.calibration import sample_store
from adaround_core.calibration.sample_store import read_manifest
from flows.stages import adaround_flow
from tasks.activation_cache import cache_layer_activations
from tasks.artifacts import LayerResult
from tasks.io import load_tensors
from tasks.layer_adaround import assemble_checkpoint
from tasks.layer_jobs import LayerJob
from tasks.layout import Layout, existing
from tasks.model_state import apply_rounded_weight, calibrated_model


@pytest.fixture
def project(tmp_path, tiny_checkpoints, pipe) -> Path:
    return pipe.project(tmp_path / "p", tiny_checkpoints)


def _inputs(params):
    layout = Layout(params)
    return (existing(layout.dataset, "data"), existing(layout.float_checkpoint, "train"),
            existing(layout.calibrated_checkpoint, "calibrate"))


def _with_cache_dir(params, cache_dir: Path):
    return params.model_copy(update={"runtime": params.runtime.model_copy(
        update={"cache_dir": str(cache_dir)})})


# --- missing or unreadable checkpoints -------------------------------------------------

def test_missing_checkpoint_names_the_stage_to_run(prefect_harness, project, pipe):
    (project / "checkpoints" / "calibrated.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"calibrated.safetensors does not exist: "
                                                r"run `python -m flows calibrate`"):
        adaround_flow(pipe.params(project))
    assert pipe.result_files(project) == []


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_checkpoint_is_a_clear_error(prefect_harness, project, pipe, damage):
    path = project / "checkpoints" / "calibrated.safetensors"
    path.write_bytes(b"\x00not a safetensors file" if damage == "garbage"
                     else path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"calibrated.safetensors is unreadable or corrupt"):
        adaround_flow(pipe.params(project))
    assert pipe.result_files(project) == []


# --- a cache directory on a full or read-only disk --------------------------------------

def _failing_write(code: int):
    def write_shard(*args, **kwargs):
        raise OSError(code, "simulated")
    return write_shard


@pytest.mark.parametrize(("code", "options", "reason"), [
    (errno.ENOSPC, "size=32k", "the disk is full"),
    (errno.EROFS, "ro,size=1m", "the file system is read-only")])
def test_cache_on_a_full_or_read_only_disk_is_a_clear_error_then_recovers(
        tmp_path, project, pipe, monkeypatch, code, options, reason):
    params = pipe.params(project)
    disk = tmp_path / "disk"
    with tmpfs(disk, options) as real:
        if not real:  # no permission to mount here: make the shard write fail instead
            monkeypatch.setattr(sample_store, "write_shard", _failing_write(code))
        job = LayerJob(_with_cache_dir(params, disk / "cache"), *_inputs(params), "conv1", 1, ())
        with pytest.raises(OSError, match=f"cannot write the activation cache .*{reason}") as err:
            cache_layer_activations.fn(job)
        assert err.value.errno == code
        leftovers = list((disk / "cache" / "activations").iterdir()) \
            if (disk / "cache" / "activations").exists() else []
        assert leftovers == []  # no partial cache left to be mistaken for a finished one
    monkeypatch.undo()
    good = LayerJob(_with_cache_dir(params, tmp_path / "good"), *_inputs(params), "conv1", 1, ())
    read_manifest(Path(cache_layer_activations.fn(good).path), verify=True)


def test_full_disk_fails_the_flow_cleanly_and_a_rerun_recovers(
        prefect_harness, project, pipe, monkeypatch):
    params = pipe.params(project)
    attempts: list[str] = []
    real_write = sample_store.write_shard

    def write_shard(directory, file, tensor):  # the disk fills up at the third layer
        if "conv3" in str(directory):
            attempts.append(file)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(directory, file, tensor)

    monkeypatch.setattr(sample_store, "write_shard", write_shard)
    with pytest.raises(OSError, match="the disk is full"):
        adaround_flow(params)
    # a full disk is not retried (only the user can fix it): no shard is tried twice (the
    # writes behind the capture may have tried the next batch's before the error surfaced)
    assert attempts and len(attempts) == len(set(attempts))
    assert [f.split("--")[0] for f in pipe.result_files(project)] == ["conv1", "conv2"]
    monkeypatch.undo()
    state = adaround_flow(params, return_state=True)
    assert state.is_completed()
    assert len(pipe.result_files(project)) == len(pipe.layers)


# --- a layer in the results that the model no longer has -------------------------------

def test_result_for_a_layer_the_model_no_longer_has_is_a_clear_error(project, pipe, tmp_path):
    params = pipe.params(project)
    stale = tmp_path / "gone.safetensors"
    from tasks.io import save_tensors

    save_tensors(stale, {"weight": torch.zeros(4, 1, 3, 3)})
    result = LayerResult("features.0", str(stale), "0" * 64, {})
    with pytest.raises(KeyError, match=r"layer 'features.0' from the results does not exist "
                                       r"in the model"):
        assemble_checkpoint.fn(params, *_inputs(params), [result], str(tmp_path / "out"))
    model = calibrated_model(params, *_inputs(params))
    with pytest.raises(ValueError, match=r"result for 'conv2' has shape \(3, 3\)"):
        apply_rounded_weight(model, "conv2", torch.zeros(3, 3))


def test_stray_results_of_removed_layers_are_ignored(prefect_harness, project, pipe):
    layers = project / "results" / "layers"
    layers.mkdir(parents=True)
    stray = layers / "old_block.conv--0123456789abcdef01234567.safetensors"
    from tasks.io import save_tensors

    save_tensors(stray, {"weight": torch.ones(2, 2)}, metadata={"report": "{}"})
    partial = layers / ".conv1--abc.safetensors.x1y2.tmp"  # what a kill mid-write leaves
    partial.write_bytes(b"half a file")
    params = pipe.params(project)
    assert adaround_flow(params, return_state=True).is_completed()
    assert stray.exists() and not partial.exists()
    state = load_tensors(Layout(params).adaround_checkpoint)
    assert not any(k.startswith("old_block") for k in state)


# --- two runs on the same output directory at once ---------------------------------------

def test_second_run_fails_clearly_while_the_first_holds_the_lock(project, prefect_server, pipe):
    lock = FileLock(str(project / "results" / ".pipeline.lock"))
    (project / "results").mkdir(exist_ok=True)
    with lock.acquire(timeout=5):
        proc = pipe.run_flows(project, "adaround", "-S", "runtime.lock_timeout=1",
                              api_url=prefect_server, check=False)
    assert proc.returncode == 75, proc.stdout[-3000:]  # EX_TEMPFAIL: try again later
    waiting = [line for line in proc.stdout.splitlines() if "waiting up to 1 s" in line]
    assert len(waiting) == 1 and ".pipeline.lock" in waiting[0]  # said once, while waiting
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("error: another pipeline run holds") and ".pipeline.lock" in last
    assert pipe.result_files(project) == []


def test_two_runs_at_once_one_waits_neither_corrupts_the_other(project, prefect_server, pipe):
    env = subprocess_env(prefect_server, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-m", "flows", "adaround"], cwd=project, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    counts = sorted(pipe.layer_counts(out) for out in outputs)
    assert counts == [(0, len(pipe.layers)), (len(pipe.layers), 0)]  # the second waited
    params = pipe.params(project)
    pipeline_state = load_tensors(Layout(params).adaround_checkpoint)
    library_state = pipe.library_state(params)
    assert all(torch.equal(pipeline_state[k], library_state[k]) for k in library_state)
    for cache in (project / "cache" / "activations").iterdir():
        read_manifest(cache, verify=True)


# --- a damaged or foreign layer result is recomputed, never trusted ----------------------

@pytest.fixture(scope="module")
def rounded(prefect_harness, tmp_path_factory, tiny_checkpoints, pipe) -> Path:
    """A project whose adaround stage has run once, uninterrupted (copied by each test)."""
    root = pipe.project(tmp_path_factory.mktemp("rounded") / "p", tiny_checkpoints)
    assert adaround_flow(pipe.params(root), return_state=True).is_completed()
    return root


def _flip_data_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for i in range(1, 5):  # the last bytes of the file are the weight's data
        data[-i] ^= 0xFF
    path.write_bytes(bytes(data))
    from safetensors.torch import load_file

    assert load_file(str(path))["weight"].numel()  # still opens: only the digest tells


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _rekey(path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        weight, metadata = f.get_tensor("weight"), f.metadata()
    save_file({"weight": weight}, str(path), metadata={**metadata, "key": "0" * 64})


def _without_digest(path: Path) -> None:  # a result written before digests were stored
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        weight, metadata = f.get_tensor("weight"), f.metadata()
    del metadata["weight_sha256"]
    save_file({"weight": weight}, str(path), metadata=metadata)


@pytest.mark.parametrize(("damage", "reason"), [
    (_flip_data_bytes, "the weight's SHA-256 differs from the stored one"),
    (_truncate, "unreadable: "),
    (_rekey, "its key 000000000000000000000000... is not the job's"),
    (_without_digest, "metadata lacks weight_sha256")],
    ids=["flipped", "truncated", "rekeyed", "old-format"])
def test_invalid_result_is_deleted_recomputed_and_the_checkpoint_unchanged(
        rounded, tmp_path, pipe, caplog, damage, reason):
    project = Path(shutil.copytree(rounded, tmp_path / "p"))
    layers = project / "results" / "layers"
    names = pipe.result_files(project)
    victim = layers / next(n for n in names if n.startswith("conv2--"))
    weight = load_tensors(victim)["weight"].clone()  # not a view of the mapped file
    stamps = {n: (layers / n).stat().st_mtime_ns for n in names}
    checkpoint = project / "checkpoints" / "adaround.safetensors"
    expected = checkpoint.read_bytes()
    damage(victim)
    damaged = victim.read_bytes()
    with caplog.at_level(logging.WARNING):
        assert adaround_flow(pipe.params(project), return_state=True).is_completed()
    naming = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING and victim.name in r.getMessage()]
    assert len(naming) == 1, naming
    assert f"result {victim} is invalid ({reason}" in naming[0]
    assert pipe.result_files(project) == names  # recomputed under the same name
    assert victim.read_bytes() != damaged
    assert torch.equal(load_tensors(victim)["weight"], weight)
    assert {n for n in names if (layers / n).stat().st_mtime_ns != stamps[n]} == {victim.name}
    assert checkpoint.read_bytes() == expected  # later layers reused, bytes as uninterrupted
