"""``LayerSamples``: held-out split, random draws, shape groups."""

from __future__ import annotations

import logging

import pytest
import torch

from adaround_core.calibration.layer_samples import LayerSamples


def _ids(n: int, start: int = 0, width: int = 3) -> torch.Tensor:
    """Samples whose every entry is the sample's id, so draws can be traced back."""
    return torch.arange(start, start + n, dtype=torch.float32).reshape(-1, 1).repeat(1, width)


def _store(batches, holdout=0.1, seed=0):
    inputs = list(batches)
    targets = [2 * x for x in inputs]
    return LayerSamples.from_tensors(inputs, targets, holdout, torch.Generator().manual_seed(seed))


def test_holdout_split_is_disjoint_and_complete():
    store = _store(_ids(20).split(5), holdout=0.1)
    held = torch.cat([x for x, _ in store.holdout(3)])
    assert held.shape[0] == 2  # round(0.1 * 20)
    assert store.num_samples == 20
    g = torch.Generator().manual_seed(1)
    drawn = set()
    for _ in range(50):
        x, y = store.sample(8, g)
        assert torch.equal(y, 2 * x)  # inputs and targets stay paired
        drawn |= set(x[:, 0].tolist())
    held_ids = set(held[:, 0].tolist())
    assert not drawn & held_ids  # never trains on held-out samples
    assert drawn | held_ids == set(range(20))


def test_default_batch_size_is_the_first_batch_size():
    store = _store(_ids(10).split(4))
    assert store.default_batch_size == 4
    x, _ = store.sample(7, torch.Generator().manual_seed(0))
    assert x.shape == (7, 3)


def test_holdout_chunks():
    store = _store(_ids(40).split(10), holdout=0.25)
    sizes = [x.shape[0] for x, _ in store.holdout(4)]
    assert sizes == [4, 4, 2]


def test_groups_by_shape_keep_shapes_consistent():
    small = [_ids(6, 0, width=3)]
    large = [_ids(6, 100, width=5)]
    store = _store(small + large, holdout=0.0)
    g = torch.Generator().manual_seed(0)
    widths = set()
    for _ in range(40):
        x, y = store.sample(4, g)
        widths.add(x.shape[1])
        assert torch.equal(y, 2 * x)
        assert (x[:, 0] < 100).all() if x.shape[1] == 3 else (x[:, 0] >= 100).all()
    assert widths == {3, 5}


def test_single_sample_is_judged_on_itself(caplog):
    with caplog.at_level(logging.WARNING):
        store = _store([_ids(1)])
    assert "too few samples" in caplog.text
    held = list(store.holdout(8))
    assert len(held) == 1 and torch.equal(held[0][0], _ids(1))


def test_same_seed_same_draws():
    a, b = _store(_ids(30).split(6)), _store(_ids(30).split(6))
    ga, gb = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(5):
        assert torch.equal(a.sample(4, ga)[0], b.sample(4, gb)[0])


def test_no_samples_is_an_error():
    with pytest.raises(ValueError, match="no samples"):
        _store([])


@pytest.mark.parametrize("on_disk", [False, True])
def test_draws_are_the_successive_samples_read_ahead_from_disk(tmp_path, on_disk):
    """``draws`` gives exactly what as many ``sample`` calls give (same generator order),
    from memory and from a disk cache (there the next batch's rows advised ahead), in two row
    shapes so the group choice draws from the generator too."""
    from adaround_core.calibration.sample_store import write_layer_cache

    batches = [*_ids(12).split(4), *_ids(6, start=100, width=5).split(3)]
    if on_disk:
        write_layer_cache(tmp_path, [(x, 2 * x) for x in batches])

    def samples():
        if on_disk:
            return LayerSamples.from_cache(tmp_path, 0.1, torch.Generator().manual_seed(0))
        return _store(batches)

    one_by_one, g = samples(), torch.Generator().manual_seed(3)
    expected = [one_by_one.sample(4, g, (1, 3)) for _ in range(9)]
    ahead, g = samples(), torch.Generator().manual_seed(3)
    drawn = list(ahead.draws(9, 4, g, (1, 3)))
    assert len(drawn) == 9
    for (x, y), (ex, ey) in zip(drawn, expected, strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey) and x.shape[0] == 2
    assert list(ahead.draws(0, 4, g)) == []


def test_holdout_chunks_stay_under_a_byte_budget():
    """With ``max_bytes`` a chunk holds as many rows as fit (inputs + targets), at least one,
    whatever the number of samples; the rows are the same as without it."""
    store = _store(_ids(40).split(10), holdout=0.5)  # 20 held rows of 3 + 3 float32 = 24 B
    whole = torch.cat([x for x, _ in store.holdout(256)])
    chunks = [x for x, _ in store.holdout(256, max_bytes=24 * 6 + 5)]
    assert [len(x) for x in chunks] == [6, 6, 6, 2]
    assert torch.equal(torch.cat(chunks), whole)
    assert [len(x) for x, _ in store.holdout(256, max_bytes=1)] == [1] * 20
    assert [len(x) for x, _ in store.holdout(8, max_bytes=10**9)] == [8, 8, 4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_disk_rows_are_read_exactly_into_fresh_tensors(tmp_path, dtype):
    """``ShardStore.gather`` returns the asked rows, across shards and in the asked order
    (repeats included), bit for bit in the cache's dtype, each call in its own writable
    tensor; a shard cut short is reported, not read as zeros."""
    from adaround_core.calibration.sample_store import (
        CorruptCacheError,
        cached_groups,
        write_layer_cache,
    )

    source = torch.arange(60).reshape(10, 2, 3) % 7 - 3
    source = source.to(dtype)
    write_layer_cache(tmp_path, [(source[:4], source[:4]), (source[4:], source[4:])])
    (inputs, _), = cached_groups(tmp_path)
    index = torch.tensor([9, 0, 5, 5, 3])
    first, second = inputs.gather(index), inputs.gather(index)
    assert first.dtype == dtype and torch.equal(first, source[index])
    first.zero_()  # a batch is its holder's: the next read does not share its memory
    assert torch.equal(second, source[index])
    assert inputs.gather(torch.tensor([], dtype=torch.long)).shape == (0, 2, 3)
    shard = tmp_path / inputs.shards[1].file
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(CorruptCacheError, match="truncated"):
        inputs.gather(torch.tensor([9]))


def test_draws_from_disk_advise_the_next_rows_before_reading_the_current_ones(
        tmp_path, monkeypatch):
    """Each batch's rows are handed to ``posix_fadvise(WILLNEED)`` one step before they
    are read, at their byte offsets in their shards, and no reader thread is started."""
    import os
    import threading

    from adaround_core.calibration.sample_store import write_layer_cache

    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise on this system")
    write_layer_cache(tmp_path, [(x, 2 * x) for x in _ids(16).split(4)])
    advised: list[tuple[int, int, int]] = []  # (offset, size, advice) since the last read
    monkeypatch.setattr(os, "posix_fadvise",
                        lambda fd, offset, size, advice: advised.append((offset, size, advice)))
    samples = LayerSamples.from_cache(tmp_path, 0.0, torch.Generator().manual_seed(0))
    threads = threading.active_count()
    drawn, advised_before_read = [], []
    for x, _ in samples.draws(3, 2, torch.Generator().manual_seed(1)):
        assert threading.active_count() == threads
        drawn.append(x[:, 0].long().tolist())
        advised_before_read.append(advised.copy())
        advised.clear()
    assert len(drawn) == 3
    row_bytes = 3 * 4  # three float32 entries
    shard_bytes = 4 * row_bytes
    # before each read: the next batch's 2 rows, in inputs and targets; nothing before the last
    for calls, following in zip(advised_before_read, drawn[1:], strict=False):
        assert {(size, advice) for _, size, advice in calls} == \
            {(row_bytes, os.POSIX_FADV_WILLNEED)}
        assert len(calls) == 4
        assert sorted(offset % shard_bytes for offset, _, _ in calls[:2]) == \
            sorted((r % 4) * row_bytes for r in following)
    assert advised_before_read[-1] == []
