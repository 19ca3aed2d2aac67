"""Figures of a run's per-layer results (matplotlib, no pyplot: no global state, no display)."""

from __future__ import annotations

from matplotlib.figure import Figure


def layer_error_figure(rows: list[dict]) -> Figure:
    """Held-out output MSE per layer, nearest rounding vs AdaRound (log scale)."""
    index = [row["index"] for row in rows]
    fig = Figure(figsize=(max(5.0, 0.6 * len(rows) + 2.0), 3.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(index, [row["nearest_mse"] for row in rows], marker="o", label="nearest rounding")
    ax.plot(index, [row["adaround_mse"] for row in rows], marker="s", label="AdaRound")
    ax.set_yscale("log")
    ax.set_xticks(index, [row["layer"] for row in rows], rotation=45, ha="right")
    ax.set_xlabel("layer (first-call order)")
    ax.set_ylabel("held-out output MSE")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig
