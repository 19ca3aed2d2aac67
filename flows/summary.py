"""Text summaries the CLI prints."""

from __future__ import annotations


def format_metrics(metrics: dict) -> str:
    """The float / baseline / AdaRound table."""
    rows = [("float", metrics["float"]["top1"]),
            ("baseline calibration", metrics["baseline"]["top1"]),
            ("AdaRound", metrics["adaround"]["top1"])]
    lines = [f"{'model':<22}{'top-1 %':>9}"]
    lines += [f"{name:<22}{value:>9.2f}" for name, value in rows]
    if "onnx" in metrics:
        lines.append(f"{'AdaRound, ONNX Runtime':<22}{metrics['onnx']['top1']:>9.2f}")
    lines.append(f"{'AdaRound - baseline':<22}{metrics['delta_top1']:>+9.2f}")
    if "registry" in metrics:
        lines.append(metrics["registry"])
    return "\n".join(lines)


def format_stage_result(stage: str, result) -> str:
    """The short summary a stage prints: the metrics table, or the file it wrote."""
    if stage in ("evaluate", "run"):
        return format_metrics(result)
    return f"{stage}: wrote {result.path}"


def show_metrics(params) -> str:
    """The table of the metrics file of ``params``' results directory."""
    from tasks.io import read_json
    from tasks.layout import Layout

    path = Layout(params).metrics
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `dvc repro` first")
    return format_metrics(read_json(path))
