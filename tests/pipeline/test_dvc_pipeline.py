"""The DVC pipeline in a temporary git repo with tiny params: what ``dvc repro`` reruns, what
``dvc exp`` and ``dvc plots`` show, and what MLflow holds afterwards (its default local store)."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import VENV_BIN, copy_project, project_env, run_cmd
from mlflow import MlflowClient

from flows.__main__ import cli
from tasks.tracking import PARENT_ROLE, ROLE_TAG

STAGES = ["data", "train", "calibrate", "adaround", "evaluate"]
TINY_STEPS, NEW_STEPS = 20, 30


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


def _store(project: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{project / 'mlflow.db'}")


def _parents(project: Path) -> list:
    client = _store(project)
    experiment = client.get_experiment_by_name("tiny")
    return client.search_runs([experiment.experiment_id], f"tags.`{ROLE_TAG}` = '{PARENT_ROLE}'",
                              order_by=["attributes.start_time DESC"])


def _lock_md5(project: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return next(o["md5"] for o in lock["stages"][stage]["outs"] if o["path"] == path)


def _metrics(project: Path) -> dict:
    return json.loads((project / "results" / "metrics.json").read_text())


@pytest.fixture(scope="module")
def experiment(dvc_project, tmp_path_factory, prefect_server):
    """A copy of the project after ``dvc exp run -S adaround.num_steps=NEW_STEPS``."""
    project = copy_project(dvc_project[0], tmp_path_factory.mktemp("exp") / "project")
    env = project_env(prefect_server)
    head = run_cmd(["git", "rev-parse", "HEAD"], project, env).stdout.strip()
    output = run_cmd([f"{VENV_BIN}/dvc", "exp", "run", "-S",
                      f"adaround.num_steps={NEW_STEPS}"], project, env, timeout=300).stdout
    return project, output, head, env


def test_first_repro_runs_every_stage_in_order(dvc_project):
    project, first = dvc_project
    assert _ran(first) == STAGES
    assert set(_metrics(project)) >= {"float", "baseline", "adaround", "delta_top1"}
    status = run_cmd([f"{VENV_BIN}/dvc", "status"], project, project_env()).stdout
    assert "up to date" in status


def test_second_repro_runs_no_stage_and_records_no_new_run(dvc_project, prefect_server):
    project, _ = dvc_project
    output = run_cmd([f"{VENV_BIN}/dvc", "repro"], project, project_env(prefect_server)).stdout
    assert _ran(output) == []
    assert all(f"Stage '{stage}' didn't change" in output for stage in STAGES)
    assert len(_parents(project)) == 1


def test_first_repro_recorded_one_parent_and_three_child_runs(dvc_project):
    project, _ = dvc_project
    (parent,) = _parents(project)
    client = _store(project)
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(run.info.run_name for run in children) == ["adaround", "baseline", "float"]
    metrics = _metrics(project)
    assert parent.data.metrics["delta_top1"] == pytest.approx(metrics["delta_top1"])
    assert parent.data.metrics["adaround_top1"] == pytest.approx(metrics["adaround"]["top1"])
    assert parent.data.params["adaround.num_steps"] == str(TINY_STEPS)
    assert parent.data.tags["dvc.train.checkpoints/float.safetensors"] == \
        _lock_md5(project, "train", "checkpoints/float.safetensors")
    adaround = next(run for run in children if run.info.run_name == "adaround")
    steps = [m.step for m in client.get_metric_history(adaround.info.run_id, "adaround_mse")]
    assert sorted(steps) == list(range(5))  # the tiny DigitsCNN's five layers


def test_changing_num_steps_reruns_only_adaround_and_evaluate(experiment):
    _, output, _, _ = experiment
    assert _ran(output) == ["adaround", "evaluate"]
    assert all(f"Stage '{stage}' didn't change" in output for stage in STAGES[:3])


def test_exp_show_lists_the_experiment_with_its_metrics(experiment):
    project, _, _, env = experiment
    shown = run_cmd([f"{VENV_BIN}/dvc", "exp", "show", "--csv", "--no-pager"], project,
                    env).stdout
    rows = list(csv.DictReader(io.StringIO(shown)))
    exp_rows = [row for row in rows if row["typ"] == "branch_base"]
    assert [row["adaround.num_steps"] for row in exp_rows] == [str(NEW_STEPS)]
    assert float(exp_rows[0]["delta_top1"]) == pytest.approx(_metrics(project)["delta_top1"])


def test_the_new_run_is_in_mlflow_and_compare_shows_both(experiment, dvc_project, monkeypatch,
                                                        capsys):
    project, _, head, _ = experiment
    newest, oldest = _parents(project)
    assert newest.data.params["adaround.num_steps"] == str(NEW_STEPS)
    assert newest.data.tags["git.commit"] == head
    assert newest.data.tags["dvc.adaround.checkpoints/adaround.safetensors"] == \
        _lock_md5(project, "adaround", "checkpoints/adaround.safetensors")
    monkeypatch.chdir(project)  # the CLI in-process: its default store is ./mlflow.db
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli(["compare", "--last", "2"]) == 0
    header, *rows = capsys.readouterr().out.splitlines()[1:]
    assert header.split()[3] == "adaround.num_steps" and "quant.weight_bits" not in header
    deltas = [_metrics(project)["delta_top1"], _metrics(dvc_project[0])["delta_top1"]]
    for row, steps, delta in zip(rows, (NEW_STEPS, TINY_STEPS), deltas, strict=True):
        cells = row.split()  # run, id, date, time, num_steps, baseline, AdaRound, delta
        assert cells[4] == str(steps) and cells[-1] == f"{delta:+.2f}"


def test_plots_show_renders_the_per_layer_errors(dvc_project, tmp_path):
    project, _ = dvc_project
    run_cmd([f"{VENV_BIN}/dvc", "plots", "show", "-o", str(tmp_path / "plots")], project,
            project_env())
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "nearest_mse" in html and "adaround_mse" in html
