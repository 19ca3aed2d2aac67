"""Files that summarise a run: the per-layer report, its plot data, the metrics."""

from __future__ import annotations

import csv
import io

from tasks.artifacts import LayerResult
from tasks.io import atomic_write_bytes, write_json
from tasks.layout import Layout


def write_layer_outputs(layout: Layout, results: list[LayerResult],
                        capture: dict[str, str] | None = None) -> None:
    """``adaround_report.json`` (per layer, in order; with ``capture``, how the run captured
    the layers' inputs: ``capture_method``, ``capture_note``) and ``layer_errors.csv``."""
    rows = [{"index": i, "layer": r.name, "result": r.path, **r.report, **(capture or {})}
            for i, r in enumerate(results)]
    write_json(layout.layer_report, rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, ["index", "layer", "nearest_mse", "adaround_mse", "decision"],
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row[k] for k in writer.fieldnames})
    atomic_write_bytes(layout.layer_plot, buffer.getvalue().encode())


def write_metrics(layout: Layout, scores: dict[str, float],
                  onnx: dict[str, float] | None = None) -> dict:
    """``metrics.json``: top-1 of float / baseline / AdaRound and the deltas, and the
    exported model's top-1 and parity in ONNX Runtime."""
    metrics = {
        "float": {"top1": scores["float"]},
        "baseline": {"top1": scores["baseline"]},
        "adaround": {"top1": scores["adaround"]},
        "delta_top1": scores["adaround"] - scores["baseline"],
        "adaround_vs_float_top1": scores["adaround"] - scores["float"],
    }
    if onnx is not None:
        metrics["onnx"] = dict(onnx)
    write_json(layout.metrics, metrics)
    return metrics
