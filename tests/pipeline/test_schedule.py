"""The nightly schedule: ``python -m flows serve --cron ...`` against a real Prefect server."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, subprocess_env

CRON = "0 2 * * *"
# not prefect.yaml's "nightly", which tests/pipeline/test_deployments.py deploys to the same
# session server
NAME = "nightly-served"
DEPLOYMENT = f"adaround-nightly/{NAME}"


@pytest.fixture
def api(prefect_server):
    """This process's Prefect client settings pointed at the session's server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server}):
        yield prefect_server


def _wait_for_deployment(proc: subprocess.Popen, log, timeout: float = 120):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"serve exited:\n{log.read_text()[-4000:]}"
            try:
                return client.read_deployment_by_name(DEPLOYMENT)
            except ObjectNotFound:
                time.sleep(0.5)
    raise TimeoutError(f"{DEPLOYMENT} was not registered:\n{log.read_text()[-4000:]}")


def test_serve_registers_the_nightly_schedule_and_runs_it(tmp_path, api, pipe):
    from prefect.deployments import run_deployment

    project = pipe.project(tmp_path / "p")
    log = tmp_path / "serve.log"
    env = subprocess_env(api, PYTHONPATH=str(REPO), PREFECT_RUNNER_POLL_FREQUENCY="1")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows", "serve", "--cron", CRON,
                                "--name", NAME],
                                cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deployment = _wait_for_deployment(proc, log)
        crons = [s.schedule.cron for s in deployment.schedules if s.active]
        assert crons == [CRON]
        assert deployment.parameters["params_file"] == str(project / "params.yaml")
        flow_run = run_deployment(DEPLOYMENT, timeout=300)
        assert flow_run.state.is_completed(), f"{flow_run.state}\n{log.read_text()[-4000:]}"
        metrics = json.loads((project / "results" / "metrics.json").read_text())
        assert "delta_top1" in metrics  # the run's outputs landed in the project
        assert (project / "checkpoints" / "adaround.safetensors").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_serve_without_a_server_is_a_clear_error(tmp_path, pipe):
    project = pipe.project(tmp_path / "p")
    env = subprocess_env(None, PYTHONPATH=str(REPO), PREFECT_HOME=str(tmp_path / "home"))
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.run([sys.executable, "-m", "flows", "serve"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: scheduling needs a running Prefect server")
    assert "Traceback" not in proc.stderr
    assert "prefect server start" in proc.stderr
    assert not (project / "results").exists()  # failed before doing anything
