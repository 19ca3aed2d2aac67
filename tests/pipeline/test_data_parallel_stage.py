"""The adaround stage under a real ``torchrun`` (gloo, 2 processes): rank 0 writes each
layer's result once, a rank that dies fails the run naming it, a rerun resumes; params
that differ between ranks, or a batch the ranks cannot split, are refused."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, subprocess_env

from adaround_core.reconstruction.distributed import RankGroup
from tasks.data_parallel import check_batch_divides, check_data_parallel_settings
from tasks.params import PreflightError

LAUNCHER = Path(__file__).with_name("ddp_launch.py")
NUM_STEPS = 20  # TINY_PARAMS' adaround.num_steps


def _torchrun(project: Path, *args: str, api_url: str | None = None,
              ) -> subprocess.CompletedProcess:
    """``ddp_launch.py ARGS`` (ending with ``STAGE ...``) on 2 ranks in ``project``."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", str(LAUNCHER), *args], cwd=project,
                          env=subprocess_env(api_url, PYTHONPATH=str(REPO)),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error: ")]


def test_a_killed_rank_fails_the_run_and_a_rerun_resumes_at_the_next_layer(
        tmp_path, tiny_checkpoints, prefect_server, pipe):
    project = pipe.project(tmp_path / "p", tiny_checkpoints)
    killed = _torchrun(project, "--kill-rank1-at-step", str(NUM_STEPS + 3), "adaround",
                       api_url=prefect_server)
    assert killed.returncode != 0
    root_cause = killed.stdout.split("Root Cause")[-1]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", root_cause), \
        killed.stdout[-3000:]
    assert pipe.result_files(project) and pipe.result_files(project)[0].startswith("conv1--")
    assert len(pipe.result_files(project)) == 1  # the first layer, written before the kill

    rerun = _torchrun(project, "adaround", "-v", api_url=prefect_server)
    assert rerun.returncode == 0, rerun.stdout[-4000:]
    assert pipe.layer_counts(rerun.stdout) == (len(pipe.layers) - 1, 1)
    assert f"rank 1: helped round {len(pipe.layers) - 1} layers" in rerun.stdout
    files = pipe.result_files(project)
    assert sorted(f.split("--")[0] for f in files) == sorted(pipe.layers)  # each once
    assert (project / "checkpoints" / "adaround.safetensors").is_file()


def test_ranks_started_with_different_params_are_refused_naming_the_key(tiny_project):
    proc = _torchrun(tiny_project, "--rank1-set", "adaround.lr=0.02", "adaround")
    assert proc.returncode != 0
    errors = _error_lines(proc.stdout)
    # every rank refuses; torchrun may stop one before it has printed its line
    assert errors, proc.stdout[-3000:]
    assert all("params: adaround.lr differs between ranks (rank 0: 0.01, rank 1: 0.02)" in e
               for e in errors)
    assert not (tiny_project / "results").exists()


def test_block_units_are_refused_under_torchrun_naming_the_key(tiny_project):
    proc = _torchrun(tiny_project, "adaround", "-S", "adaround.granularity=block")
    assert proc.returncode != 0
    errors = _error_lines(proc.stdout)
    assert errors, proc.stdout[-3000:]
    assert all(e.startswith("error: params.yaml: adaround.granularity: 'block' does not run "
                            "under torchrun") for e in errors), errors
    assert not (tiny_project / "results").exists()


@pytest.mark.parametrize(("key", "value"), [("granularity", "block"), ("drop_prob", 0.5),
                                            ("activation_lr", 0.001)])
def test_each_single_process_setting_is_refused_naming_its_key(tmp_path, pipe, key, value):
    """The check every rank makes on joining (the test above runs it under torchrun)."""
    params = pipe.params(pipe.project(tmp_path, overrides={"adaround": {key: value}}))
    with pytest.raises(PreflightError) as err:
        check_data_parallel_settings(params)
    message = str(err.value)
    assert message.startswith(f"params.yaml: adaround.{key}: {value!r} does not run under "
                              f"torchrun") and "\n" not in message, message


@pytest.mark.parametrize(("overrides", "source"), [
    ({"adaround": {"batch_size": 5}}, "adaround.batch_size = 5"),
    ({"calibration": {"batch_size": 5}}, "calibration.batch_size (adaround.batch_size is null) = 5"),
])
def test_a_batch_the_ranks_cannot_split_fails_saying_what_to_set(tmp_path, pipe, overrides, source):
    """The check every rank makes on joining (the rest of the join is the test above's)."""
    params = pipe.params(pipe.project(tmp_path, overrides=overrides))
    with pytest.raises(ValueError) as err:
        check_batch_divides(RankGroup(rank=1, world_size=2), params)
    assert str(err.value).startswith(f"{source} is not divisible by the torchrun world size 2: "
                                     f"set adaround.batch_size to a multiple of 2 (e.g. 4 or 6)")
