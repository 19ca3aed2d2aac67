"""Shared fixtures of the pipeline tests: a Prefect server on loopback, tiny projects.

Subprocesses that get ``PREFECT_API_URL`` of the session's server connect in about a
second instead of starting their own temporary server (8-20 s each).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = str(Path(sys.executable).parent)

TINY_PARAMS = {
    "data": {"kwargs": {"num_calibration": 64, "seed": 0}},
    "model": {"kwargs": {"width": 4}},
    "train": {"epochs": 2},
    "quant": {"weight_bits": 4},
    "calibration": {"batch_size": 16, "num_samples": 64},
    "adaround": {"num_steps": 20, "progress": False},
    "tracking": {"enabled": False, "experiment": "tiny"},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"prefect server at {url} did not become healthy in {timeout:g} s")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> str:
    """``PREFECT_API_URL`` of a real ``prefect server start`` on loopback (session-wide)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen([f"{VENV_BIN}/prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def subprocess_env(prefect_api_url: str | None = None, **extra: str) -> dict[str, str]:
    """Environment for ``python -m flows`` / ``dvc`` subprocesses of the tests."""
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}
    if prefect_api_url:
        env["PREFECT_API_URL"] = prefect_api_url
    return env


def write_params(directory: Path, overrides: dict | None = None) -> Path:
    """``params.yaml`` in ``directory``: the repo's params, made tiny, plus ``overrides``."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for source in (TINY_PARAMS, overrides or {}):
        for section, values in source.items():
            params.setdefault(section, {}).update(values)
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture
def tiny_project(tmp_path: Path) -> Path:
    """A directory with tiny ``params.yaml`` and the repo's ``dvc.yaml``, code importable."""
    write_params(tmp_path)
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    return tmp_path
