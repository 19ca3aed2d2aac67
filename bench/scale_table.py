"""The scale benchmark's results as the Markdown tables of BENCHMARKS.md.

    .venv/bin/python -m bench.scale_table bench/results/scale/*.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GB = 1e9


def _label(r: dict) -> str:
    """The model, with the settings the run overrode (``bench_scale --set``)."""
    overrides = r.get("overrides") or []
    return r["model"] + (f" ({', '.join(overrides)})" if overrides else "")


def _row(r: dict) -> str:
    floor = r["floor"]
    return (f"| {_label(r)} | {r['samples']} | {r['adaround_wall_s']:.0f} s | "
            f"{r['capture_s']:.0f} s (**{100 * r['capture_share']:.0f} %**) | "
            f"{r['rounding_s']:.0f} s | {r['orchestration_s']:.0f} s | "
            f"{r['peak_rss_bytes'] / GB:.2f} GB | {r['peak_cache_bytes'] / GB:.2f} GB "
            f"({r['peak_cache_over_largest']:.2f}×) | {r['largest_layer_cache_bytes'] / GB:.2f} GB | "
            f"{floor['heavy_within_target']} of {floor['heavy_layers']} "
            f"(worst {floor['heavy_worst_over_floor']:.2f}×; floor rate "
            f"{max(r['machine']['rates_flops'].values()) / 1e9:.0f} GFLOP/s){_own(r)} |")


def _own(r: dict) -> str:
    """Against each layer's own kind's rate, where the run recorded it."""
    floor = r["floor"]
    if "heavy_within_own" not in floor:
        return ""
    rates = r["machine"]["rates_flops"]
    return (f"; own kind's rate: {floor['heavy_within_own']} of {floor['heavy_layers']} "
            f"(worst {floor['heavy_worst_over_own']:.2f}×; conv {rates['conv'] / 1e9:.0f}, "
            f"GEMM {rates['gemm'] / 1e9:.0f} GFLOP/s)")


def table(results: list[dict]) -> str:
    header = ("| model | N | stage wall | capture | rounding | orchestration | peak RSS | "
              "peak cache disk (× largest layer) | largest layer's cache | "
              "heavy layers within 2× of the floor |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    lines += [_row(r) for r in results]
    return "\n".join(lines)


def ratios(results: list[dict]) -> str:
    """Peak RSS at the larger N over that at the smaller, per model."""
    out = []
    by_model: dict[str, list[dict]] = {}
    for r in results:
        by_model.setdefault(_label(r), []).append(r)
    for model, runs in sorted(by_model.items()):
        runs.sort(key=lambda r: r["samples"])
        if len(runs) > 1:
            small, large = runs[0], runs[-1]
            out.append(f"{model}: peak RSS at {large['samples']} / at {small['samples']} = "
                       f"{large['peak_rss_bytes'] / small['peak_rss_bytes']:.3f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, nargs="+")
    args = p.parse_args(argv)
    results = sorted((json.loads(f.read_text()) for f in args.results),
                     key=lambda r: (_label(r), r["samples"]))
    print(table(results))
    print()
    print(ratios(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
