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
from conftest import REPO, VENV_BIN, copy_project, project_env, run_cmd
from mlflow import MlflowClient

from flows.__main__ import cli
from tasks.tracking import PARENT_ROLE, ROLE_TAG

STAGES = ["check", "data", "train", "calibrate", "adaround", "export", "evaluate"]
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
    assert _ran(output) == ["check", "adaround", "export", "evaluate"]
    assert all(f"Stage '{stage}' didn't change" in output for stage in STAGES[1:4])


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
    assert header.split()[3:5] == ["variant", "adaround.num_steps"]
    assert "quant.weight_bits" not in header
    deltas = [_metrics(project)["delta_top1"], _metrics(dvc_project[0])["delta_top1"]]
    for row, steps, delta in zip(rows, (NEW_STEPS, TINY_STEPS), deltas, strict=True):
        cells = row.split()  # run, id, date, time, variant, num_steps, baseline, AdaRound, delta
        assert cells[4:6] == ["layer", str(steps)] and cells[-1] == f"{delta:+.2f}"


def test_plots_show_renders_the_per_layer_errors(dvc_project, tmp_path):
    project, _ = dvc_project
    run_cmd([f"{VENV_BIN}/dvc", "plots", "show", "-o", str(tmp_path / "plots")], project,
            project_env())
    html = (tmp_path / "plots" / "index.html").read_text()
    assert "nearest_mse" in html and "adaround_mse" in html


KEPT = ("checkpoints/float.safetensors", "checkpoints/calibrated.safetensors",
        "checkpoints/adaround.safetensors", "results/adaround_report.json",
        "results/layer_errors.csv", "results/metrics.json")


def _outputs(project: Path) -> dict[str, bytes]:
    return {path: (project / path).read_bytes() for path in KEPT}


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error: ")]


@pytest.mark.parametrize("how", ["exp run -S", "params.yaml"])
@pytest.mark.parametrize(("key", "value", "message"), [
    ("adaround.num_steps", "abc", "params.yaml: adaround.num_steps: "),
    ("quant.weight_bits", "9", "params.yaml: quant.weight_bits: "),
])
def test_a_bad_setting_under_dvc_keeps_every_earlier_output(dvc_project, tmp_path, how, key,
                                                            value, message):
    project = copy_project(dvc_project[0], tmp_path / "project")
    before, env = _outputs(project), project_env()
    if how == "params.yaml":
        section, name = key.split(".")
        params = yaml.safe_load((project / "params.yaml").read_text())
        params[section][name] = yaml.safe_load(value)
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        cmd = [f"{VENV_BIN}/dvc", "repro"]
    else:
        cmd = [f"{VENV_BIN}/dvc", "exp", "run", "-S", f"{key}={value}"]
    proc = run_cmd(cmd, project, env, check=False, timeout=300)
    assert proc.returncode != 0
    (line,) = _error_lines(proc.stdout)
    assert message in line and "checked before any stage ran: no output was touched" in line
    assert _ran(proc.stdout) == ["check"]
    assert _outputs(project) == before


def test_a_stage_failing_under_dvc_says_how_to_restore_its_outputs(dvc_project, tmp_path):
    project = copy_project(dvc_project[0], tmp_path / "project")
    before, env = _outputs(project), project_env()
    proc = run_cmd([f"{VENV_BIN}/dvc", "exp", "run", "-S", "adaround.exclude_prefix=[conv,fc,head]"],
                   project, env, check=False, timeout=300)
    assert proc.returncode != 0 and _ran(proc.stdout) == ["check", "adaround"]
    (line,) = _error_lines(proc.stdout)
    assert "no Conv/Linear layer left after exclude_prefix" in line
    assert "`dvc checkout adaround` brings back the previous ones" in line
    assert not (project / "checkpoints" / "adaround.safetensors").exists()  # DVC removed it
    run_cmd(["git", "checkout", "--", "params.yaml", "results"], project, env)  # git's files
    run_cmd([f"{VENV_BIN}/dvc", "checkout", "adaround"], project, env)  # DVC's
    assert _outputs(project) == before


def test_the_committed_dvc_lock_matches_the_committed_code(tmp_path):
    """In a clone of the last commit, no code or params dependency of the root pipeline
    differs from dvc.lock (outputs are absent there: DVC data is not in git; the examples'
    pipelines, ``examples/*/dvc.yaml``, have no committed lock: theirs is the user's run)."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    env = project_env()
    run_cmd(["git", "clone", "-q", str(REPO), str(clone)], tmp_path, env)
    tracked = set(run_cmd(["git", "ls-files"], clone, env).stdout.split())
    status = json.loads(run_cmd([f"{VENV_BIN}/dvc", "status", "--json"], clone, env).stdout)
    stale = sorted(f"{stage}: {path} {state}" for stage, entries in status.items()
                   if "dvc.yaml:" not in stage  # the root's stages are bare names
                   for entry in entries if isinstance(entry, dict)
                   for path, state in entry.get("changed deps", {}).items()
                   if path in tracked)
    assert not stale, f"dvc.lock does not match the code: run `make demo`, commit dvc.lock: {stale}"
