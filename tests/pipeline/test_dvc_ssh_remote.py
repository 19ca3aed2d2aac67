"""A DVC remote over SSH (dvc-ssh) on an sshd of its own (scripts/sshd_remote.sh): push from
one clone, pull into a fresh one (after a refused key, which is named) and ``dvc repro``
runs nothing; a checkpoint changed on the remote is refused by its hash."""

from __future__ import annotations

import getpass
import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO, VENV_BIN, copy_project, project_env, run_cmd

from flows.api_server import free_port

SCRIPT = REPO / "scripts" / "sshd_remote.sh"
CACHED = ["data/dataset", "checkpoints/float.safetensors",  # data/dataset: a directory
          "checkpoints/calibrated.safetensors", "checkpoints/adaround.safetensors",
          "results/layers"]
DVC = f"{VENV_BIN}/dvc"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """``(directory with the keys, port)`` of a running sshd on loopback."""
    if not Path("/usr/sbin/sshd").exists():
        subprocess.run(["bash", str(REPO / "scripts" / "ci_services.sh")],
                       capture_output=True, timeout=900)
    if not Path("/usr/sbin/sshd").exists():
        pytest.skip("openssh-server is not installed and scripts/ci_services.sh could not "
                    "install it")
    directory, port = tmp_path_factory.mktemp("sshd"), free_port()
    started = subprocess.run(["bash", str(SCRIPT), "start", str(directory), str(port)],
                             capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr
    try:
        yield directory, port
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(directory)], timeout=60)


def _md5s(project: Path) -> dict[str, str]:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values()
            for out in stage.get("outs", [])}


def _stored(remote: Path, md5: str) -> Path:
    return remote / "files" / "md5" / md5[:2] / md5[2:]


def _files(remote: Path, path: str, md5: str) -> dict[str, str]:
    """``{file: md5}`` of an output as the remote holds it (a directory: every file of its
    ``.dir`` listing)."""
    if not md5.endswith(".dir"):
        return {path: md5}
    listing = json.loads(_stored(remote, md5).read_text())
    return {f"{path}/{entry['relpath']}": entry["md5"] for entry in listing}


def _clone(source: Path, target: Path, key: Path, env) -> Path:
    run_cmd(["git", "clone", "-q", str(source), str(target)], target.parent, env)
    run_cmd([DVC, "remote", "modify", "--local", "ssh", "keyfile", str(key)], target, env)
    return target


@pytest.fixture(scope="module")
def pushed(dvc_project, sshd, tmp_path_factory):
    """A project whose data and checkpoints were pushed to the SSH remote."""
    keys, port = sshd
    root = tmp_path_factory.mktemp("ssh-remote")
    project, remote = copy_project(dvc_project[0], root / "project"), root / "remote"
    env = project_env()
    url = f"ssh://{getpass.getuser()}@127.0.0.1:{port}{remote}"
    run_cmd([DVC, "remote", "add", "-d", "ssh", url], project, env)
    run_cmd([DVC, "remote", "modify", "ssh", "verify", "true"], project, env)  # committed
    run_cmd([DVC, "remote", "modify", "--local", "ssh", "keyfile",
             str(keys / "client_ed25519")], project, env)  # per clone, not committed
    run_cmd(["git", "commit", "-qam", "DVC remote over SSH"], project, env)
    run_cmd([DVC, "push"], project, env)
    return project, remote, keys, env


@pytest.mark.timeout(1500)  # may build the session's dvc_project first (a whole dvc repro)
def test_a_fresh_clone_pulls_over_ssh_and_repro_runs_nothing(pushed, tmp_path,
                                                             prefect_server):
    """First with a key the server refuses (DVC names user and host, nothing arrives),
    then with the right one."""
    project, remote, keys, env = pushed
    md5s = _md5s(project)
    files = {f: md5 for path in CACHED for f, md5 in _files(remote, path, md5s[path]).items()}
    assert len(files) > len(CACHED)  # the directories are not empty
    for file, md5 in files.items():
        assert _stored(remote, md5).is_file(), file
    wrong = tmp_path / "wrong_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)],
                   check=True)
    clone = _clone(project, tmp_path / "clone", wrong, env)
    refused = run_cmd([DVC, "pull"], clone, env, check=False, timeout=120)
    assert refused.returncode != 0
    said = " ".join(refused.stdout.split())
    assert f"Permission denied for user {getpass.getuser()} on host 127.0.0.1" in said
    assert not (clone / "checkpoints").exists()

    run_cmd([DVC, "remote", "modify", "--local", "ssh", "keyfile",
             str(keys / "client_ed25519")], clone, env)
    run_cmd([DVC, "pull"], clone, env)
    for file, md5 in files.items():
        assert hashlib.md5((clone / file).read_bytes()).hexdigest() == md5, file
    repro = run_cmd([DVC, "repro"], clone, project_env(prefect_server)).stdout
    assert "Running stage" not in repro, repro
    assert "Data and pipelines are up to date." in repro


def test_a_checkpoint_changed_on_the_remote_is_refused_by_its_hash(pushed, tmp_path):
    project, remote, keys, env = pushed
    md5 = _md5s(project)["checkpoints/adaround.safetensors"]
    stored = _stored(remote, md5)
    saved = tmp_path / "saved"
    shutil.copy2(stored, saved)
    try:
        data = bytearray(stored.read_bytes())
        data[-1] ^= 0xFF  # one flipped byte, same size, same name on the remote
        stored.write_bytes(bytes(data))
        clone = _clone(project, tmp_path / "clone", keys / "client_ed25519", env)
        pull = run_cmd([DVC, "pull"], clone, env, check=False)
        assert pull.returncode == 1
        assert "Checkout failed for following targets:" in pull.stdout
        assert "checkpoints/adaround.safetensors" in pull.stdout
        assert not (clone / "checkpoints" / "adaround.safetensors").exists()
        verbose = run_cmd([DVC, "pull", "-v"], clone, env, check=False).stdout
        assert "corrupted cache file" in verbose and md5[2:] in verbose  # what -v says
        assert (clone / "checkpoints" / "float.safetensors").is_file()  # the others arrived
    finally:
        shutil.copy2(saved, stored)
