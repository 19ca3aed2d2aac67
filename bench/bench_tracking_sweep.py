"""Four pipeline runs at once recording into MLflow: a PostgreSQL-backed tracking server
(scripts/mlflow_postgres.sh) against one SQLite file (and, with ``--backends``, a tracking
server on SQLite).

    python bench/bench_tracking_sweep.py                       # postgres-server, sqlite-file
    python bench/bench_tracking_sweep.py --backends postgres-server sqlite-server sqlite-file

Each backend gets a fresh tiny project and runs ``python -m flows sweep`` with four
``quant.weight_bits`` variants on a local Dask cluster of four worker processes (one
thread each), against one ``prefect server start``. Afterwards every variant's MLflow
record is checked against its own ``metrics.json``: parent run, three child runs, their
params and metrics, the AdaRound checkpoint artifact (bytes), the per-layer metrics and
the registered model version. Reported per backend: the sweep's wall time, the runs that
were recorded completely in that store, runs that fell back to a worker's local store
("recorded in the LOCAL store"), "database is locked" errors seen, and any mismatch.
Results go to ``bench/results/tracking_sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BITS = (2, 3, 4, 8)
MODEL = "adaround-bench"
TINY = {
    "data": {"kwargs": {"num_calibration": 64, "seed": 0}},
    "model": {"kwargs": {"width": 4}},
    "train": {"kwargs": {"epochs": 2}},
    "calibration": {"batch_size": 16, "num_samples": 64},
    "adaround": {"num_steps": 20, "progress": False},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout:g} s")


def base_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
           "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


class Backend:
    """A store to record into: ``start`` returns its URI, ``stop`` ends what it started."""

    def __init__(self, kind: str, root: Path) -> None:
        self.kind, self.root = kind, root
        self.proc: subprocess.Popen | None = None
        self.ports = {"MLFLOW_PORT": str(free_port()), "PG_PORT": str(free_port())}

    def start(self) -> str:
        if self.kind == "postgres-server":
            subprocess.run(["bash", str(REPO / "scripts" / "mlflow_postgres.sh"), "start",
                            str(self.root / "server")], env=base_env(**self.ports), check=True)
            return f"http://127.0.0.1:{self.ports['MLFLOW_PORT']}"
        (self.root / "store").mkdir(parents=True, exist_ok=True)
        db = f"sqlite:///{self.root / 'store' / 'mlflow.db'}"
        if self.kind == "sqlite-file":  # created once first, as an existing mlflow.db is: four
            from mlflow import MlflowClient  # processes creating a fresh one race on its schema

            MlflowClient(db).search_experiments(max_results=1)
            return db
        port = self.ports["MLFLOW_PORT"]
        self.proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", db, "--artifacts-destination",
             str(self.root / "store" / "artifacts"), "--serve-artifacts", "--host", "127.0.0.1",
             "--port", port, "--workers", "2", "--uvicorn-opts",
             "--timeout-worker-healthcheck 120"], env=base_env(),
            stdout=open(self.root / "mlflow.log", "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
            start_new_session=True)
        wait_http(f"http://127.0.0.1:{port}/health")
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self.kind == "postgres-server":
            subprocess.run(["bash", str(REPO / "scripts" / "mlflow_postgres.sh"), "stop",
                            str(self.root / "server")], env=base_env(**self.ports), check=False)
        elif self.proc is not None:
            os.killpg(self.proc.pid, 15)
            self.proc.wait(timeout=60)


def write_project(directory: Path, uri: str) -> None:
    directory.mkdir(parents=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    tracking = {"enabled": True, "experiment": "bench-sweep", "tracking_uri": uri,
                "registered_model": MODEL}
    for section, values in {**TINY, "tracking": tracking}.items():
        params.setdefault(section, {}).update(values)
    (directory / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def verify(uri: str, project: Path, scratch: Path) -> dict:
    """Every variant's record against its own metrics.json."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("bench-sweep")
    runs = client.search_runs([experiment.experiment_id], max_results=500) if experiment else []
    parents = [r for r in runs if r.data.tags.get("pipeline.role") == "pipeline"]
    try:
        versions = client.search_model_versions(f"name='{MODEL}'")
    except Exception:
        versions = []
    complete, problems = 0, []
    for bits in BITS:
        name = f"quant.weight_bits-{bits}"
        results = project / "results" / "sweep" / name / "results"
        if not (results / "metrics.json").is_file():
            problems.append(f"{name}: the variant failed (no metrics.json)")
            continue
        metrics = json.loads((results / "metrics.json").read_text())
        mine = [r for r in parents if r.data.params.get("runtime.results_dir") == str(results)]
        if len(mine) != 1:
            problems.append(f"{name}: {len(mine)} parent runs")
            continue
        parent = mine[0]
        children = {r.data.tags.get("pipeline.role"): r for r in runs
                    if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        checks = [parent.info.status == "FINISHED",
                  parent.data.params.get("quant.weight_bits") == str(bits),
                  abs(parent.data.metrics.get("adaround_top1", -1)
                      - metrics["adaround"]["top1"]) < 1e-9,
                  sorted(children) == ["adaround", "baseline", "float"]]
        for role, child in children.items():
            checks += [child.info.status == "FINISHED",
                       abs(child.data.metrics.get("top1", -1) - metrics[role]["top1"]) < 1e-9]
        if "adaround" in children:
            run_id = children["adaround"].info.run_id
            local = project / "results" / "sweep" / name / "checkpoints" / "adaround.safetensors"
            served = client.download_artifacts(run_id, "checkpoints/adaround.safetensors",
                                               str(scratch))
            checks += [Path(served).read_bytes() == local.read_bytes(),
                       len(client.get_metric_history(run_id, "adaround_mse")) == 5,
                       sum(v.run_id == run_id for v in versions) == 1]
        if all(checks):
            complete += 1
        else:
            problems.append(f"{name}: {checks.count(False)} of {len(checks)} checks failed")
    return {"parent_runs": len(parents), "runs": len(runs), "model_versions": len(versions),
            "complete": complete, "problems": problems}


def run_backend(kind: str, root: Path, prefect_url: str) -> dict:
    from distributed import LocalCluster

    backend = Backend(kind, root)
    uri = backend.start()
    project = root / "project"
    write_project(project, uri)
    worker_dir = root / "dask-cwd"
    worker_dir.mkdir()
    cluster = LocalCluster(processes=True, protocol="tcp", host="127.0.0.1", n_workers=4,
                           threads_per_worker=1, dashboard_address=None,
                           local_directory=str(worker_dir),
                           env={"PREFECT_API_URL": prefect_url, "PYTHONPATH": str(REPO),
                                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                                "MLFLOW_DISABLE_TELEMETRY": "true",
                                "PREFECT_CLIENT_MAX_RETRIES": "12"})
    try:
        args = [sys.executable, "-m", "flows", "sweep", "-v", "-S", "runtime.task_runner=dask",
                "-S", f"runtime.dask_address={cluster.scheduler_address}"]
        for bits in BITS:
            args += ["-V", f"quant.weight_bits={bits}"]
        started = time.monotonic()
        proc = subprocess.run(args, cwd=project, env=base_env(PREFECT_API_URL=prefect_url),
                              capture_output=True, text=True, timeout=3600)
        wall = time.monotonic() - started
    finally:
        cluster.close()
    out = proc.stdout + proc.stderr
    (root / "sweep.log").write_text(out)
    scratch = root / "downloads"
    scratch.mkdir()
    result = {"backend": kind, "uri": uri, "exit_code": proc.returncode, "wall_s": round(wall, 1),
              "fell_back_to_local": out.count("recorded in the LOCAL store"),
              "database_locked": out.lower().count("database is locked"),
              **verify(uri, project, scratch)}
    backend.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["postgres-server", "sqlite-file"],
                        choices=["postgres-server", "sqlite-server", "sqlite-file"])
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "tracking_sweep.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    home, port = work / "prefect-home", free_port()
    home.mkdir()
    prefect = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=base_env(PREFECT_HOME=str(home), PREFECT_SERVER_UI_ENABLED="false"),
        stdout=open(home / "server.log", "w"), stderr=subprocess.STDOUT)  # noqa: SIM115
    prefect_url = f"http://127.0.0.1:{port}/api"
    results = []
    try:
        wait_http(f"{prefect_url}/health")
        for kind in args.backends:
            result = run_backend(kind, work / kind, prefect_url)
            results.append(result)
            print(json.dumps(result), flush=True)
    finally:
        prefect.terminate()
        prefect.wait(timeout=60)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"\n{'backend':<17}{'wall s':>8}{'complete':>10}{'local':>7}{'locked':>8}  problems")
    for r in results:
        print(f"{r['backend']:<17}{r['wall_s']:>8}{r['complete']:>7}/{len(BITS)}"
              f"{r['fell_back_to_local']:>7}{r['database_locked']:>8}  {r['problems'] or '-'}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
