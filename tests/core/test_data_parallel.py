"""``weight_reconstruction`` under a real ``torchrun`` (gloo, 2 processes on the CPU).

The tolerance of 2 ranks against 1: each rank sums its slice's gradient and the slices
are then summed across ranks, which is the 1-process sum in another order; float sums
in another order differ in the last bits, so ``V`` differs by about 1e-6 after the
steps here and the rounding (the sign of ``V``) and every weight are identical.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from adaround_core.reconstruction.distributed import (
    TIMEOUT_ENV,
    RankGroup,
    RankLostError,
    collective_timeout,
    leave,
)

SCRIPT = Path(__file__).with_name("ddp_script.py")
REPO = Path(__file__).resolve().parents[2]
CONFIG = {"num_steps": 40}  # the script's calibration batches hold 8 samples
MAX_V_DIFFERENCE = 1e-4


def _run(out: Path, config: dict, *extra: str, ranks: int | None = 2,
         ) -> subprocess.CompletedProcess:
    """The script under ``torchrun`` with ``ranks`` processes (None: plainly, one process)."""
    launcher = [] if ranks is None else \
        ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    return subprocess.run([sys.executable, *launcher, str(SCRIPT), str(out), json.dumps(config),
                           *extra], cwd=out.parent, capture_output=True, text=True, timeout=120)


def _error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "ValueError: " in line]


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory) -> tuple[dict, dict]:
    folder = tmp_path_factory.mktemp("ddp")
    for name, ranks in (("one", None), ("two", 2)):
        proc = _run(folder / f"{name}.pt", CONFIG, ranks=ranks)
        assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(folder / "one.pt"), torch.load(folder / "two.pt")


def test_two_ranks_round_every_weight_as_one_process_does(one_and_two):
    one, two = one_and_two
    assert list(one["state"]) == list(two["state"])
    differing = [k for k in one["state"] if not torch.equal(one["state"][k], two["state"][k])]
    assert not differing, f"weights differ between 1 and 2 ranks: {differing}"


def test_two_ranks_learn_v_within_the_stated_tolerance(one_and_two):
    one, two = one_and_two
    assert len(one["v"]) == len(two["v"]) == 3
    for v1, v2 in zip(one["v"], two["v"], strict=True):
        assert torch.equal(v1 >= 0, v2 >= 0)
        assert (v1 - v2).abs().max().item() <= MAX_V_DIFFERENCE
    assert two["mse"] == pytest.approx(one["mse"], rel=1e-4)


def test_a_batch_the_world_size_does_not_divide_fails_saying_what_to_set(tmp_path):
    proc = _run(tmp_path / "out.pt", {**CONFIG, "batch_size": 5})
    assert proc.returncode != 0
    errors = _error_lines(proc)
    assert errors and all("batch_size = 5 is not divisible by the torchrun world size 2: set "
                          "batch_size to a multiple of 2 (e.g. 4 or 6)" in e for e in errors)
    assert not (tmp_path / "out.pt").exists()


def test_ranks_with_different_settings_are_refused_naming_the_key(tmp_path):
    proc = _run(tmp_path / "out.pt", CONFIG, "--rank-config", json.dumps({"1": {"lr": 0.02}}))
    assert proc.returncode != 0
    errors = _error_lines(proc)
    # every rank refuses; torchrun may stop one before it has printed its line
    assert errors, proc.stderr[-4000:]
    assert all("custom_config_dict: lr differs between ranks (rank 0: 0.01, rank 1: 0.02)" in e
               for e in errors)


@pytest.mark.parametrize(("key", "value"), [("granularity", "block"), ("drop_prob", 0.5),
                                            ("activation_lr", 1e-3)])
def test_block_reconstruction_qdrop_and_learned_scales_are_refused_naming_the_key(
        tmp_path, key, value):
    proc = _run(tmp_path / "out.pt", {**CONFIG, key: value})
    assert proc.returncode != 0
    errors = _error_lines(proc)
    assert errors, proc.stderr[-4000:]  # every rank refuses, in one line
    assert all(f"ValueError: custom_config_dict: {key}={value!r} does not run under torchrun"
               in e and e.endswith("run it in one process") for e in errors), errors
    assert not (tmp_path / "out.pt").exists()


def test_a_rank_that_dies_fails_the_run_naming_it(tmp_path):
    proc = _run(tmp_path / "out.pt", CONFIG, "--die", "1:5")
    assert proc.returncode != 0
    root_cause = proc.stderr.split("Root Cause")[-1]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9", root_cause), \
        proc.stderr[-3000:]
    assert not (tmp_path / "out.pt").exists()


def test_each_rank_takes_its_equal_slice_of_the_batch():
    slices = [RankGroup(rank, 4).part(32) for rank in range(4)]
    assert slices == [(0, 8), (8, 16), (16, 24), (24, 32)]


def test_a_failed_collective_names_the_peer_and_what_was_running():
    def peer_gone():
        raise RuntimeError("Connection closed by peer [127.0.0.1]:29500\nmore")

    with pytest.raises(RankLostError) as err:
        RankGroup(0, 2)._collective(peer_gone, "step 3 of AdaRound")
    assert str(err.value).startswith("rank 0: rank 1 stopped during step 3 of AdaRound "
                                     "(Connection closed by peer [127.0.0.1]:29500); ")


@pytest.mark.parametrize("text", ["abc", "0", "-5"])
def test_a_bad_collective_timeout_is_refused_naming_the_variable(monkeypatch, text):
    monkeypatch.setenv(TIMEOUT_ENV, text)
    with pytest.raises(ValueError, match=f"^{TIMEOUT_ENV}='{text}': give the seconds"):
        collective_timeout()


def test_leaving_destroys_the_process_group_so_the_process_can_exit_cleanly(tmp_path):
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        leave()
        assert not dist.is_initialized()
        leave()  # nothing left to destroy: does nothing
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
