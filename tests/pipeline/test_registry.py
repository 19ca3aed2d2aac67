"""The MLflow Model Registry: two real pipeline runs against one SQLite store, the
promotion rule, and names MLflow rejects."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest
from conftest import project_env, run_cmd, write_params
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion, ModelVersionTag
from mlflow.exceptions import MlflowException

from tasks.params import PipelineParams, PreflightError
from tasks.registry import (
    CANDIDATE,
    CHAMPION,
    DECISION_TAG,
    METRIC_TAG,
    REASON_TAG,
    SCORE_TAG,
    decide,
    set_alias,
)
from tasks.tracking import log_pipeline_run

MODEL = "tiny-digits"


def _flows(root, *args: str, check: bool = True):
    return run_cmd([sys.executable, "-m", "flows", *args], root, project_env(),
                   timeout=600, check=check)


@pytest.fixture(scope="module")
def two_pipeline_runs(tmp_path_factory):
    """Run 1: W2, 100 steps. Run 2: a single step, a model worse than run 1's."""
    root = tmp_path_factory.mktemp("registry")
    (root / "store").mkdir()
    uri = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    write_params(root, {"tracking": {"enabled": True, "experiment": "registry",
                                     "tracking_uri": uri, "registered_model": MODEL},
                        "quant": {"weight_bits": 2}, "adaround": {"num_steps": 100}})
    first = _flows(root, "run")
    first_metrics = json.loads((root / "results" / "metrics.json").read_text())
    second = _flows(root, "run", "-S", "adaround.num_steps=1")
    second_metrics = json.loads((root / "results" / "metrics.json").read_text())
    return root, MlflowClient(uri), (first, first_metrics), (second, second_metrics)


def test_the_first_run_registers_the_champion(two_pipeline_runs):
    root, client, (first, metrics), _ = two_pipeline_runs
    assert metrics["adaround"]["top1"] > metrics["baseline"]["top1"]  # the rule's premise
    version = client.get_model_version(MODEL, "1")
    assert version.tags[DECISION_TAG] == CHAMPION
    assert version.tags[METRIC_TAG] == "top1"
    assert float(version.tags[SCORE_TAG]) == pytest.approx(metrics["onnx"]["top1"])
    assert float(version.tags["metric.baseline.top1"]) == pytest.approx(
        metrics["baseline"]["top1"], abs=1e-3)
    assert re.fullmatch(r"[0-9a-f]{40}|unknown.*", version.tags["git.commit"])
    assert len(version.tags["params.digest"]) == 64
    assert f"registry: {MODEL} version 1 is candidate and champion" in first.stdout


def test_a_worse_second_run_is_candidate_but_not_champion(two_pipeline_runs):
    _, client, (_, best), (second, metrics) = two_pipeline_runs
    assert metrics["onnx"]["top1"] < best["onnx"]["top1"]  # run 2 is the worse model
    assert str(client.get_model_version_by_alias(MODEL, CANDIDATE).version) == "2"
    assert str(client.get_model_version_by_alias(MODEL, CHAMPION).version) == "1"
    version = client.get_model_version(MODEL, "2")
    assert version.tags[DECISION_TAG] == "kept"
    assert version.tags[REASON_TAG] in second.stdout
    assert f"registry: {MODEL} version 2 is candidate (" in second.stdout


def test_the_champion_loads_without_pickle_and_matches_onnx_runtime(two_pipeline_runs,
                                                                   monkeypatch):
    import mlflow.pyfunc
    import onnxruntime as ort

    from tasks.io import load_tensors

    root, client, _, _ = two_pipeline_runs
    source = client.get_model_version_by_alias(MODEL, CHAMPION).source
    run_id = source.split("/")[1]
    files = [a.path for a in client.list_artifacts(run_id, "model")]
    assert "model/model.onnx" in files and "model/model.encodings" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@{CHAMPION}")
    assert model.metadata.signature is not None
    feed = {k: v.numpy() for k, v in
            load_tensors(root / "checkpoints" / "export" / "example_inputs.safetensors").items()}
    # the champion is run 1's model; the files on disk are run 2's: compare to the artifact
    local = mlflow.artifacts.download_artifacts(source, tracking_uri=client.tracking_uri)
    expected = ort.InferenceSession(f"{local}/model.onnx",
                                    providers=["CPUExecutionProvider"]).run(None, feed)
    got = model.predict(feed)
    np.testing.assert_allclose(next(iter(got.values())), expected[0], rtol=0, atol=0)


def test_compare_shows_the_champion(two_pipeline_runs):
    root, *_ = two_pipeline_runs
    out = _flows(root, "compare", "--last", "2").stdout
    assert re.search(rf"champion of '{MODEL}': version 1 from run [0-9a-f]{{8}}, top1", out)
    assert "v1 champion" in out and "v2" in out


def _version(**tags: str) -> ModelVersion:
    return ModelVersion(MODEL, "3", 0, tags=[ModelVersionTag(k, v) for k, v in tags.items()])


SCORES = {"float": {"top1": 99.0}, "baseline": {"top1": 90.0}, "adaround": {"top1": 95.0},
          "onnx": {"top1": 94.0}}


@pytest.mark.parametrize(("champion_score", "tolerance", "higher", "promoted"), [
    (None, 0.0, True, True),      # no champion yet
    (94.0, 0.0, True, True),      # equal
    (94.5, 0.0, True, False),     # a little worse
    (94.5, 0.5, True, True),      # ... within the tolerance
    (95.0, 0.5, True, False),     # ... beyond it
])
def test_promotion_rule_higher_is_better(champion_score, tolerance, higher, promoted):
    champion = None if champion_score is None else _version(
        **{METRIC_TAG: "top1", SCORE_TAG: repr(champion_score)})
    decision = decide("top1", SCORES, champion, tolerance, higher)
    assert decision.promote is promoted
    assert "94" in decision.reason  # the deployed (ONNX) score is the one compared


def test_promotion_rule_lower_is_better_and_other_metrics():
    loss = {"baseline": {"loss": 0.5}, "adaround": {"loss": 0.3}}
    champion = _version(**{METRIC_TAG: "loss", SCORE_TAG: "0.25"})
    assert not decide("loss", loss, champion, 0.0, False).promote
    assert decide("loss", loss, champion, 0.1, False).promote
    other = _version(**{METRIC_TAG: "top1", SCORE_TAG: "99"})
    assert "not 'loss'" in decide("loss", loss, other, 0.0, False).reason


def test_adaround_that_does_not_beat_the_baseline_is_never_champion():
    tied = {"baseline": {"top1": 95.0}, "adaround": {"top1": 95.0}}
    decision = decide("top1", tied, None, 10.0, True)
    assert not decision.promote and "does not beat the baseline" in decision.reason


def test_an_unknown_promote_metric_fails_before_anything_is_recorded(tmp_path, monkeypatch,
                                                                      fake_results):
    monkeypatch.chdir(tmp_path)
    params, layout, metrics = fake_results(
        tmp_path, tracking={"registered_model": MODEL, "promote_metric": "cosine"})
    with pytest.raises(PreflightError, match=r"tracking.promote_metric 'cosine'.*top1"):
        log_pipeline_run(params, layout, metrics)
    client = MlflowClient(params.tracking.tracking_uri)
    assert client.search_experiments(filter_string="name = 'fake'") == []


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> MlflowClient:
    """One empty MLflow store for the name tests (a new SQLite store takes seconds)."""
    return MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('names') / 'mlflow.db'}")


@pytest.mark.parametrize("name", ["a/b", "team:model", "..", "."])
def test_names_mlflow_rejects_are_refused(store, name):
    with pytest.raises(MlflowException):  # keeps our rule honest against MLflow's own
        store.create_registered_model(name)
    with pytest.raises(ValueError, match="MLflow rejects"):
        PipelineParams.model_validate({"tracking": {"registered_model": name}})


def test_check_refuses_a_registry_name_in_one_line(tmp_path):
    write_params(tmp_path)
    proc = run_cmd([sys.executable, "-m", "flows", "check", "-S",
                    "tracking.registered_model=team/model"], tmp_path, project_env(),
                   check=False)
    assert proc.returncode == 2
    (line,) = proc.stdout.strip().splitlines()
    assert line.startswith("error: ") and "tracking.registered_model" in line


@pytest.mark.parametrize("name", ["digits w2a8", "ResNet-18_v2.onnx"])
def test_names_mlflow_takes_are_accepted(store, name):
    store.create_registered_model(name)
    assert PipelineParams.model_validate(
        {"tracking": {"registered_model": name}}).tracking.registered_model == name


def _registered_version(store: MlflowClient, tmp_path, name: str) -> str:
    store.create_registered_model(name)
    (tmp_path / "model").mkdir()
    return store.create_model_version(name, str(tmp_path / "model")).version


def test_an_alias_another_run_inserted_meanwhile_is_set_again(store, tmp_path, monkeypatch):
    """Two runs registering at once: MLflow's SQL store finds no alias, the other run
    inserts it, this insert fails on the unique key (as PostgreSQL words it); it is tried
    again and the alias ends on this version."""
    version = _registered_version(store, tmp_path, "alias-race")
    real, calls = store.set_registered_model_alias, []

    def raced(name, alias, v):
        calls.append(alias)
        if len(calls) == 1:
            raise MlflowException('BAD_REQUEST: (psycopg2.errors.UniqueViolation) duplicate key '
                                  'value violates unique constraint "registered_model_alias_pk"')
        return real(name, alias, v)

    monkeypatch.setattr(store, "set_registered_model_alias", raced)
    set_alias(store, "alias-race", CANDIDATE, version)
    assert calls == [CANDIDATE, CANDIDATE]
    assert store.get_model_version_by_alias("alias-race", CANDIDATE).version == version


def test_other_alias_errors_are_raised_at_once(store, monkeypatch):
    calls = []

    def fails(name, alias, v):
        calls.append(alias)
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: Registered Model with name=x not found")

    monkeypatch.setattr(store, "set_registered_model_alias", fails)
    with pytest.raises(MlflowException, match="not found"):
        set_alias(store, "x", CHAMPION, "1")
    assert calls == [CHAMPION]
