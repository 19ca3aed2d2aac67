"""Figures of the scale benchmark (``bench/bench_scale.py``), for BENCHMARKS.md.

    .venv/bin/python -m bench.scale_plot bench/results/scale/*.json

Writes bench/figures/scale_wall.png (the adaround stage's wall time split into capture,
rounding and orchestration, with peak RSS and peak cache disk per run) and
scale_floor.png (seconds per AdaRound step over the FLOP floor, per layer).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FIGURES = Path("bench/figures")
PARTS = (("capture_s", "capture", "C3"), ("rounding_s", "rounding", "C0"),
         ("orchestration_s", "orchestration", "0.6"))


def _label(result: dict) -> str:
    """Model (split at its underscores, so long names do not overlap) and N."""
    return f"{result['model'].replace('_', chr(10))}\n{result['samples']}"


def wall_figure(results: list[dict], path: Path) -> None:
    fig, (wall, memory) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [_label(r) for r in results]
    bottom = [0.0] * len(results)
    for key, name, color in PARTS:
        values = [r[key] for r in results]
        wall.bar(labels, values, bottom=bottom, label=name, color=color)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    for i, r in enumerate(results):
        wall.text(i, bottom[i], f"{100 * r['capture_share']:.0f}%", ha="center", va="bottom",
                  fontsize=8)
    wall.set_ylabel("seconds (label: capture share)")
    wall.set_title("adaround stage wall time")
    wall.legend(fontsize=8)
    x = range(len(results))
    memory.bar([i - 0.2 for i in x], [r["peak_rss_bytes"] / 1e9 for r in results], 0.4,
               label="peak RSS")
    memory.bar([i + 0.2 for i in x], [r["peak_cache_bytes"] / 1e9 for r in results], 0.4,
               label="peak cache disk")
    memory.scatter([i + 0.2 for i in x],
                   [2 * r["largest_layer_cache_bytes"] / 1e9 for r in results],
                   marker="_", s=300, color="k", label="2x largest layer cache")
    memory.axhline(3, color="C3", ls=":", lw=1, label="3 GB (RSS target)")
    memory.set_xticks(list(x), labels)
    memory.set_ylabel("GB")
    memory.set_title("memory and disk")
    memory.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def floor_figure(results: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        rows = r["floor"]["layers"]
        ax.scatter([row["step_flops"] for row in rows], [row["over_floor"] for row in rows],
                   label=_label(r).replace("\n", " "), s=14)
    ax.axhline(2, color="k", ls="--", lw=1, label="target: 2x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FLOPs per AdaRound step (forward + weight gradient)")
    ax.set_ylabel("step time / FLOP floor")
    ax.set_title("per-layer step time against the machine's FLOP floor")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, nargs="+", help="bench_scale JSON files")
    p.add_argument("--out-dir", type=Path, default=FIGURES)
    args = p.parse_args(argv)
    results = sorted((json.loads(f.read_text()) for f in args.results),
                     key=lambda r: (r["model"], r["samples"]))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    wall_figure(results, args.out_dir / "scale_wall.png")
    floor_figure(results, args.out_dir / "scale_floor.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
