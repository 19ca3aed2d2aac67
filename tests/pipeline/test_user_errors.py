"""Every user error is one line naming the key, file or layer and what to do, with an exit
code saying what kind, no traceback (unless --debug), and nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import project_env, run_cmd, tmpfs, write_params

from flows.environment import RESULT_STORAGE_KEYS


def _flows(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = project_env(**env)
    for key in RESULT_STORAGE_KEYS:  # the command picks its own (flows/environment.py)
        full_env.pop(key, None)
    return run_cmd([sys.executable, "-m", "flows", *args], project, full_env, check=False,
                   timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == code, proc.stdout[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stdout[-3000:]
    assert all(f in lines[0] for f in fragments), lines[0]
    return lines[0]


@pytest.mark.parametrize(("text", "fragments"), [
    ("", ("params.yaml is empty", "git checkout params.yaml")),
    ("# only a comment\n", ("params.yaml is empty",)),
    ("adaround: {num_steps: 5\n", ("params.yaml is not valid YAML", "line 2")),
    ("- a list\n", ("params.yaml holds a list, not a mapping",)),
])
@pytest.mark.parametrize("command", ["check", "run"])
def test_an_empty_or_broken_params_file_is_one_line(tmp_path, text, fragments, command):
    (tmp_path / "params.yaml").write_text(text)
    _one_error_line(_flows(tmp_path, command), 2, *fragments)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.parametrize(("override", "fragments"), [
    ("adaround.num_steps.x=1", ("adaround.num_steps is a value, not a section",)),
    ("adaround.num_steps=abc", ("params.yaml: adaround.num_steps:", "valid integer")),
    ("quant.weight_bits=9", ("params.yaml: quant.weight_bits:", "less than or equal to 8")),
    ("adaround.b_range=[1,", ("the value is not valid YAML",)),
    ("model.pretrained=missing.pt", ("model.pretrained: missing.pt does not exist",)),
    ("train.trainer=nowhere:fit", ("train.trainer", "cannot import module 'nowhere'")),
])
def test_a_bad_override_is_one_line_before_any_work(tmp_path, override, fragments):
    write_params(tmp_path)
    _one_error_line(_flows(tmp_path, "run", "-S", override), 2, *fragments)
    assert not (tmp_path / "data").exists()


def test_debug_shows_the_traceback(tmp_path):
    write_params(tmp_path)
    proc = _flows(tmp_path, "check", "--debug", "-S", "model.pretrained=missing.pt")
    assert proc.returncode == 1 and "Traceback" in proc.stdout
    assert "PreflightError: params.yaml: model.pretrained" in proc.stdout


@pytest.mark.parametrize(("options", "code", "fragments"), [
    ("ro,size=1m", 74, ("read-only", "point runtime.cache_dir at a writable directory")),
    ("size=32k", 74, ("has only", "MiB free", "point runtime.cache_dir at another disk")),
])
def test_a_read_only_or_full_cache_disk_is_one_line_saying_what_to_do(tmp_path, options, code,
                                                                      fragments):
    write_params(tmp_path)
    with tmpfs(tmp_path / "disk", options) as mounted:
        if not mounted:
            pytest.skip("mounting a tmpfs is not allowed here")
        line = _one_error_line(_flows(tmp_path, "check", "-S",
                                      f"runtime.cache_dir={tmp_path / 'disk' / 'cache'}"),
                               code, *fragments)
    assert ("read-only" in line) != ("free" in line)  # the two cases say different things
    assert not (tmp_path / "data").exists()


def test_check_writes_its_constant_stamp(tmp_path):
    write_params(tmp_path)
    proc = _flows(tmp_path, "check")
    assert proc.returncode == 0 and proc.stdout.strip().endswith("all good"), proc.stdout
    stamp = tmp_path / "results" / "params_checked.json"
    first = stamp.read_bytes()
    write_params(tmp_path, {"adaround": {"num_steps": 7}})
    assert _flows(tmp_path, "check").returncode == 0 and stamp.read_bytes() == first


def test_a_default_run_is_quiet_and_prefect_state_stays_in_the_project(tmp_path,
                                                                      tiny_checkpoints, pipe):
    """Progress bar and one summary line; no "View at" links to the temporary server; its
    database under the project's .prefect/, and a failed run leaves nothing in PREFECT_HOME."""
    project = pipe.project(tmp_path / "p", tiny_checkpoints)
    home, scratch = tmp_path / "home", tmp_path / "tmp"
    scratch.mkdir()
    env = {"PREFECT_HOME": str(home), "TMPDIR": str(scratch)}
    done = _flows(project, "adaround", **env)
    assert done.returncode == 0, done.stdout[-3000:]
    lines = [line for line in done.stdout.replace("\r", "\n").splitlines()
             if line.strip() and "AdaRound layers" not in line]  # the progress bar's updates
    assert lines == ["adaround: wrote checkpoints/adaround.safetensors"], done.stdout[-3000:]
    assert "View at" not in done.stdout
    assert (project / ".prefect" / "prefect.db").is_file()

    failed = _flows(project, "adaround", "-S", "adaround.exclude_prefix=[conv,fc,head]", **env)
    _one_error_line(failed, 2, "no Conv/Linear layer left after exclude_prefix")
    assert not (home / "prefect.db").exists()
    assert not any(p.is_file() for p in home.rglob("storage/*"))  # no pickled results
    assert list(scratch.iterdir()) == []  # the command's result storage went with it
