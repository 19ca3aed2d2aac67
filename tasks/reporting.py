"""Files that summarise a run: the per-layer report, its plot data, the metrics."""

from __future__ import annotations

import csv
import io

from tasks.artifacts import LayerResult
from tasks.io import atomic_write_bytes, write_json
from tasks.layout import Layout
from tasks.metrics import metrics_file

ERROR_COLUMNS = ("index", "layer", "nearest_mse", "adaround_mse", "decision")
# with guard: output, each layer's error on the model's output too
OUTPUT_ERROR_COLUMNS = ("nearest_output_mse", "adaround_output_mse")


def write_layer_outputs(layout: Layout, results: list[LayerResult],
                        capture: dict[str, str] | None = None,
                        cache_bytes: dict[str, int] | None = None,
                        capture_seconds: dict[str, float] | None = None) -> None:
    """``adaround_report.json`` (per layer, in order; with ``capture``, how the run captured
    the layers' inputs: ``capture_method``, ``capture_note``; with ``cache_bytes``, the size
    of each layer's activation cache; with ``capture_seconds``, the time this run spent
    capturing it, 0 for a reused result; ``seconds`` is the rounding's time) and
    ``layer_errors.csv`` (the errors of :data:`ERROR_COLUMNS`, and the output's where the
    run judged the layers on it)."""
    rows = [{"index": i, "layer": r.name, "result": r.path, **r.report, **(capture or {}),
             **({"cache_bytes": cache_bytes.get(r.name, 0)} if cache_bytes else {}),
             **({"capture_seconds": round(capture_seconds.get(r.name, 0.0), 3)}
                if capture_seconds is not None else {})}
            for i, r in enumerate(results)]
    write_json(layout.layer_report, rows)
    judged = [c for c in OUTPUT_ERROR_COLUMNS if any(row.get(c) is not None for row in rows)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, [*ERROR_COLUMNS, *judged], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k) for k in writer.fieldnames})
    atomic_write_bytes(layout.layer_plot, buffer.getvalue().encode())


def write_metrics(layout: Layout, scores: dict[str, dict[str, float]],
                  onnx: dict[str, float] | None = None) -> dict:
    """``metrics.json`` (:func:`tasks.metrics.metrics_file`): the named numbers of float /
    baseline / AdaRound, their deltas, and the exported model's in ONNX Runtime."""
    metrics = metrics_file(scores, onnx)
    write_json(layout.metrics, metrics)
    return metrics
