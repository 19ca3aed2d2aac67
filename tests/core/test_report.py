"""``ReconstructionReport``: per-layer outcomes in rounding order."""

from __future__ import annotations

import pytest

from adaround_core.reconstruction.layer_reconstruction import LayerReport
from adaround_core.reconstruction.report import ReconstructionReport


def _report() -> ReconstructionReport:
    return ReconstructionReport([
        LayerReport("conv1", 0.5, 0.25, "adaround", 100, 1.5, 2, 3_000_000_000),
        LayerReport("head", 0.1, 0.2, "nearest(layer)", 100, 0.25),
    ], num_threads=1)


def test_sequence_protocol_and_totals():
    r = _report()
    assert len(r) == 2 and r[1].name == "head"
    assert [x.name for x in r] == ["conv1", "head"]
    assert r.seconds == pytest.approx(1.75)
    assert [x.kept_nearest for x in r] == [False, True]


def test_records_and_table():
    r = _report()
    records = r.to_records()
    assert records[0] == {"name": "conv1", "nearest_mse": 0.5, "adaround_mse": 0.25,
                          "decision": "adaround", "num_steps": 100, "seconds": 1.5,
                          "threads": 2, "step_flops": 3_000_000_000,
                          "nearest_output_mse": None, "adaround_output_mse": None}
    table = r.format_table().splitlines()
    assert len(table) == 3
    assert table[1].split()[:4] == ["conv1", "0.5", "0.25", "adaround"]
    assert "nearest(layer)" in table[2]
    assert table[1].split()[-2:] == ["2", "3"]  # threads, GFLOP per step
    assert table[2].split()[-2:] == ["1", "0"]  # the defaults


def test_table_shows_the_model_output_errors_of_the_output_guard():
    r = ReconstructionReport([
        LayerReport("conv1", 0.5, 0.25, "nearest(output)", 100, 1.5, 1, 0, 0.125, 0.75)])
    header, row = r.format_table().splitlines()
    assert "nearest out" in header and "AdaRound out" in header
    assert row.split()[:6] == ["conv1", "0.5", "0.25", "0.125", "0.75", "nearest(output)"]
