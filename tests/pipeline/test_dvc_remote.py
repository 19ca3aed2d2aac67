"""``dvc push`` / ``dvc pull`` of the dataset and checkpoints through a local directory remote."""

from __future__ import annotations

import hashlib

import yaml
from conftest import VENV_BIN, copy_project, project_env, run_cmd

CACHED = ["data/dataset", "checkpoints/float.safetensors",
          "checkpoints/calibrated.safetensors", "checkpoints/adaround.safetensors"]


def _locked_md5s(project) -> dict[str, str]:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return {out["path"]: out["md5"] for stage in lock["stages"].values()
            for out in stage.get("outs", [])}


def test_push_to_a_directory_remote_then_pull_into_a_fresh_clone(dvc_project, tmp_path):
    project = copy_project(dvc_project[0], tmp_path / "project")
    remote, env = tmp_path / "remote", project_env()
    run_cmd([f"{VENV_BIN}/dvc", "remote", "add", "-d", "local", str(remote)], project, env)
    run_cmd(["git", "commit", "-qam", "dvc remote"], project, env)
    run_cmd([f"{VENV_BIN}/dvc", "push"], project, env)
    md5s = _locked_md5s(project)
    for path in CACHED:  # DVC 3 layout: files/md5/<first 2 hex>/<rest>
        md5 = md5s[path]
        assert (remote / "files" / "md5" / md5[:2] / md5[2:]).is_file(), path

    clone = tmp_path / "clone"
    run_cmd(["git", "clone", "-q", str(project), str(clone)], tmp_path, env)
    assert not (clone / "checkpoints").exists()  # git holds no data, only dvc.lock
    run_cmd([f"{VENV_BIN}/dvc", "pull"], clone, env)
    for path in CACHED:
        if md5s[path].endswith(".dir"):  # a directory output: its files
            files = sorted(p.relative_to(project) for p in (project / path).rglob("*"))
            assert files and files == sorted(p.relative_to(clone)
                                             for p in (clone / path).rglob("*")), path
            assert all((clone / f).read_bytes() == (project / f).read_bytes() for f in files)
            continue
        assert hashlib.md5((clone / path).read_bytes()).hexdigest() == md5s[path], path
        assert (clone / path).read_bytes() == (project / path).read_bytes()
