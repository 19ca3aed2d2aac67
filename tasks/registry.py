"""The MLflow Model Registry: the exported ONNX model as a new version of
``tracking.registered_model``, and the rule that moves its ``champion`` alias.

Every new version gets the alias ``candidate``. ``champion`` moves to it only when AdaRound
beats the baseline on this run and its score is at least the champion's minus
``tracking.promote_tolerance`` (at most plus it, for a lower-is-better metric). The score is
``tracking.promote_metric`` of the deployed model: ONNX Runtime's, else PyTorch's AdaRound.
The decision and its reason are tags of the version. The registered model is MLflow's ONNX
flavour (signature and input example included), so loading it needs no pickle.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from tasks.io import load_tensors
from tasks.layout import Layout
from tasks.params import PipelineParams, PreflightError

CANDIDATE, CHAMPION = "candidate", "champion"
MODEL_DIR = "model"  # artifact path of the registered model in the AdaRound run
SCORE_TAG, METRIC_TAG = "promotion.score", "promotion.metric"
DECISION_TAG, REASON_TAG = "promotion.decision", "promotion.reason"
PARENT_TAG = "pipeline.parent_run"
SCORED_ROLES = ("float", "baseline", "adaround", "onnx")
# what MLflow answers for a model or alias that does not exist (not for a failed request)
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


@dataclass(frozen=True)
class Promotion:
    """Whether the new version becomes the champion, and why, in one sentence."""

    promote: bool
    reason: str


@dataclass(frozen=True)
class Registered:
    """The version a run registered and what happened to the champion alias."""

    name: str
    version: str
    promotion: Promotion

    def line(self) -> str:
        """One line for the run's output."""
        alias = f"{CANDIDATE} and {CHAMPION}" if self.promotion.promote else CANDIDATE
        return (f"registry: {self.name} version {self.version} is {alias} "
                f"({self.promotion.reason})")


def promote_metric(params: PipelineParams, metrics: dict) -> str:
    """``tracking.promote_metric``, else the first number the metric returned."""
    names = list(metrics["adaround"])
    chosen = params.tracking.promote_metric or names[0]
    if chosen not in names:
        raise PreflightError(f"tracking.promote_metric {chosen!r} is not a number eval.metric "
                             f"returns ({', '.join(names)}); set it to one of them")
    return chosen


def deployed_score(metrics: dict, metric: str) -> float:
    """The metric of the model that ships: ONNX Runtime's when it was scored."""
    return float(metrics.get("onnx", {}).get(metric, metrics["adaround"][metric]))


def _better(a: float, b: float, higher_is_better: bool) -> bool:
    return a > b if higher_is_better else a < b


def decide(metric: str, metrics: dict, champion: ModelVersion | None, tolerance: float,
           higher_is_better: bool) -> Promotion:
    """The promotion rule (see the module's docstring)."""
    adaround, baseline = metrics["adaround"][metric], metrics["baseline"][metric]
    if not _better(adaround, baseline, higher_is_better):
        return Promotion(False, f"AdaRound {metric} {adaround:.4g} does not beat the "
                                f"baseline's {baseline:.4g} on this run")
    score = deployed_score(metrics, metric)
    if champion is None:
        return Promotion(True, f"the first champion; {metric} {score:.4g}")
    if champion.tags.get(METRIC_TAG) != metric or SCORE_TAG not in champion.tags:
        return Promotion(False, f"champion version {champion.version} is scored by "
                                f"{champion.tags.get(METRIC_TAG)!r}, not {metric!r}; move "
                                f"the alias by hand if this one is better")
    best = float(champion.tags[SCORE_TAG])
    ok = score >= best - tolerance if higher_is_better else score <= best + tolerance
    op = (">=" if higher_is_better else "<=") if ok else ("<" if higher_is_better else ">")
    bound = f"{best:.4g} {'-' if higher_is_better else '+'} tolerance {tolerance:g}"
    return Promotion(ok, f"{metric} {score:.4g} {op} champion version {champion.version}'s "
                         f"{bound}")


def current_champion(client: MlflowClient, name: str) -> ModelVersion | None:
    """The version holding the ``champion`` alias, or None; a store that fails (a server
    gone) raises instead of reading as "no champion yet"."""
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        if err.error_code in _NOT_FOUND:
            return None
        raise


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    """Create the registered model unless it exists (another run may create it meanwhile)."""
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _save_onnx_flavor(layout: Layout, target: Path) -> None:
    """MLflow's ONNX flavour of the exported model, with its signature and input example,
    plus the encodings and integer weights beside it."""
    import mlflow.onnx
    import onnx
    import onnxruntime as ort
    from mlflow.models import infer_signature

    feed = {k: v.numpy() for k, v in load_tensors(layout.example_inputs).items()}
    session = ort.InferenceSession(str(layout.onnx_model), providers=["CPUExecutionProvider"])
    outputs = dict(zip((o.name for o in session.get_outputs()), session.run(None, feed),
                       strict=True))
    mlflow.onnx.save_model(onnx.load(str(layout.onnx_model)), str(target),
                           signature=infer_signature(feed, outputs), input_example=feed,
                           onnx_execution_providers=["CPUExecutionProvider"])
    for extra in (layout.encodings, layout.integer_weights):
        shutil.copy2(extra, target / extra.name)


def version_tags(params: PipelineParams, metrics: dict, provenance: dict[str, str],
                 parent_run: str) -> dict[str, str]:
    """Provenance, params digest and every role's metrics, as version tags."""
    scores = {f"metric.{role}.{name}": f"{value:.6g}"
              for role in SCORED_ROLES for name, value in metrics.get(role, {}).items()}
    return {**provenance, **scores, "params.digest": params.digest(), PARENT_TAG: parent_run}


def register_model(client: MlflowClient, params: PipelineParams, layout: Layout,
                   metrics: dict, run_id: str, tags: dict[str, str]) -> Registered:
    """Log the exported model to ``run_id``, register it, tag it, set the aliases."""
    name, tracking = params.tracking.registered_model, params.tracking
    metric = promote_metric(params, metrics)
    with tempfile.TemporaryDirectory() as tmp:
        _save_onnx_flavor(layout, Path(tmp) / MODEL_DIR)
        client.log_artifacts(run_id, str(Path(tmp) / MODEL_DIR), MODEL_DIR)
    ensure_registered_model(client, name)
    champion = current_champion(client, name)
    promotion = decide(metric, metrics, champion, tracking.promote_tolerance,
                       tracking.higher_is_better)
    decision = {METRIC_TAG: metric, SCORE_TAG: repr(deployed_score(metrics, metric)),
                DECISION_TAG: CHAMPION if promotion.promote else "kept",
                REASON_TAG: promotion.reason}
    version = client.create_model_version(name, f"runs:/{run_id}/{MODEL_DIR}", run_id=run_id,
                                          tags={**tags, **decision}).version
    set_alias(client, name, CANDIDATE, version)
    if promotion.promote:
        set_alias(client, name, CHAMPION, version)
    return Registered(name, str(version), promotion)


# What a store answers when another run created the same alias between MLflow's check for
# the alias and its insert (PostgreSQL, MySQL, SQLite wordings): the alias exists now, so
# setting it again moves it.
_CONCURRENT_INSERT = ("duplicate key value", "UniqueViolation", "Duplicate entry",
                      "UNIQUE constraint failed")
ALIAS_ATTEMPTS = 5


def set_alias(client: MlflowClient, name: str, alias: str, version: str) -> None:
    """Point ``alias`` of model ``name`` at ``version``. MLflow's SQL store looks the alias
    up, then inserts it: two runs registering at once can both find none and the second
    insert fails; that one is tried again (the last failure is raised)."""
    for attempt in range(ALIAS_ATTEMPTS):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except MlflowException as err:
            if attempt + 1 == ALIAS_ATTEMPTS or \
                    not any(text in str(err) for text in _CONCURRENT_INSERT):
                raise
