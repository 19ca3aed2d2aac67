"""Calibration batches: calling convention, device placement, validation, streaming."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from adaround_core.calibration.batches import (
    CalibrationBatches,
    call_model,
    check_finite,
    model_device,
    to_device,
)

CPU = torch.device("cpu")


class Recorder(nn.Module):
    def forward(self, *args, **kwargs):
        return args, kwargs


def test_call_model_conventions():
    m = Recorder()
    x, y = torch.ones(1), torch.zeros(1)
    assert call_model(m, x) == ((x,), {})
    assert call_model(m, (x, y)) == ((x, y), {})
    assert call_model(m, [x, y]) == ((x, y), {})
    assert call_model(m, {"a": x}) == ((), {"a": x})


def test_model_device():
    assert model_device(nn.Linear(2, 2)) == CPU
    assert model_device(nn.ReLU()) == CPU  # no parameters or buffers
    assert model_device(nn.Linear(2, 2, device="meta")).type == "meta"


def test_to_device_keeps_tensors_already_there_and_rejects_other_accelerators():
    x = torch.ones(2)
    batch = {"x": x, "n": 3}
    moved = to_device(batch, CPU, 0)
    assert moved["x"] is x and moved["n"] == 3
    with pytest.raises(ValueError, match=r"batch 4 .*meta"):
        to_device((torch.ones(2, device="meta"),), CPU, 4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite(bad):
    check_finite({"x": torch.ones(3), "i": torch.tensor([1, 2])}, 0)
    x = torch.ones(3)
    x[1] = bad
    with pytest.raises(ValueError, match=r"batch 2 contains NaN or Inf"):
        check_finite(("label", [x]), 2)


def test_list_is_processed_once_and_reused():
    calls = []

    def process(b):
        calls.append(1)
        return b * 2

    data = CalibrationBatches([torch.ones(1), torch.full((1,), 2.0)], process, CPU, num_batches=1)
    assert len(calls) == 2  # all of the list, ignoring num_batches
    for _ in range(3):
        assert [b.item() for b in data] == [2.0, 4.0]
    assert len(calls) == 2
    assert data.first().item() == 2.0


class CountingDataset(Dataset):
    def __init__(self, n: int) -> None:
        self.n, self.fetched = n, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        self.fetched.append(i)
        return torch.full((2,), float(i)), i


def test_dataloader_is_streamed_num_batches_per_pass():
    ds = CountingDataset(20)
    loader = DataLoader(ds, batch_size=2)
    data = CalibrationBatches(loader, lambda b: b[0], CPU, num_batches=3)
    assert ds.fetched == []  # nothing read up front
    for _ in range(2):
        got = [b[:, 0].tolist() for b in data]
        assert got == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    assert ds.fetched == list(range(6)) * 2


def test_empty_inputs():
    with pytest.raises(ValueError, match="empty"):
        CalibrationBatches([], None, CPU, 10)
    with pytest.raises(ValueError, match="empty"):
        CalibrationBatches((), None, CPU, 10)
    data = CalibrationBatches(DataLoader(TensorDataset(torch.empty(0, 2))), None, CPU, 10)
    with pytest.raises(ValueError, match="empty"):
        data.first()


def test_not_iterable_is_a_type_error():
    with pytest.raises(TypeError, match="batches"):
        CalibrationBatches(5, None, CPU, 10)


def test_nan_in_list_detected_up_front():
    batches = [torch.ones(2), torch.tensor([1.0, float("nan")])]
    with pytest.raises(ValueError, match="batch 1"):
        CalibrationBatches(batches, None, CPU, 10)


def test_nan_in_stream_detected_when_read():
    loader = DataLoader(TensorDataset(torch.tensor([[1.0], [float("nan")]])), batch_size=1)
    data = CalibrationBatches(loader, lambda b: b[0], CPU, 10)
    with pytest.raises(ValueError, match="batch 1"):
        list(data)


def test_one_shot_iterator_detected_on_second_pass():
    data = CalibrationBatches(iter([torch.ones(1), torch.ones(1)]), None, CPU, 10)
    assert len(list(data)) == 2
    with pytest.raises(ValueError, match="one-shot iterator"):
        list(data)


def test_check_all_reads_every_streamed_batch_once():
    ds = CountingDataset(10)
    data = CalibrationBatches(DataLoader(ds, batch_size=2), lambda b: b[0], CPU, num_batches=4)
    data.check_all()
    assert ds.fetched == list(range(8))
    bad = torch.tensor([[1.0], [2.0], [float("inf")]])
    data = CalibrationBatches(DataLoader(TensorDataset(bad)), lambda b: b[0], CPU, 10)
    with pytest.raises(ValueError, match="batch 2"):
        data.check_all()


def test_a_single_tensor_is_rejected_with_the_fix():
    with pytest.raises(TypeError, match=r"one tensor of shape \(8, 3\); pass a list of batches"):
        CalibrationBatches(torch.zeros(8, 3), None, torch.device("cpu"), 10)
