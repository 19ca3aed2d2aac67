"""``python -m flows compare``: the last pipeline runs side by side, read from MLflow alone.

Each run's AdaRound variant is shown compactly (``block qdrop=0.5 lsq=0.001 guard=off``: the
granularity, then ``drop_prob``, ``activation_lr`` and ``guard`` where they are not the
defaults), then only what differs between the runs: the config keys whose values differ,
then each metric the runs logged (top-1, or a metric of your own such as cosine), baseline and
AdaRound and their delta. ``mlflow ui`` lists the same parent runs.
"""

from __future__ import annotations

from datetime import datetime

from mlflow import MlflowClient
from mlflow.entities import Run

from tasks.params import PipelineParams
from tasks.registry import CHAMPION, METRIC_TAG, PARENT_TAG, REASON_TAG, SCORE_TAG, current_champion
from tasks.tracking import PARENT_ROLE, ROLE_TAG, check_uri, sqlite_path, tracking_uri

# the metric columns: for each metric the runs logged (``delta_<name>``), baseline, AdaRound
# and their delta; top-1 as a percentage, anything else (cosine, retrieval, ...) as it is
TOP1_COLUMNS = (("baseline %", "baseline_top1", "{:.2f}"), ("AdaRound %", "adaround_top1", "{:.2f}"),
                ("delta", "delta_top1", "{:+.2f}"))
MAX_VALUE = 32  # longer config values are cut in the table
# the variant column: (param, label, value that is left out); runs logged before a key
# existed lack it and count as its default
VARIANT_KEYS = (("adaround.drop_prob", "qdrop", "0.0"), ("adaround.activation_lr", "lsq", "null"),
                ("adaround.guard", "guard", "layer"))


def pipeline_runs(client: MlflowClient, experiment_id: str, last: int) -> list[Run]:
    """The ``last`` parent runs of the experiment, newest first."""
    return list(client.search_runs([experiment_id], f"tags.`{ROLE_TAG}` = '{PARENT_ROLE}'",
                                   max_results=last, order_by=["attributes.start_time DESC"]))


def differing_keys(runs: list[Run]) -> list[str]:
    """Config keys whose value is not the same in every run (missing counts as a value)."""
    keys = sorted(set().union(*(run.data.params for run in runs)))
    return [key for key in keys if len({run.data.params.get(key) for run in runs}) > 1]


def variant(params: dict[str, str]) -> str:
    """A run's AdaRound variant from its logged params, e.g. ``layer`` (plain AdaRound) or
    ``block qdrop=0.5 lsq=0.001``."""
    parts = [params.get("adaround.granularity", "layer")]
    parts += [f"{label}={params[key]}" for key, label, default in VARIANT_KEYS
              if params.get(key, default) != default]
    return " ".join(parts)


def metric_columns(runs: list[Run]) -> list[tuple[str, str, str]]:
    """``(title, MLflow metric, format)`` of baseline, AdaRound and delta for every metric
    name any of the runs logged a ``delta_<name>`` of (``top1`` first)."""
    names = sorted({key.removeprefix("delta_") for run in runs for key in run.data.metrics
                    if key.startswith("delta_") and not key.startswith("delta_vs_")},
                   key=lambda name: (name != "top1", name))
    columns: list[tuple[str, str, str]] = []
    for name in names:
        columns += TOP1_COLUMNS if name == "top1" else (
            (f"baseline {name}", f"baseline_{name}", "{:.4f}"),
            (f"AdaRound {name}", f"adaround_{name}", "{:.4f}"),
            (f"delta {name}", f"delta_{name}", "{:+.4f}"))
    return columns


def _cut(text: str) -> str:
    return text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 3] + "..."


def _row(run: Run, keys: list[str], columns: list[tuple[str, str, str]],
         versions: dict[str, str]) -> list[str]:
    started = datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S")
    metrics = run.data.metrics
    return [run.info.run_name or "", run.info.run_id[:8], started, variant(run.data.params),
            *(_cut(run.data.params.get(key, "-")) for key in keys),
            *(fmt.format(metrics[name]) if name in metrics else "-"
              for _, name, fmt in columns),
            *([versions.get(run.info.run_id, "-")] if versions else [])]


def format_comparison(runs: list[Run], keys: list[str],
                      versions: dict[str, str] | None = None) -> str:
    """A fixed-width table: one line per run, its variant, the differing keys, then each
    metric's baseline, AdaRound and delta, and the registered version of each run when
    ``versions`` (parent run id -> label)."""
    versions = versions or {}
    columns = metric_columns(runs)
    header = ["run", "id", "started", "variant", *keys, *(title for title, _, _ in columns),
              *(["version"] if versions else [])]
    rows = [header] + [_row(run, keys, columns, versions) for run in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    text_columns = 4 + len(keys)
    lines = ["  ".join(cell.ljust(w) if i < text_columns else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in rows]
    if not keys:
        lines.append("(no config key differs between these runs)")
    return "\n".join(lines)


def compare_runs(params: PipelineParams, last: int = 5) -> str:
    """The comparison table of the last ``last`` pipeline runs of ``tracking.experiment``."""
    if last < 1:
        raise ValueError(f"--last must be at least 1, got {last}")
    uri, name = tracking_uri(params), params.tracking.experiment
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise LookupError(f"no MLflow store at {db}: run the pipeline (`dvc repro` or "
                          f"`python -m flows run`) with tracking.enabled: true first")
    client = MlflowClient(check_uri(uri))
    experiment = client.get_experiment_by_name(name)
    runs = pipeline_runs(client, experiment.experiment_id, last) if experiment else []
    if not runs:
        raise LookupError(f"no pipeline runs in MLflow experiment {name!r} at {uri}: run the "
                          f"pipeline with tracking.enabled: true first")
    title = f"last {len(runs)} pipeline runs of experiment {name!r} in {uri}, newest first"
    model = params.tracking.registered_model
    versions = version_labels(client, model) if model else {}
    table = format_comparison(runs, differing_keys(runs), versions)
    return f"{title}\n{table}" + (f"\n{champion_line(client, model)}" if model else "")


def version_labels(client: MlflowClient, model: str) -> dict[str, str]:
    """Parent run id -> "v3" (or "v3 champion") for each version of the registered model."""
    champion = current_champion(client, model)
    labels = {}
    for version in client.search_model_versions(f"name='{model}'"):
        star = f" {CHAMPION}" if champion and str(version.version) == str(champion.version) else ""
        labels[version.tags.get(PARENT_TAG, "")] = f"v{version.version}{star}"
    return labels


def champion_line(client: MlflowClient, model: str) -> str:
    """Which version of the registered model is the champion, its score and why."""
    champion = current_champion(client, model)
    if champion is None:
        return f"champion of {model!r}: none yet"
    tags = champion.tags
    return (f"champion of {model!r}: version {champion.version} from run "
            f"{tags.get(PARENT_TAG, '?')[:8]}, {tags.get(METRIC_TAG, '?')} "
            f"{float(tags.get(SCORE_TAG, 'nan')):.4g} ({tags.get(REASON_TAG, '')})")
