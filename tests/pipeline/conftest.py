"""Shared fixtures of the pipeline tests: a Prefect server on loopback, tiny projects.

Subprocesses that get ``PREFECT_API_URL`` of the session's server connect in about a
second instead of starting their own temporary server (8-20 s each).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from flows.api_server import free_port

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = str(Path(sys.executable).parent)

TINY_PARAMS = {
    "data": {"kwargs": {"num_calibration": 64, "seed": 0}},
    "model": {"kwargs": {"width": 4}},
    "train": {"kwargs": {"epochs": 2}},
    "quant": {"weight_bits": 4},
    "calibration": {"batch_size": 16, "num_samples": 64},
    "adaround": {"num_steps": 20, "progress": False},
    "tracking": {"enabled": False, "experiment": "tiny", "registered_model": None},
    "runtime": {"keep_cache": True},  # the cache tests look at caches after a run
}


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
    port = free_port()
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
        stop_process(proc, timeout=20)
        log.close()


def stop_process(proc: subprocess.Popen, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL when ``proc`` has not ended after ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# One temporary-server database for the suite's commands (each test project would
# otherwise get its own under .prefect/ and migrate it, ~10 s a command); a test that
# sets PREFECT_HOME gets Prefect's own behaviour instead.
TEST_PREFECT_DB = Path(tempfile.gettempdir()) / "adaround-tests" / "prefect.db"


def subprocess_env(prefect_api_url: str | None = None, **extra: str) -> dict[str, str]:
    """Environment for ``python -m flows`` / ``dvc`` subprocesses of the tests."""
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
           "DVC_NO_ANALYTICS": "1", "PYTHONUNBUFFERED": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}
    if "PREFECT_HOME" not in extra:
        TEST_PREFECT_DB.parent.mkdir(parents=True, exist_ok=True)
        env.setdefault("PREFECT_SERVER_DATABASE_CONNECTION_URL",
                       f"sqlite+aiosqlite:///{TEST_PREFECT_DB}")
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


# --- Orchestration tests (test_tasks, test_resume, test_cache, test_flow_e2e, test_memory,
# test_faults, test_sweep_dask, test_schedule): a harness, shared checkpoints, helpers.

TINY_LAYERS = ["conv1", "conv2", "conv3", "fc1", "head"]  # DigitsCNN, first-call order


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness (a temporary server) for in-process flow runs, once per session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


class PipelineHelpers:
    """Helpers of the orchestration tests, handed out by the ``pipe`` fixture."""

    layers = TINY_LAYERS

    @staticmethod
    def params(directory: Path):
        """The validated params of ``directory/params.yaml``, runtime dirs made absolute."""
        from flows.runtime import anchored
        from tasks.params import load_params

        return anchored(load_params(directory / "params.yaml"), directory)

    @staticmethod
    def project(directory: Path, checkpoints: Path | None = None,
                overrides: dict | None = None) -> Path:
        """A tiny project in ``directory``; with ``checkpoints``, its data/ and checkpoints/
        are copied in (the adaround stage can run at once)."""
        directory.mkdir(parents=True, exist_ok=True)
        write_params(directory, overrides)
        if checkpoints is not None:
            for sub in ("data", "checkpoints"):
                shutil.copytree(checkpoints / sub, directory / sub)
        return directory

    @staticmethod
    def run_flows(directory: Path, *args: str, api_url: str | None, timeout: float = 300,
                  check: bool = True, verbose: bool = True,
                  **env: str) -> subprocess.CompletedProcess:
        """``python -m flows ARGS`` (with ``-v``: every log line) in ``directory``; stdout and
        stderr together as ``stdout``."""
        verbosity = ["-v"] if verbose else []
        proc = subprocess.run([sys.executable, "-m", "flows", *args, *verbosity], cwd=directory,
                              env=subprocess_env(api_url, PYTHONPATH=str(REPO), **env),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"python -m flows {' '.join(args)} exited {proc.returncode}:"
                                 f"\n{proc.stdout[-6000:]}")
        return proc

    @staticmethod
    def run_and_kill(project: Path, api_url: str, ready: Callable[[], bool]) -> str:
        """Start ``python -m flows adaround`` in ``project``; SIGKILL it as soon as
        ``ready()`` (polled every 2 ms) is true; return its output."""
        log = project / "killed.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "flows", "adaround"], cwd=project,
                                    env=subprocess_env(api_url, PYTHONPATH=str(REPO)),
                                    stdout=out, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 240
            try:
                while not ready():
                    assert proc.poll() is None, f"finished before the kill:\n{log.read_text()}"
                    assert time.monotonic() < deadline, "no progress"
                    time.sleep(0.002)
                proc.send_signal(signal.SIGKILL)
            finally:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL
        return log.read_text()

    @staticmethod
    def layer_counts(output: str) -> tuple[int, int]:
        """``(rounded, reused)`` from the adaround flow's "N layers rounded, M reused" line."""
        import re

        found = re.findall(r"(\d+) layers rounded, (\d+) reused", output)
        assert found, f"no 'layers rounded' line in the output:\n{output[-4000:]}"
        rounded, reused = found[-1]
        return int(rounded), int(reused)

    @staticmethod
    def result_files(directory: Path) -> list[str]:
        """Names of the finished per-layer results (temporary files left out)."""
        return sorted(p.name for p in (directory / "results" / "layers").glob("*.safetensors")
                      if not p.name.startswith("."))

    @staticmethod
    def round_units(params, inputs) -> list:
        """Every unit through the task bodies (no Prefect run), chained as the adaround stage
        chains them; ``inputs``: the dataset, float and calibrated artifacts."""
        from tasks.activation_cache import cache_layer_activations
        from tasks.layer_adaround import adaround_layer
        from tasks.layer_jobs import plan_job
        from tasks.planning import plan_layers

        plan = plan_layers.fn(params, *inputs)
        results, job = [], None
        for _ in plan.names:
            job = plan_job(params, *inputs, plan, results, upstream=job)
            results.append(adaround_layer.fn(job, cache_layer_activations.fn(job)))
        return results

    @staticmethod
    def differs_from_library(params, layout) -> list[str]:
        """State-dict entries in which the pipeline's AdaRound checkpoint differs from
        :meth:`library_state`."""
        import torch

        from tasks.io import load_tensors

        pipeline_state = load_tensors(layout.adaround_checkpoint)
        library_state = PipelineHelpers.library_state(params)
        return [k for k in library_state if not torch.equal(pipeline_state[k], library_state[k])]

    @staticmethod
    def library_state(params) -> dict:
        """The in-memory library call on the project's calibrated checkpoint: the state_dict
        ``weight_reconstruction`` leaves, to compare with the pipeline's checkpoint."""
        from adaround_core.reconstruction.weight_reconstruction import weight_reconstruction
        from tasks.layout import Layout, existing
        from tasks.model_state import calibrated_model, calibration_inputs

        layout = Layout(params)
        dataset = existing(layout.dataset, "data")
        batches = calibration_inputs(params, dataset)
        model = calibrated_model(params, dataset, existing(layout.float_checkpoint, "train"),
                                 existing(layout.calibrated_checkpoint, "calibrate"))
        weight_reconstruction(model, batches, None, params.adaround.model_dump())
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def pipe() -> type[PipelineHelpers]:
    return PipelineHelpers


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> Path:
    """data/ and checkpoints/ (dataset, float, calibrated) of the tiny config, made once by
    the task bodies themselves (``task.fn()``, no Prefect run); copy them into projects."""
    import torch

    from tasks.calibration import calibrate
    from tasks.data import prepare_data
    from tasks.layout import Layout
    from tasks.training import train_float_model

    root = PipelineHelpers.project(tmp_path_factory.mktemp("tiny-checkpoints"))
    params = PipelineHelpers.params(root)
    layout = Layout(params)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dataset = prepare_data.fn(params, str(layout.dataset))
        float_model = train_float_model.fn(params, dataset, str(layout.float_checkpoint))
        calibrate.fn(params, dataset, float_model, str(layout.calibrated_checkpoint))
    finally:
        torch.set_num_threads(threads)
    return root


# --- MLflow and DVC tests (test_tracking, test_compare, test_dvc_pipeline, test_dvc_remote).

GIT_IDENTITY = {"GIT_AUTHOR_NAME": "tests", "GIT_AUTHOR_EMAIL": "tests@example.invalid",
                "GIT_COMMITTER_NAME": "tests", "GIT_COMMITTER_EMAIL": "tests@example.invalid"}


def project_env(prefect_api_url: str | None = None, **extra: str) -> dict[str, str]:
    """``subprocess_env`` plus a git identity, with no MLflow store inherited from outside."""
    env = subprocess_env(prefect_api_url, **GIT_IDENTITY, **extra)
    if "MLFLOW_TRACKING_URI" not in extra:
        env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run_cmd(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 300,
            check: bool = True) -> subprocess.CompletedProcess:
    """A command in ``cwd``; stdout and stderr together as ``stdout``; fails loudly."""
    proc = subprocess.run(args, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def fake_results():
    """``make(directory, top1=(float, baseline, adaround), scores=None, **param_overrides)``
    (``scores``: ``{role: {metric: value}}`` instead of top-1): a project
    whose checkpoints, layer report and metrics are written directly (no pipeline run), with
    tracking on and the MLflow store ``directory/store/mlflow.db``; returns
    ``(params, layout, metrics)``."""
    from tasks.io import save_tensors, write_json
    from tasks.layout import Layout
    from tasks.params import load_params
    from tasks.reporting import write_metrics

    def make(directory: Path, top1=(90.0, 80.0, 85.0), scores=None, **overrides):
        import torch

        (directory / "store").mkdir(parents=True, exist_ok=True)
        tracking = {"enabled": True, "experiment": "fake",
                    "tracking_uri": f"sqlite:///{directory / 'store' / 'mlflow.db'}",
                    **overrides.pop("tracking", {})}
        write_params(directory, {"tracking": tracking, **overrides})
        params = load_params(directory / "params.yaml")
        runtime = {k: str(directory / getattr(params.runtime, k)) for k in
                   ("data_dir", "checkpoint_dir", "results_dir", "cache_dir")}
        params = params.model_copy(update={"runtime": params.runtime.model_copy(update=runtime)})
        layout = Layout(params)
        for i, path in enumerate((layout.float_checkpoint, layout.calibrated_checkpoint,
                                  layout.adaround_checkpoint)):
            save_tensors(path, {"fc.weight": torch.full((2, 3), float(i))})
        write_json(layout.layer_report, [
            {"index": i, "layer": name, "nearest_mse": 0.5 / (i + 1), "adaround_mse": 0.1 / (i + 1),
             "decision": "adaround", "seconds": 0.1} for i, name in enumerate(["conv1", "fc1", "head"])])
        metrics = write_metrics(layout, scores or {role: {"top1": value} for role, value in
                                                   zip(("float", "baseline", "adaround"), top1,
                                                       strict=True)})
        return params, layout, metrics

    return make


@pytest.fixture(scope="session")
def dvc_project(tmp_path_factory, prefect_server):
    """A git + DVC repo with the project's code, dvc.yaml and tiny params (tracking on, the
    default local store), after its first ``dvc repro`` and a commit of the results.
    Returns ``(path, output of the first repro)``. Tests that change it work on a copy
    (``copy_project``)."""
    root = tmp_path_factory.mktemp("dvc-project")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("adaround_core", "tasks", "flows"):
        shutil.copytree(REPO / name, root / name, ignore=ignore)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    write_params(root, {"tracking": {"enabled": True, "experiment": "tiny"}})
    env = project_env(prefect_server)
    run_cmd(["git", "init", "-q"], root, env)
    run_cmd([f"{VENV_BIN}/dvc", "init", "-q"], root, env)
    run_cmd(["git", "add", "-A"], root, env)
    run_cmd(["git", "commit", "-qm", "tiny project"], root, env)
    first = run_cmd([f"{VENV_BIN}/dvc", "repro"], root, env, timeout=400).stdout
    run_cmd(["git", "add", "-A"], root, env)
    run_cmd(["git", "commit", "-qm", "first repro"], root, env)
    return root, first


def copy_project(source: Path, target: Path) -> Path:
    """A copy of a git + DVC project (repo, DVC cache, outputs and MLflow store)."""
    shutil.copytree(source, target, symlinks=True)
    return target


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[bool]:
    """A real tmpfs mounted at ``path`` (True), or False where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                 capture_output=True).returncode == 0
    except FileNotFoundError:
        mounted = False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)

