"""prefect.yaml's deployments on a real ``prefect server start``, run by a process worker.

The project is a copy of the repository's code, ``prefect.yaml`` and tiny params in a
temporary directory (as a user's checkout would be); ``prefect deploy --all --no-prompt``
deploys it, ``python -m flows worker`` (the checked ``prefect worker start``) runs it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO, VENV_BIN, run_cmd, stop_process, subprocess_env, write_params

POOL = "adaround"
NIGHTLY = "adaround-nightly/nightly"
SWEEP = "adaround-variants/sweep"


@pytest.fixture(scope="module")
def api(prefect_server):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_server}):
        yield prefect_server


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, api):
    """The project deployed (after a first ``prefect deploy`` to the missing pool), and a
    worker on the pool; yields ``(project, env, worker log, output of the failed deploy)``."""
    project = tmp_path_factory.mktemp("deployed-project")
    for name in ("adaround_core", "tasks", "flows"):
        shutil.copytree(REPO / name, project / name,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "prefect.yaml", project / "prefect.yaml")
    write_params(project, {"adaround": {"num_steps": 2}, "train": {"kwargs": {"epochs": 1}}})
    # no PYTHONPATH: the worker must run the flows from the project directory itself
    env = subprocess_env(api, PREFECT_WORKER_QUERY_SECONDS="1",
                         PREFECT_RUNNER_POLL_FREQUENCY="1")
    env.pop("PYTHONPATH", None)
    prefect = f"{VENV_BIN}/prefect"
    missing = run_cmd([prefect, "deploy", "--all", "--no-prompt"], project, env, check=False)
    run_cmd([prefect, "work-pool", "create", POOL, "--type", "process", "--overwrite"],
            project, env)
    run_cmd([prefect, "deploy", "--all", "--no-prompt"], project, env)
    log = project / "worker.log"
    with open(log, "w") as out:  # started from elsewhere: it must enter the project itself
        worker = subprocess.Popen([sys.executable, "-m", "flows", "worker", "--pool", POOL,
                                   "--params", str(project / "params.yaml")],
                                  cwd=project.parent, env={**env, "PYTHONPATH": str(project)},
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        yield project, env, log, missing
    finally:
        stop_process(worker)


def _run(deployment: str, log, **parameters):
    from prefect.deployments import run_deployment

    started = time.monotonic()
    flow_run = run_deployment(deployment, parameters=parameters or None, timeout=600)
    assert flow_run.state.is_completed(), f"{flow_run.state}\n{log.read_text()[-6000:]}"
    return flow_run, time.monotonic() - started


def test_deploy_to_a_missing_pool_names_it(deployed):
    missing = deployed[3]
    assert missing.returncode == 1
    said = " ".join(missing.stdout.split())  # rich wraps the message to the terminal width
    assert "references work pool 'adaround' which does not exist" in said


def test_deployments_carry_the_schedule_and_the_project_dir(deployed, api):
    from prefect.client.orchestration import get_client

    project = deployed[0]
    with get_client(sync_client=True) as client:
        nightly = client.read_deployment_by_name(NIGHTLY)
        sweep = client.read_deployment_by_name(SWEEP)
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert nightly.work_pool_name == sweep.work_pool_name == POOL
    pull = nightly.pull_steps[0]["prefect.deployments.steps.set_working_directory"]
    assert pull["directory"] == str(project)
    declared = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    assert sweep.parameters == declared[1]["parameters"]


def test_a_triggered_run_completes_on_the_worker_and_a_second_resumes(deployed, api):
    from prefect.client.orchestration import get_client

    project, _, log, _ = deployed
    first, first_s = _run(NIGHTLY, log)
    metrics = json.loads((project / "results" / "metrics.json").read_text())
    assert "delta_top1" in metrics
    assert (project / "checkpoints" / "adaround.safetensors").is_file()
    assert (project / "checkpoints" / "export" / "model.onnx").is_file()
    layers = sorted((project / "results" / "layers").glob("*.safetensors"))
    assert len(layers) == 5
    stamps = {p.name: p.stat().st_mtime_ns for p in layers}

    # parameters override params keys: a setting no layer key depends on keeps them all
    second, second_s = _run(NIGHTLY, log, overrides=["adaround.progress=false"])
    assert "0 layers rounded, 5 reused" in log.read_text()
    assert {p.name: p.stat().st_mtime_ns
            for p in (project / "results" / "layers").glob("*.safetensors")} == stamps
    with get_client(sync_client=True) as client:
        for run in (first, second):
            assert client.read_flow_run(run.id).state.type.value == "COMPLETED"
        assert client.read_flow_run(second.id).parameters["overrides"] == [
            "adaround.progress=false"]
    print(f"nightly deployment on a process worker: first run {first_s:.1f} s, "
          f"resumed run {second_s:.1f} s")


def test_worker_on_a_missing_pool_is_one_line(deployed):
    project, env = deployed[0], deployed[1]
    proc = subprocess.run([sys.executable, "-m", "flows", "worker", "--pool", "adaround-typo"],
                          cwd=project, env={**env, "PYTHONPATH": str(project)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"error: work pool 'adaround-typo' does not exist on the Prefect server "
        f"{env['PREFECT_API_URL']}: create it with `prefect work-pool create adaround-typo "
        f"--type process` (prefect.yaml's deployments use 'adaround'), or name an existing "
        f"one (`prefect work-pool ls`)"]


def test_worker_without_a_server_is_one_line(tmp_path):
    env = subprocess_env(None, PYTHONPATH=str(REPO), PREFECT_HOME=str(tmp_path / "home"),
                         PREFECT_API_URL="http://127.0.0.1:9/api")
    proc = subprocess.run([sys.executable, "-m", "flows", "worker"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: the Prefect server http://127.0.0.1:9/api (PREFECT_API_URL) does not answer")


def test_a_missing_deployment_is_named_by_prefect(deployed):
    project, env = deployed[0], deployed[1]
    proc = run_cmd([f"{VENV_BIN}/prefect", "deployment", "run", "adaround-nightly/nope"],
                   project, env, check=False)
    assert proc.returncode == 1
    assert "Deployment 'adaround-nightly/nope' not found!" in " ".join(proc.stdout.split())
