"""tasks/tracking.py against real MLflow stores: a temporary SQLite store, a dead server."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import GIT_IDENTITY, project_env, run_cmd
from mlflow import MlflowClient
from safetensors.torch import load_file

from flows.pipeline import pipeline_flow
from flows.stages import adaround_flow
from tasks.tracking import (
    PARENT_ROLE,
    ROLE_TAG,
    TrackingStoreError,
    check_tracking_store,
    check_uri,
    local_tracking_uri,
    log_pipeline_run,
    tracking_uri,
)
from tasks.versioning import package_versions


def _dead_url() -> str:
    """An http URL on loopback where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _children(client: MlflowClient, parent) -> dict:
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return {run.info.run_name: run for run in runs}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, fake_results):
    """One pipeline run recorded from a git repo whose dvc.lock has a current and a stale out."""
    tmp_path = tmp_path_factory.mktemp("recorded")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        return _record_in_git_repo(tmp_path, fake_results)


def _record_in_git_repo(tmp_path, fake_results):
    params, layout, metrics = fake_results(tmp_path)
    current = hashlib.md5(layout.adaround_checkpoint.read_bytes()).hexdigest()
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "adaround": {"outs": [{"path": "checkpoints/adaround.safetensors", "md5": current}]},
        "evaluate": {"outs": [{"path": "results/metrics.json", "md5": "0" * 32}]}}}))
    env = {**os.environ, **GIT_IDENTITY}
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "x"]):
        subprocess.run(["git", *args], cwd=tmp_path, env=env, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, text=True,
                            capture_output=True, check=True).stdout.strip()
    run_id = log_pipeline_run(params, layout, metrics).run_id
    client = MlflowClient(tracking_uri(params))
    return params, layout, metrics, client, client.get_run(run_id), commit, current


def test_tracking_uri_precedence(tmp_path, monkeypatch, fake_results):
    monkeypatch.chdir(tmp_path)
    params, _, _ = fake_results(tmp_path)
    assert tracking_uri(params) == params.tracking.tracking_uri  # params win over the env
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    assert tracking_uri(params) == params.tracking.tracking_uri
    unset = params.model_copy(update={"tracking": params.tracking.model_copy(
        update={"tracking_uri": None})})
    assert tracking_uri(unset) == "http://tracking.example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri(unset) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking_uri(unset) == local_tracking_uri()


def test_parent_run_has_config_top1_deltas_and_provenance_tags(recorded):
    params, _, metrics, client, parent, commit, current = recorded
    assert parent.info.status == "FINISHED"
    assert parent.data.tags[ROLE_TAG] == PARENT_ROLE
    assert client.get_experiment(parent.info.experiment_id).name == "fake"
    flat = params.flat()
    assert set(parent.data.params) == set(flat)
    assert parent.data.params["adaround.num_steps"] == str(flat["adaround.num_steps"])
    assert parent.data.metrics == pytest.approx({
        "float_top1": 90.0, "baseline_top1": 80.0, "adaround_top1": 85.0,
        "delta_top1": 5.0, "adaround_vs_float_top1": -5.0})
    tags = parent.data.tags
    assert tags["git.commit"] == commit == tags["mlflow.source.git.commit"]
    assert tags["dvc.adaround.checkpoints/adaround.safetensors"] == current
    assert "dvc.evaluate.results/metrics.json" not in tags  # stale in dvc.lock: left out
    for name, version in package_versions().items():
        assert tags[f"versions.{name}"] == version


def test_child_runs_hold_top1_deltas_and_checkpoints_as_state_dicts(recorded, tmp_path):
    _, layout, _, client, parent, _, _ = recorded
    children = _children(client, parent)
    assert set(children) == {"float", "baseline", "adaround"}
    assert {run.data.tags[ROLE_TAG] for run in children.values()} == set(children)
    assert all(run.info.status == "FINISHED" for run in children.values())
    assert children["float"].data.metrics["top1"] == pytest.approx(90.0)
    assert children["baseline"].data.metrics["delta_vs_float_top1"] == pytest.approx(-10.0)
    assert children["adaround"].data.metrics["delta_top1"] == pytest.approx(5.0)
    assert children["adaround"].data.params == parent.data.params
    for role, checkpoint in (("float", layout.float_checkpoint),
                             ("baseline", layout.calibrated_checkpoint),
                             ("adaround", layout.adaround_checkpoint)):
        (tmp_path / role).mkdir()
        local = client.download_artifacts(children[role].info.run_id,
                                          f"checkpoints/{checkpoint.name}", str(tmp_path / role))
        assert open(local, "rb").read() == checkpoint.read_bytes()
        assert set(load_file(local)) == {"fc.weight"}  # a safetensors state_dict, not a pickle


def test_per_layer_errors_are_stepped_metrics_a_table_and_a_plot(recorded, tmp_path):
    _, _, _, client, parent, _, _ = recorded
    run_id = _children(client, parent)["adaround"].info.run_id
    for key, top in (("nearest_mse", 0.5), ("adaround_mse", 0.1)):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == [0, 1, 2]
        assert [m.value for m in history] == pytest.approx([top, top / 2, top / 3])
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"layer_errors.json", "layer_errors.png", "checkpoints"} <= artifacts
    # MlflowClient.load_table reads the global store, not the client's: read the file
    table = json.loads(Path(client.download_artifacts(run_id, "layer_errors.json",
                                                      str(tmp_path))).read_text())
    rows = [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]
    assert [row["layer"] for row in rows] == ["conv1", "fc1", "head"]
    assert [row["adaround_mse"] for row in rows] == pytest.approx([0.1, 0.05, 0.1 / 3])


def test_configs_with_more_params_than_one_batch_are_logged_whole(tmp_path, monkeypatch,
                                                                   fake_results):
    monkeypatch.chdir(tmp_path)
    kwargs = {f"k{i:03d}": i for i in range(150)}  # > MLflow's 100 params per log_batch
    params, layout, metrics = fake_results(tmp_path, data={"kwargs": kwargs})
    run = MlflowClient(tracking_uri(params)).get_run(log_pipeline_run(params, layout, metrics).run_id)
    assert len(run.data.params) == len(params.flat()) > 150
    assert run.data.params["data.kwargs.k149"] == "149"


def test_preflight_on_a_dead_server_fails_fast_naming_the_uri_and_the_fix(tmp_path,
                                                                          monkeypatch):
    url = _dead_url()
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    start = time.monotonic()
    with pytest.raises(TrackingStoreError) as err:
        check_uri(url)
    assert time.monotonic() - start < 10  # no retries with back-off
    assert url in str(err.value) and "tracking.enabled: false" in str(err.value)
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ  # the short setting is undone
    with pytest.raises(TrackingStoreError, match="does not exist"):
        check_uri(f"sqlite:///{tmp_path / 'missing' / 'mlflow.db'}")


def test_dead_server_at_logging_time_records_locally_and_says_where(tmp_path, monkeypatch,
                                                                   fake_results, caplog):
    monkeypatch.chdir(tmp_path)
    url = _dead_url()
    params, layout, metrics = fake_results(tmp_path, tracking={"tracking_uri": url})
    with caplog.at_level(logging.WARNING, logger="tasks.tracking"):
        run_id = log_pipeline_run(params, layout, metrics).run_id
    local = local_tracking_uri()
    assert (tmp_path / "mlflow.db").is_file()
    run = MlflowClient(local).get_run(run_id)
    assert run.data.metrics["delta_top1"] == pytest.approx(5.0)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert url in warning and local in warning and run_id in warning


def test_stage_flows_check_the_store_before_any_work(tmp_path, monkeypatch, fake_results):
    monkeypatch.chdir(tmp_path)
    url = _dead_url()
    params, layout, _ = fake_results(tmp_path / "p", tracking={"tracking_uri": url})
    for flow in (pipeline_flow, adaround_flow):
        with pytest.raises(TrackingStoreError, match=url.replace(".", r"\.")):
            flow.fn(params)  # the flow body, without a Prefect run
    assert not layout.dataset.exists() and not (layout.layer_report.parent / "layers").exists()
    with pytest.raises(TrackingStoreError):
        check_tracking_store(params)


def test_cli_with_an_unreachable_store_fails_before_the_expensive_work(tmp_path,
                                                                       prefect_server,
                                                                       fake_results):
    url = _dead_url()
    fake_results(tmp_path, tracking={"tracking_uri": url})
    proc = run_cmd([sys.executable, "-m", "flows", "run"], tmp_path,
                   project_env(prefect_server), check=False)
    assert proc.returncode == 2, proc.stdout[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("error: MLflow tracking store") and url in last
    assert "tracking.enabled: false" in last
    assert not (tmp_path / "data" / "dataset" / "manifest.json").exists()  # nothing was computed


def test_threads_of_one_process_share_a_fresh_sqlite_store(tmp_path, monkeypatch,
                                                           fake_results):
    """A sweep's variants finish in threads of one process and record into one new store."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.chdir(tmp_path)
    runs = [fake_results(tmp_path / name) for name in ("a", "b", "c")]
    store = f"sqlite:///{tmp_path / 'shared.db'}"
    runs = [(p.model_copy(update={"tracking": p.tracking.model_copy(
        update={"tracking_uri": store})}), layout, metrics) for p, layout, metrics in runs]
    with ThreadPoolExecutor(3) as pool:
        ids = list(pool.map(lambda run: log_pipeline_run(*run).run_id, runs))
    parents = MlflowClient(store).search_runs(
        [MlflowClient(store).get_experiment_by_name("fake").experiment_id],
        f"tags.`{ROLE_TAG}` = '{PARENT_ROLE}'")
    assert sorted(run.info.run_id for run in parents) == sorted(ids)
    assert all(run.info.status == "FINISHED" for run in parents)
