"""MLflow tracking of a pipeline run.

One parent run per pipeline run, child runs ``float`` / ``baseline`` / ``adaround``, all
addressed by id through an :class:`MlflowClient`: no fluent "active run", which a task
submitted to another thread would not see. The store is ``tracking.tracking_uri`` if set,
else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``, and it is always passed
explicitly (MLflow otherwise switches silently to an old ``./mlruns`` directory).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from tasks.failures import is_user_error, pipeline_task
from tasks.io import read_json
from tasks.layout import Layout
from tasks.metrics import by_run_role
from tasks.params import PipelineParams, PreflightError
from tasks.plots import layer_error_figure
from tasks.provenance import provenance_tags
from tasks.registry import (
    DECISION_TAG,
    REASON_TAG,
    Registered,
    promote_metric,
    register_model,
    version_tags,
)

logger = logging.getLogger(__name__)

LOCAL_STORE = "mlflow.db"
ROLE_TAG = "pipeline.role"  # "pipeline" on the parent run; the child runs carry their role
PARENT_ROLE = "pipeline"
CHECKPOINTS = {"float": "float_checkpoint", "baseline": "calibrated_checkpoint",
               "adaround": "adaround_checkpoint"}  # child role -> Layout attribute
LAYER_COLUMNS = ("index", "layer", "layers", "nearest_mse", "adaround_mse",
                 "nearest_output_mse", "adaround_output_mse", "decision", "seconds")
LAYER_METRICS = ("nearest_mse", "adaround_mse", "nearest_output_mse", "adaround_output_mse")
# no retries (nothing listening fails at once), but time for a busy server to answer
_FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
# While recording: a few quick retries (a busy server, a restart), then the local store;
# MLflow's defaults (7 retries, back-off 2) wait ~4 minutes per call on a dead server.
# Values the user set in the environment win.
_RECORDING_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
                      "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                      "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
_DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")  # MLflow's SQLAlchemy stores besides SQLite
_BATCH = 100  # MLflow's log_batch takes at most 100 params and 100 tags per call
_CONNECTION_ERRORS = {"NewConnectionError": "nothing answers there (connection refused)",
                      "NameResolutionError": "its host name does not resolve",
                      "ConnectTimeout": "its host does not answer (connect timeout)",
                      "ReadTimeout": "it did not answer in time (read timeout)"}


class TrackingStoreError(PreflightError):
    """The MLflow store cannot be used; the message names it and how to fix it."""

    def __init__(self, uri: str, reason: str) -> None:
        super().__init__(_advice(uri, reason))
        self.uri, self.reason = uri, reason


def local_tracking_uri() -> str:
    """The default store: ``mlflow.db`` in the current directory, as an absolute path."""
    return f"sqlite:///{Path.cwd().resolve() / LOCAL_STORE}"


def tracking_uri(params: PipelineParams) -> str:
    """``tracking.tracking_uri`` if set, else ``$MLFLOW_TRACKING_URI``, else the local store."""
    return (params.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            or local_tracking_uri())


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (absolute), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):].split("?")[0]).resolve()


def _same_store(a: str, b: str) -> bool:
    return a == b or (sqlite_path(a) is not None and sqlite_path(a) == sqlite_path(b))


def _short(err: BaseException, limit: int = 200) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    for marker, reason in _CONNECTION_ERRORS.items():  # urllib3's text hides the cause
        if marker in text:
            return reason
    text = text.split("Caused by ", 1)[-1].split(" (Background on this error", 1)[0]
    return text if len(text) <= limit else text[:limit] + "..."


def _advice(uri: str, reason: str) -> str:
    fix = "Create that directory" if sqlite_path(uri) else "Start that server"
    return (f"MLflow tracking store {uri} cannot be used: {reason}. {fix}, or point "
            f"tracking.tracking_uri in params.yaml (or $MLFLOW_TRACKING_URI) at a reachable "
            f"store (leave both unset for the local {local_tracking_uri()}), or set "
            f"tracking.enabled: false to run without tracking.")


def _view_hint(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"a browser at {uri}"
    return f"`mlflow ui --backend-store-uri {uri}`"


@contextlib.contextmanager
def _fail_fast() -> Iterator[None]:
    """No retries and a short timeout for MLflow's HTTP requests while the context lasts."""
    saved = {key: os.environ.get(key) for key in _FAIL_FAST}
    os.environ.update(_FAIL_FAST)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _probe_database(uri: str) -> None:
    """Connect once to a database store (MLflow itself retries for minutes)."""
    scheme = uri.split(":", 1)[0]
    if scheme.split("+")[0] not in _DATABASE_SCHEMES:
        return
    import sqlalchemy

    if scheme == "postgresql":  # SQLAlchemy 2.1's default driver is psycopg 3
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise ModuleNotFoundError("postgresql:// means the psycopg (3) driver, which is "
                                      "not installed; write postgresql+psycopg2://") from None
    timeout = {"connect_timeout": 10} if scheme.startswith(("postgresql", "mysql")) else {}
    engine = sqlalchemy.create_engine(uri, connect_args=timeout)
    try:
        with engine.connect():
            pass
    finally:
        engine.dispose()


def check_uri(uri: str) -> str:
    """The store at ``uri`` answers within seconds (no retries); raise ``TrackingStoreError``."""
    db = sqlite_path(uri)
    if db is not None and not db.parent.is_dir():
        raise TrackingStoreError(uri, f"directory {db.parent} does not exist")
    try:
        _probe_database(uri)
        with _fail_fast():
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as err:  # MLflow, connection and database errors alike
        raise TrackingStoreError(uri, _short(err)) from None
    return uri


def check_tracking_store(params: PipelineParams) -> str:
    """Preflight of the pipeline: the store of ``params`` answers; return its URI."""
    return check_uri(tracking_uri(params))


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        db = sqlite_path(uri)  # a local store keeps its artifacts beside the database
        root = (db.parent / "mlartifacts").as_uri() if db else None
        try:
            return client.create_experiment(name, artifact_location=root)
        except MlflowException:  # another process created it meanwhile
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def _param_value(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _log(client: MlflowClient, run_id: str, metrics: Sequence[Metric] = (),
         params: dict | None = None, tags: dict | None = None) -> None:
    """``log_batch`` in chunks within MLflow's per-call limits."""
    metrics = list(metrics)
    params = [Param(k, _param_value(v)) for k, v in (params or {}).items()]
    tags = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
    for start in range(0, max(len(metrics), len(params), len(tags)), _BATCH):
        chunk = slice(start, start + _BATCH)
        client.log_batch(run_id, metrics=metrics[chunk], params=params[chunk], tags=tags[chunk])


def _metrics(values: dict[str, float]) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, 0) for key, value in values.items()]


def top1_metrics(metrics: dict) -> dict[str, dict[str, float]]:
    """The metrics file's numbers, by run role, under the metric's own names (the digits
    default: ``top1``)."""
    return by_run_role(metrics, PARENT_ROLE)


@contextlib.contextmanager
def _run(client: MlflowClient, experiment_id: str, role: str, tags: dict[str, str],
         parent_id: str | None = None, created: list[str] | None = None) -> Iterator[str]:
    """A run that ends FINISHED, or FAILED when the block raises (its id appended to
    ``created``)."""
    tags = {**tags, ROLE_TAG: role}
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    run_id = client.create_run(experiment_id, tags=tags,
                               run_name=role if parent_id else None).info.run_id
    if created is not None:
        created.append(run_id)
    try:
        yield run_id
    except BaseException:
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def _log_artifact(client: MlflowClient, run_id: str, path: Path, artifact_path: str) -> None:
    if Path(path).is_file():
        client.log_artifact(run_id, str(path), artifact_path=artifact_path)
    else:
        logger.warning("%s does not exist: not logged to MLflow", path)


def _cell(row: dict, column: str) -> object:
    """A report row's value in the layer table (a block's ``layers`` as one string: the
    rounded layers, comma-separated; empty for a single layer)."""
    if column == "layers":
        return ",".join(row.get("layers") or ())
    return row.get(column)


def _log_layers(client: MlflowClient, run_id: str, layout: Layout) -> None:
    """Per-unit errors as stepped metrics (step = unit index), a table (a block's row
    names its layers) and a plot."""
    if not layout.layer_report.is_file():
        logger.warning("%s does not exist: no per-layer results logged", layout.layer_report)
        return
    rows = read_json(layout.layer_report)
    now = int(time.time() * 1000)
    _log(client, run_id, [Metric(key, float(row[key]), now, int(row["index"]))
                          for row in rows for key in LAYER_METRICS
                          if row.get(key) is not None])  # output errors: guard=output only
    client.log_table(run_id, {c: [_cell(row, c) for row in rows] for c in LAYER_COLUMNS},
                     "layer_errors.json")
    client.log_figure(run_id, layer_error_figure(rows), "layer_errors.png")
    _log_artifact(client, run_id, layout.layer_report, "results")


@dataclass(frozen=True)
class RecordedRun:
    """The parent run a pipeline run was recorded as, and the model version it registered."""

    run_id: str
    registered: Registered | None = None


def _record(uri: str, params: PipelineParams, layout: Layout, metrics: dict,
            created: list[str] | None = None) -> RecordedRun:
    if params.tracking.registered_model:
        promote_metric(params, metrics)  # a wrong name fails before anything is recorded
    client = MlflowClient(uri)
    experiment_id = _experiment_id(client, params.tracking.experiment, uri)
    tags, config, top1 = provenance_tags(), params.flat(), top1_metrics(metrics)
    registered = None
    with _run(client, experiment_id, PARENT_ROLE, tags, created=created) as parent:
        _log(client, parent, _metrics(top1[PARENT_ROLE]), config,
             {"params.digest": params.digest()})
        client.log_dict(parent, params.model_dump(mode="json"), "params.yaml")
        for role, checkpoint in CHECKPOINTS.items():
            with _run(client, experiment_id, role, tags, parent_id=parent,
                      created=created) as child:
                _log(client, child, _metrics(top1[role]), config)
                _log_artifact(client, child, getattr(layout, checkpoint), "checkpoints")
                if role == "adaround":
                    _log_layers(client, child, layout)
                    registered = _register(client, params, layout, metrics, child, parent,
                                           tags)
    return RecordedRun(parent, registered)


def _register(client: MlflowClient, params: PipelineParams, layout: Layout, metrics: dict,
              run_id: str, parent: str, tags: dict[str, str]) -> Registered | None:
    """The exported model as a registered version (with the promotion decision as tags on
    the parent run too), when ``tracking.registered_model`` is set."""
    if not params.tracking.registered_model:
        return None
    registered = register_model(client, params, layout, metrics, run_id,
                                version_tags(params, metrics, tags, parent))
    _log(client, parent, tags={"registry.model": registered.name,
                               "registry.version": registered.version,
                               DECISION_TAG: registered.promotion.promote,
                               REASON_TAG: registered.promotion.reason})
    return registered


def log_pipeline_run(params: PipelineParams, layout: Layout, metrics: dict) -> RecordedRun:
    """Record a finished pipeline run in MLflow (and register its exported model when
    ``tracking.registered_model`` is set).

    When a store other than the local one fails, the run is recorded in the local store
    instead and a warning says where: a server being down never loses a result. When it
    failed in the middle, the warning also names the runs left incomplete on that store
    (FAILED, or RUNNING if it could not even be told).
    """
    uri = tracking_uri(params)
    created: list[str] = []
    if uri.startswith(("http://", "https://")):
        for key, value in _RECORDING_RETRIES.items():
            os.environ.setdefault(key, value)
    try:
        recorded = _record(check_uri(uri), params, layout, metrics, created)
    except Exception as err:
        local = local_tracking_uri()
        if _same_store(uri, local) or (is_user_error(err)
                                        and not isinstance(err, TrackingStoreError)):
            raise
        recorded = _record(local, params, layout, metrics)
        reason = err.reason if isinstance(err, TrackingStoreError) else _short(err)
        partial = (f"; the partial record left there (parent run {created[0]}, never "
                   f"FINISHED{', child runs ' + ', '.join(created[1:]) if created[1:] else ''})"
                   f" is not this run's record" if created else "")
        logger.warning("MLflow store %s failed (%s): run %s was recorded in the LOCAL store %s "
                       "instead; view it with %s%s", uri, reason, recorded.run_id, local,
                       _view_hint(local), partial)
        return recorded
    logger.info("MLflow run %s of experiment %r recorded in %s (view it with %s)",
                recorded.run_id, params.tracking.experiment, uri, _view_hint(uri))
    return recorded


record_pipeline_run = pipeline_task(name="mlflow-record-run")(log_pipeline_run)
