"""Figures of the AdaRound-vs-AIMET benchmark and of the FLOP floor, for BENCHMARKS.md.

    .venv/bin/python -m bench.aimet.plot \\
        bench/results/aimet_side_by_side_100.json bench/results/aimet_side_by_side_1000.json \\
        --floor bench/results/flop_floor.json

Writes bench/figures/aimet_top1_vs_bits.png, aimet_time_per_layer.png and flop_floor.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FIGURES = Path("bench/figures")
SERIES = (  # (label, method, key, style)
    ("nearest (our grid)", "ours", "nearest_top1", dict(color="0.55", marker="s", ls="--")),
    ("ours", "ours", "top1", dict(color="C0", marker="o", lw=2)),
    ("AIMET nearest (its grid)", "aimet", "nearest_top1", dict(color="C3", marker="s", ls=":")),
    ("AIMET", "aimet", "top1", dict(color="C3", marker="^", lw=2)),
    ("AIMET on our grid", "aimet-grid", "top1", dict(color="C1", marker="v", ls="-.")),
)


def _rows(result: dict) -> dict[tuple[int, str], dict]:
    return {(r["bits"], r["method"]): r for r in result["rows"]}


def top1_figure(results: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        rows = _rows(result)
        bits = sorted({b for b, _ in rows}, reverse=True)
        ax.axhline(result["float_top1"], color="k", lw=1, label="float")
        for label, method, key, style in SERIES:
            ys = [rows[(b, method)][key] for b in bits if (b, method) in rows]
            if len(ys) == len(bits):
                ax.plot(bits, ys, label=label, **style)
        ax.set_xticks(bits, [f"W{b}A8" for b in bits])
        ax.invert_xaxis()
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{result['args']['steps']} steps per layer")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.suptitle("DigitsCNN top-1 against weight bits (same evaluation harness)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def time_figure(results: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        rows = _rows(result)
        bits = max(b for b, _ in rows)
        methods = [m for m in ("ours", "aimet", "aimet-grid") if (bits, m) in rows]
        layers = list(rows[(bits, "ours")]["layer_s"])
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            per_layer = rows[(bits, m)]["layer_s"]
            ax.bar([j + i * width for j in range(len(layers))],
                   [per_layer.get(name, 0.0) for name in layers], width,
                   label=f"{m} (total {rows[(bits, m)]['wall_median_s']:.2f} s)")
        ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(layers))], layers)
        ax.set_ylabel("seconds per layer (median)")
        ax.set_title(f"W{bits}A8, {result['args']['steps']} steps, "
                     f"{result['args']['threads']} thread(s)")
        ax.set_ylim(top=ax.get_ylim()[1] * 1.35)  # room for the legend
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("AdaRound time per layer: ours vs AIMET")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def floor_figure(floor: dict, path: Path) -> None:
    rows = floor["layers"]
    names = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["floor_s"] * 1e3 for r in rows], 0.4,
           label=f"FLOP floor ({floor['matmul_gflops']:.0f} GFLOP/s)", color="0.6")
    ax.bar([x + 0.2 for x in xs], [r["step_s_median"] * 1e3 for r in rows], 0.4,
           label="measured (median)", color="C0")
    for x, r in zip(xs, rows, strict=True):
        ax.annotate(f"{r['ratio_median']:.1f}x", (x + 0.2, r["step_s_median"] * 1e3),
                    ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("ms per optimisation step (log)")
    ax.set_title(f"Time per step vs FLOP floor, W{floor['bits']}A8, {floor['threads']} thread(s)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, nargs="+", help="side_by_side JSON files")
    p.add_argument("--floor", type=Path, help="flop_floor JSON")
    p.add_argument("--out-dir", type=Path, default=FIGURES)
    args = p.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = [json.loads(path.read_text()) for path in args.results]
    top1_figure(results, args.out_dir / "aimet_top1_vs_bits.png")
    time_figure(results, args.out_dir / "aimet_time_per_layer.png")
    if args.floor:
        floor_figure(json.loads(args.floor.read_text()), args.out_dir / "flop_floor.png")
    print(f"wrote figures to {args.out_dir}")


if __name__ == "__main__":
    main()
