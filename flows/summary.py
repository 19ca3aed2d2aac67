"""Text summaries the CLI prints."""

from __future__ import annotations

ROWS = (("float", "float"), ("baseline calibration", "baseline"), ("AdaRound", "adaround"))
HEADERS = {"top1": "top-1 %"}  # a metric's column header, when not its name
DECIMALS = {"top1": 2}  # digits shown, when not DEFAULT_DECIMALS
DEFAULT_DECIMALS = 4


def format_metrics(metrics: dict) -> str:
    """The float / baseline / AdaRound table: one column per metric name."""
    names = list(metrics["adaround"])
    widths = [max(9, len(HEADERS.get(n, n)) + 2) for n in names]
    lines = [f"{'model':<22}" + "".join(f"{HEADERS.get(n, n):>{w}}"
                                        for n, w in zip(names, widths, strict=True))]
    rows = [(label, metrics[role]) for label, role in ROWS]
    if "onnx" in metrics:
        rows.append(("AdaRound, ONNX Runtime", metrics["onnx"]))
    for label, values in rows:
        cells = "".join(f"{values[n]:>{w}.{DECIMALS.get(n, DEFAULT_DECIMALS)}f}"
                        if n in values else f"{'-':>{w}}"
                        for n, w in zip(names, widths, strict=True))
        lines.append(f"{label:<22}{cells}")
    lines.append(f"{'AdaRound - baseline':<22}" + "".join(
        f"{metrics[f'delta_{n}']:>+{w}.{DECIMALS.get(n, DEFAULT_DECIMALS)}f}"
        for n, w in zip(names, widths, strict=True)))
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
