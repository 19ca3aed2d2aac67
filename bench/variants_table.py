"""Markdown tables of ``bench.bench_variants`` results: one row per variant, each metric with
its change against layer-wise AdaRound and, for MiniLM's cosine, the share of the gap between
layer-wise AdaRound and float that the variant closes; several files of one model and bit
width (seeds) are averaged.

    .venv/bin/python -m bench.variants_table bench/results/variants_digits_2_8_seed*.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def load(paths: list[Path]) -> dict:
    """The files' metrics averaged per variant, with ``float`` and ``nearest`` rows."""
    runs = [json.loads(p.read_text()) for p in paths]
    names = ["float", "nearest", *runs[0]["variants"]]

    def row(run: dict, name: str) -> dict | None:
        if name in ("float", "nearest"):
            return {"metrics": run[name], "seconds": None}
        return run["variants"].get(name)

    table = {}
    for name in names:
        rows = [r for r in (row(run, name) for run in runs) if r is not None]
        table[name] = {
            "metrics": {k: statistics.mean(r["metrics"][k] for r in rows)
                        for k in rows[0]["metrics"]},
            "seconds": (statistics.mean(r["seconds"] for r in rows)
                        if rows[0]["seconds"] is not None else None),
            "runs": len(rows)}
    return table


def markdown(table: dict) -> str:
    keys = list(table["float"]["metrics"])
    layer = table.get("layer")
    header = ["variant", *keys]
    if layer:
        header += [f"Δ {k} vs layer" for k in keys]
    if layer and "cosine" in keys:
        header.append("gap closed")
    header += ["s", "runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in table.items():
        m = entry["metrics"]
        cells = [name, *(f"{m[k]:.4f}" for k in keys)]
        if layer:
            cells += [("" if name in ("float", "nearest", "layer")
                       else f"{m[k] - layer['metrics'][k]:+.4f}") for k in keys]
        if layer and "cosine" in keys:
            gap = table["float"]["metrics"]["cosine"] - layer["metrics"]["cosine"]
            cells.append("" if name in ("float", "nearest", "layer")
                         else f"{(m['cosine'] - layer['metrics']['cosine']) / gap:+.0%}")
        cells += ["" if entry["seconds"] is None else f"{entry['seconds']:.0f}",
                  str(entry["runs"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path)
    print(markdown(load(p.parse_args(argv).files)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
