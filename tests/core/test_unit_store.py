"""A unit's calls cached on disk give the samples the in-memory path gives: same groups,
rows, held-out split and draws (kwargs, constants, several outputs, two row shapes)."""

from __future__ import annotations

import pytest
import torch

from adaround_core.calibration.sample_store import CorruptCacheError, read_manifest
from adaround_core.calibration.unit_samples import unit_samples
from adaround_core.calibration.unit_store import CALLS_FILE, cached_unit_samples, write_unit_cache
from adaround_core.torch_private import tree_leaves


def _calls() -> list:
    g = torch.Generator().manual_seed(0)
    calls = []
    for batch, width in ((4, 3), (4, 3), (2, 5), (4, 3)):
        x = torch.randn(batch, width, generator=g)
        mask = torch.rand(batch, 1, 2, generator=g) > 0.5
        output = (torch.randn(batch, 6, generator=g), {"aux": torch.randn(batch, generator=g)})
        calls.append(((x,), {"mask": mask, "scale": 0.5, "mode": None}, output))
    return calls


def _draws(samples, n: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    drawn = [leaf for _ in range(n) for leaf in tree_leaves(samples.sample(3, g))]
    held = [leaf for chunk in samples.holdout(2) for leaf in tree_leaves(chunk)]
    return drawn + held


def test_cached_calls_draw_exactly_as_the_in_memory_calls(tmp_path):
    calls = _calls()
    assert write_unit_cache(tmp_path, calls) == len(calls)
    memory = unit_samples("block", calls, 0.25, torch.Generator().manual_seed(2))
    disk = cached_unit_samples(tmp_path, 0.25, torch.Generator().manual_seed(2))
    assert disk.default_batch_size == memory.default_batch_size
    assert disk.train_row_shapes() == memory.train_row_shapes()
    expected, got = _draws(memory), _draws(disk)
    assert len(got) == len(expected) > 0
    for a, b in zip(expected, got, strict=True):
        assert isinstance(b, type(a))
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_a_damaged_structure_file_fails_the_checksum_and_cannot_be_read(tmp_path):
    write_unit_cache(tmp_path, _calls())
    read_manifest(tmp_path, verify=True)  # intact
    (tmp_path / CALLS_FILE).write_bytes(b"not a pickle")
    with pytest.raises(CorruptCacheError, match=CALLS_FILE):
        read_manifest(tmp_path, verify=True)
    with pytest.raises(CorruptCacheError, match=CALLS_FILE):
        cached_unit_samples(tmp_path, 0.25, torch.Generator().manual_seed(2))


def test_unit_holdout_chunks_stay_under_a_byte_budget(tmp_path):
    """A unit's rows count every tensor leaf (inputs and outputs), in memory and on disk,
    so a unit's held-out chunks stay under the byte budget as a layer's do."""
    g = torch.Generator().manual_seed(0)
    calls = [((torch.randn(8, 3, generator=g),), {"mask": torch.ones(8, 2, dtype=torch.bool)},
              (torch.randn(8, 4, generator=g),)) for _ in range(4)]
    row = 3 * 4 + 2 * 1 + 4 * 4  # bytes of one row: float inputs, bool mask, float outputs
    write_unit_cache(tmp_path, calls)
    for samples in (unit_samples("block", calls, 0.5, torch.Generator().manual_seed(1)),
                    cached_unit_samples(tmp_path, 0.5, torch.Generator().manual_seed(1))):
        group = samples._groups[0]
        assert group.inputs.row_nbytes + group.targets.row_nbytes == row
        sizes = [chunk[0][0][0].shape[0] for chunk in samples.holdout(max_bytes=3 * row + 1)]
        assert sizes == [3] * 5 + [1]  # 16 held-out rows
