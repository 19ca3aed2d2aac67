"""MLflow on PostgreSQL (scripts/mlflow_postgres.sh): four pipeline runs at once record into
it without losing or mixing anything; a server that goes away mid-run leaves each run
complete on the server or complete in the local store with a warning."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, subprocess_env

from flows.api_server import free_port

SCRIPT = REPO / "scripts" / "mlflow_postgres.sh"
CI_SERVICES = REPO / "scripts" / "ci_services.sh"
VARIANTS = {"quant.weight_bits-2": 2, "quant.weight_bits-3": 3, "quant.weight_bits-4": 4,
            "quant.weight_bits-8": 8}
MODEL = "adaround-pg"


class PgServer:
    def __init__(self, directory: Path) -> None:
        self.dir, self.mlflow_port, self.pg_port = directory, free_port(), free_port()
        self.uri = f"http://127.0.0.1:{self.mlflow_port}"

    def script(self, command: str, check: bool = True) -> subprocess.CompletedProcess:
        env = {**subprocess_env(), "MLFLOW_PORT": str(self.mlflow_port),
               "PG_PORT": str(self.pg_port), "MLFLOW_WORKERS": "1"}  # one process to start
        proc = subprocess.run(["bash", str(SCRIPT), command, str(self.dir)], env=env,
                              capture_output=True, text=True, timeout=600)
        if check and proc.returncode:
            logs = "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}"
                           for p in self.dir.glob("*.log"))
            raise AssertionError(f"{SCRIPT.name} {command}: {proc.stderr}{logs}")
        return proc

    def sql(self, query: str) -> list[tuple]:
        import psycopg2

        with psycopg2.connect(host="127.0.0.1", port=self.pg_port, user="mlflow",
                              dbname="mlflow") as conn, conn.cursor() as cursor:
            cursor.execute(query)
            return cursor.fetchall()

    def kill_mlflow(self) -> None:
        """The tracking server goes away (PostgreSQL stays up for the checks)."""
        pid = int((self.dir / "mlflow.pid").read_text())
        os.killpg(pid, signal.SIGKILL)


def _services_available() -> str | None:
    """Why PostgreSQL cannot be had here, or None (installs it when missing, as CI does)."""
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        subprocess.run(["bash", str(CI_SERVICES)], capture_output=True, timeout=900)
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        return "PostgreSQL is not installed and scripts/ci_services.sh could not install it"
    return None


@pytest.fixture(scope="module")
def pg_mlflow(tmp_path_factory):
    reason = _services_available()
    if reason:
        pytest.skip(reason)
    server = PgServer(tmp_path_factory.mktemp("mlflow-pg"))
    server.script("start")
    try:
        yield server
    finally:
        server.script("stop", check=False)
        pgroot = server.dir / "pgroot"  # a cluster outside the test's folder (as root)
        if pgroot.is_file() and pgroot.read_text().strip().startswith("/var/tmp/adaround-"):
            shutil.rmtree(pgroot.read_text().strip(), ignore_errors=True)


def _four_slot_dask_cluster(prefect_server: str):
    from distributed import LocalCluster

    # four flows at once against the session's SQLite-backed Prefect server on 2 busy cores:
    # it can answer 503 for a while (seen); Prefect's client retries those, given the time
    env = {"PREFECT_API_URL": prefect_server, "PYTHONPATH": str(REPO),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PREFECT_CLIENT_MAX_RETRIES": "12"}
    # two worker processes of two threads: four runs at once, half the processes to start
    return LocalCluster(processes=True, protocol="tcp", host="127.0.0.1", n_workers=2,
                        threads_per_worker=2, dashboard_address=None, env=env)


@pytest.fixture(scope="module")
def pg_sweep(tmp_path_factory, pg_mlflow, prefect_server, pipe):
    """The four-variant sweep (tiny, 2 steps a layer) recorded into the server:
    ``(project, output)``."""
    tracking = {"enabled": True, "experiment": "pg-sweep", "tracking_uri": pg_mlflow.uri,
                "registered_model": MODEL}
    project = pipe.project(tmp_path_factory.mktemp("pg-sweep") / "p", overrides={
        "tracking": tracking, "adaround": {"num_steps": 2, "progress": False},
        "train": {"kwargs": {"epochs": 1}}})
    args = ["sweep", "-S", "runtime.task_runner=dask"]
    for bits in VARIANTS.values():
        args += ["-V", f"quant.weight_bits={bits}"]
    started = time.monotonic()
    with _four_slot_dask_cluster(prefect_server) as cluster:
        out = pipe.run_flows(project, *args, "-S",
                             f"runtime.dask_address={cluster.scheduler_address}",
                             api_url=prefect_server, timeout=1500).stdout
    print(f"four-variant Dask sweep into MLflow on PostgreSQL: {time.monotonic() - started:.1f} s")
    return project, out


@pytest.mark.timeout(1500)  # starts the server and runs the sweep (pg_sweep)
def test_four_runs_at_once_record_everything_into_postgresql(tmp_path, pg_mlflow, pg_sweep):
    from mlflow import MlflowClient

    project, out = pg_sweep
    assert "recorded in the LOCAL store" not in out
    assert not list(project.rglob("mlflow.db")), "a run fell back to a local store"

    client = MlflowClient(pg_mlflow.uri)
    experiment = client.get_experiment_by_name("pg-sweep")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("pipeline.role") == "pipeline"]
    assert len(parents) == 4 and len(runs) == 16  # nothing lost, nothing twice
    versions = client.search_model_versions(f"name='{MODEL}'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3, 4]
    sweep = project / "results" / "sweep"
    for name, bits in VARIANTS.items():
        results = sweep / name / "results"
        metrics = json.loads((results / "metrics.json").read_text())
        [parent] = [r for r in parents
                    if r.data.params["runtime.results_dir"] == str(results)]
        assert parent.info.status == "FINISHED"
        assert parent.data.params["quant.weight_bits"] == str(bits)
        assert parent.data.metrics["adaround_top1"] == pytest.approx(metrics["adaround"]["top1"])
        assert parent.data.metrics["baseline_top1"] == pytest.approx(metrics["baseline"]["top1"])
        assert parent.data.metrics["delta_top1"] == pytest.approx(metrics["delta_top1"])
        children = {r.data.tags["pipeline.role"]: r for r in runs
                    if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        assert sorted(children) == ["adaround", "baseline", "float"]
        for role, child in children.items():
            assert child.info.status == "FINISHED"
            assert child.data.metrics["top1"] == pytest.approx(metrics[role]["top1"])
            assert child.data.params["quant.weight_bits"] == str(bits)
        adaround = children["adaround"]
        local = sweep / name / "checkpoints" / "adaround.safetensors"
        served = client.download_artifacts(adaround.info.run_id,
                                           "checkpoints/adaround.safetensors", str(tmp_path))
        assert Path(served).read_bytes() == local.read_bytes()
        assert len(client.get_metric_history(adaround.info.run_id, "adaround_mse")) == 5
        [version] = [v for v in versions if v.run_id == adaround.info.run_id]
        assert version.tags["metric.adaround.top1"] == f"{metrics['adaround']['top1']:.6g}"
    # the artifacts went through the server into its directory, none into the project
    assert len(list((pg_mlflow.dir / "artifacts").rglob("adaround.safetensors"))) == 4
    assert not list(project.rglob("mlartifacts"))


def test_preflight_names_a_database_nobody_answers_on():
    """A database URI nobody answers on: the preflight fails naming it, before any work."""
    from tasks.tracking import TrackingStoreError, check_uri

    uri = f"postgresql+psycopg2://mlflow@127.0.0.1:{free_port()}/mlflow"
    started = time.monotonic()
    with pytest.raises(TrackingStoreError) as err:
        check_uri(uri)
    assert time.monotonic() - started < 60
    assert str(err.value).startswith(f"MLflow tracking store {uri} cannot be used: ")
    assert "tracking.enabled: false" in str(err.value)


def test_script_without_postgresql_is_one_line(tmp_path):
    env = {**subprocess_env(), "PG_BIN": str(tmp_path / "nowhere")}
    proc = subprocess.run(["bash", str(SCRIPT), "start", str(tmp_path / "srv")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: PostgreSQL is not installed (no {tmp_path / 'nowhere'}/initdb): "
        f"apt-get install postgresql"]


def _variant_run(project: Path, pipe, spec: str, experiment: str):
    """``(params, layout, metrics)`` of one finished variant of the sweep in ``project``,
    recording into ``experiment``."""
    from flows.sweep import make_variants
    from tasks.layout import Layout

    base = pipe.params(project)
    [variant] = make_variants(base, [spec], Path(base.runtime.results_dir) / "sweep")
    params = variant.params.model_copy(update={"tracking": variant.params.tracking.model_copy(
        update={"experiment": experiment})})
    layout = Layout(params)
    return params, layout, json.loads(layout.metrics.read_text())


@pytest.mark.timeout(1500)  # alone, it starts the server and runs the sweep
def test_a_server_that_goes_away_mid_run(tmp_path, monkeypatch, pg_mlflow, pg_sweep, pipe):
    """The sweep's runs are whole on the server; the server dies while a real run is
    registering its model: that run is recorded whole, model version included, in the
    local store, and the warning names the server's incomplete runs. (Last in this module:
    the server stays down.)"""
    from mlflow import MlflowClient

    import tasks.registry as registry
    import tasks.tracking as tracking

    for key, value in tracking._RECORDING_RETRIES.items():  # restored after the test
        monkeypatch.setenv(key, os.environ.get(key, value))
    monkeypatch.chdir(tmp_path)
    real = registry.ensure_registered_model

    def dies_in_the_registry_step(*args):  # the model's files are uploaded by now
        if not killed:  # once: the local store records through here too
            killed.append(True)
            pg_mlflow.kill_mlflow()
        return real(*args)

    killed: list[bool] = []
    monkeypatch.setattr(registry, "ensure_registered_model", dies_in_the_registry_step)
    params, layout, metrics = _variant_run(pg_sweep[0], pipe, "quant.weight_bits=4", "pg-death")
    started = time.monotonic()
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    tracking.logger.addHandler(handler)  # whatever Prefect's logging set-up did to caplog's
    try:
        recorded = tracking.log_pipeline_run(params, layout, metrics)
    finally:
        tracking.logger.removeHandler(handler)
    assert killed and time.monotonic() - started < 120  # quick retries, not MLflow's minutes
    local = tracking.local_tracking_uri()
    client = MlflowClient(local)
    run = client.get_run(recorded.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["delta_top1"] == pytest.approx(metrics["delta_top1"])
    version = client.get_model_version(MODEL, recorded.registered.version)
    assert client.get_run(version.run_id).data.tags["mlflow.parentRunId"] == recorded.run_id
    assert version.tags["metric.adaround.top1"] == f"{metrics['adaround']['top1']:.6g}"
    [warning] = warnings
    assert pg_mlflow.uri in warning and local in warning and recorded.run_id in warning
    partial = warning.split("the partial record left there (parent run ")[1]
    parent = partial.split(",")[0]
    children = partial.split("child runs ")[1].split(")")[0].split(", ")
    assert len(children) == 3  # float, baseline, and adaround (where it died)

    # straight from the database: the sweep's runs whole, this run's never FINISHED and
    # no model version of it
    rows = dict(pg_mlflow.sql("SELECT run_uuid, status FROM runs"))
    statuses = [rows.pop(r) for r in [parent, *children]]  # float, baseline, adaround
    assert statuses[1:3] == ["FINISHED"] * 2 and "FINISHED" not in statuses[::3]
    assert sorted(rows.values()) == ["FINISHED"] * 16  # the sweep's 4 x 4
    assert recorded.run_id not in rows
    assert pg_mlflow.sql(f"SELECT count(*) FROM model_versions WHERE run_id = "
                         f"'{children[-1]}'") == [(0,)]
    assert pg_mlflow.sql("SELECT count(*) FROM model_versions") == [(4,)]
