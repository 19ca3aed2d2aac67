"""``python -m flows compare``: the last pipeline runs, read back from MLflow alone."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import project_env, run_cmd, write_params

from flows.__main__ import cli
from flows.compare import compare_runs
from tasks.tracking import log_pipeline_run


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, fake_results):
    """Two recorded pipeline runs in one store: 20 steps (+5.00), then 40 steps (-1.25)."""
    root = tmp_path_factory.mktemp("two-runs")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        log_pipeline_run(*fake_results(root, top1=(90.0, 80.0, 85.0),
                                       adaround={"num_steps": 20}))
        params, layout, metrics = fake_results(root, top1=(90.0, 81.0, 79.75),
                                               adaround={"num_steps": 40})
        log_pipeline_run(params, layout, metrics)
    return params, root


def _lines(table: str) -> list[list[str]]:
    return [line.split() for line in table.splitlines()[1:]]  # after the title


def test_compare_shows_the_differing_key_and_both_deltas_newest_first(two_runs):
    header, newest, oldest = _lines(compare_runs(two_runs[0], last=5))
    assert header[3:] == ["variant", "adaround.num_steps", "baseline", "%", "AdaRound", "%",
                          "delta"]
    assert newest[4] == oldest[4] == "layer"  # plain AdaRound in both (after date, time)
    assert newest[-4:] == ["40", "81.00", "79.75", "-1.25"]
    assert oldest[-4:] == ["20", "80.00", "85.00", "+5.00"]
    assert "quant.weight_bits" not in " ".join(header)  # equal in both runs: not shown


def test_compare_shows_the_metrics_the_runs_logged_under_their_names(tmp_path, fake_results,
                                                                     monkeypatch):
    """A model scored by its own metrics (MiniLM: cosine, retrieval) gets their columns."""
    monkeypatch.chdir(tmp_path)
    scores = {"float": {"cosine": 1.0, "retrieval": 1.0},
              "baseline": {"cosine": 0.9182, "retrieval": 0.684},
              "adaround": {"cosine": 0.953, "retrieval": 0.7661}}
    params, layout, metrics = fake_results(tmp_path, scores=scores)
    log_pipeline_run(params, layout, metrics)
    header, row = _lines(compare_runs(params, last=5))[:2]  # then the champion line
    assert " ".join(header[4:]) == ("baseline cosine AdaRound cosine delta cosine baseline "
                                    "retrieval AdaRound retrieval delta retrieval")
    assert row[-6:] == ["0.9182", "0.9530", "+0.0348", "0.6840", "0.7661", "+0.0821"]


def test_compare_last_n_limits_the_runs(two_runs):
    table = compare_runs(two_runs[0], last=1)
    assert "-1.25" in table and "+5.00" not in table
    assert "adaround.num_steps" not in table  # one run: nothing differs
    assert "no config key differs" in table


def test_compare_cli_reads_mlflow_only(two_runs, tmp_path):
    # a directory with the params (naming the store) and no result file: MLflow has it all
    shutil.copy(two_runs[1] / "params.yaml", tmp_path / "params.yaml")
    proc = run_cmd([sys.executable, "-m", "flows", "compare", "--last", "2"], tmp_path,
                   project_env(), timeout=120)
    assert "adaround.num_steps" in proc.stdout
    assert "+5.00" in proc.stdout and "-1.25" in proc.stdout


def test_compare_without_runs_says_what_to_do(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, {"tracking": {"tracking_uri": f"sqlite:///{tmp_path}/none.db"}})
    assert cli(["compare"]) == 2  # the CLI in-process
    error = capsys.readouterr().err
    assert "no MLflow store" in error and "tracking.enabled: true" in error
    assert not (tmp_path / "none.db").exists()  # looking did not create an empty store


def test_compare_of_an_experiment_without_runs_says_what_to_do(two_runs):
    params = two_runs[0]
    other = params.model_copy(update={"tracking": params.tracking.model_copy(
        update={"experiment": "never-run"})})
    with pytest.raises(LookupError, match="no pipeline runs in MLflow experiment 'never-run'"):
        compare_runs(other)


def test_compare_and_mlflow_tell_the_adaround_variants_apart(tmp_path, fake_results):
    from mlflow import MlflowClient

    from tasks.io import read_json, write_json
    from tasks.tracking import tracking_uri

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        log_pipeline_run(*fake_results(tmp_path, adaround={"guard": "off"}))
        params, layout, metrics = fake_results(tmp_path, adaround={
            "granularity": "block", "drop_prob": 0.5, "activation_lr": 0.001})
        rows = read_json(layout.layer_report)
        rows[0]["layers"] = ["conv1", "fc1"]  # a block unit's row
        write_json(layout.layer_report, rows)
        recorded = log_pipeline_run(params, layout, metrics)
    table = compare_runs(params, last=2).splitlines()
    assert " block qdrop=0.5 lsq=0.001 " in table[2]  # newest first
    assert " layer guard=off " in table[3]
    client = MlflowClient(tracking_uri(params))
    logged = client.get_run(recorded.run_id).data.params
    assert (logged["adaround.granularity"], logged["adaround.drop_prob"],
            logged["adaround.activation_lr"]) == ("block", "0.5", "0.001")
    child = client.search_runs([client.get_run(recorded.run_id).info.experiment_id],
                               f"tags.mlflow.parentRunId = '{recorded.run_id}' and "
                               f"tags.`pipeline.role` = 'adaround'")[0].info.run_id
    unit_table = json.loads(Path(client.download_artifacts(child, "layer_errors.json",
                                                           str(tmp_path))).read_text())
    layers = unit_table["columns"].index("layers")
    assert [row[layers] for row in unit_table["data"]] == ["conv1,fc1", "", ""]
