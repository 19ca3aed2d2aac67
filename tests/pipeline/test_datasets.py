"""The pieces of "your own data, model and metric": Dataset sources, the sample digest,
named metrics and state_dict checks (in process, no pipeline run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tasks.datasets import DataSourceError, RowDigest, check_splits, head, loader, source_kind
from tasks.metrics import MetricError, by_run_role, metrics_file, named_numbers
from tasks.pretrained import CheckpointMismatchError, check_keys, read_state_dict


def _dict_batches(batch_size: int):
    ids = torch.arange(60).reshape(10, 6)
    data = [{"input_ids": ids[i], "attention_mask": ids[i] % 2} for i in range(10)]
    return DataLoader(data, batch_size=batch_size)


def test_the_sample_digest_does_not_depend_on_the_batching():
    digests = []
    for size in (1, 3, 10):
        digest = RowDigest()
        for batch in _dict_batches(size):
            digest.update(batch)
        digests.append((digest.hexdigest(), digest.samples))
    assert digests[0] == digests[1] == digests[2] and digests[0][1] == 10
    other = RowDigest()
    other.update({"input_ids": torch.zeros(10, 6, dtype=torch.long),
                  "attention_mask": torch.zeros(10, 6, dtype=torch.long)})
    assert other.hexdigest() != digests[0][0]


def test_the_calibration_set_is_the_first_samples_in_order():
    batches = list(head(loader(TensorDataset(torch.arange(10.0)), 4), 6))
    assert [b[0].tolist() for b in batches] == [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0]]


@pytest.mark.parametrize(("result", "message"), [
    ([1, 2], "returned list; return {'calibration': Dataset"),
    ({"calibration": TensorDataset(torch.zeros(2))}, "returned no 'evaluation'"),
    ({"calibration": torch.zeros(2), "evaluation": TensorDataset(torch.zeros(2))},
     "calibration is Tensor, not a map-style torch.utils.data.Dataset"),
    ({"calibration": DataLoader(TensorDataset(torch.zeros(4)), shuffle=True),
      "evaluation": TensorDataset(torch.zeros(2))}, "calibration: the DataLoader shuffles"),
    ({"calibration": TensorDataset(torch.zeros(0)), "evaluation": TensorDataset(torch.zeros(2))},
     "calibration is empty"),
    ({"calibration": TensorDataset(torch.zeros(1)), "evaluation": TensorDataset(torch.zeros(1)),
      "test": 1}, "unknown key 'test'"),
])
def test_a_bad_source_result_is_one_line_naming_the_source(result, message):
    with pytest.raises(DataSourceError) as caught:
        if source_kind(result, "m:f") == "datasets":
            check_splits(result, "m:f")
    assert str(caught.value).startswith("data.source 'm:f': ") and message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("result", "message"), [
    (0.5, "returned float; return named numbers"),
    ({}, "returned an empty dict"),
    ({"top1": "high"}, "'top1' is str, not a number"),
    ({"top1": float("nan")}, "'top1' is nan"),
    ({3: 1.0}, "returned the name 3"),
    ({"agreement": 1.0}, "which the ONNX parity check uses"),
])
def test_a_metric_must_return_named_numbers(result, message):
    with pytest.raises(MetricError, match=message):
        named_numbers(result, "m:metric")


def test_named_metrics_reach_the_file_and_mlflow_under_their_names():
    scores = {"float": {"cos": 1.0, "mse": 0.0}, "baseline": {"cos": 0.9, "mse": 0.2},
              "adaround": {"cos": 0.95, "mse": 0.1}}
    metrics = metrics_file(scores, {"cos": 0.94, "agreement": 1.0})
    assert metrics["delta_cos"] == pytest.approx(0.05)
    assert metrics["adaround_vs_float_mse"] == pytest.approx(0.1)
    runs = by_run_role(metrics, "pipeline")
    assert runs["pipeline"]["delta_mse"] == pytest.approx(-0.1)
    assert runs["pipeline"]["onnx_cos"] == 0.94 and runs["adaround"]["cos"] == 0.95
    assert runs["baseline"]["delta_vs_float_cos"] == pytest.approx(-0.1)


def test_a_checkpoint_names_its_first_missing_and_unexpected_keys(tmp_path):
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    state = {("net." + k if k.startswith("2.") else k): v for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match=r"model.pretrained w.pt: does not match "
                       r"model.factory 'm:f': 2 missing key\(s\) \(first: '2.weight'\), 2 "
                       r"unexpected key\(s\) \(first: 'net.2.weight'\)"):
        check_keys(model, state, "w.pt", "m:f")
    wrong = dict(model.state_dict(), **{"0.bias": torch.zeros(4)})
    with pytest.raises(CheckpointMismatchError, match=r"'0.bias' has shape \(4,\)"):
        check_keys(model, wrong, "w.pt", "m:f")
    torch.save(model, tmp_path / "whole.pt")  # a pickled module, not a state_dict
    with pytest.raises(CheckpointMismatchError, match="cannot be read as a state_dict"):
        read_state_dict(str(tmp_path / "whole.pt"))


def test_calibration_batches_of_a_dataset_source_are_streamed_not_held(tmp_path, pipe,
                                                                        monkeypatch):
    """A Dataset source's calibration batches are read from the source each time they are
    iterated (item 0 reads one batch only) and the digest is checked after a full pass."""
    import counting_source

    from adaround_core.reconstruction.output_guard import held_out_indices, split_held_out
    from tasks.data import prepare_data
    from tasks.layout import Layout
    from tasks.stage_data import CalibrationBatches, open_data

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))
    pipe.project(tmp_path, overrides={
        "data": {"source": "counting_source:splits",
                 "batch_process": "counting_source:images", "kwargs": {"num_calibration": 40}},
        "calibration": {"batch_size": 16, "num_samples": 40}})
    params = pipe.params(tmp_path)
    dataset = prepare_data.fn(params, str(Layout(params).dataset))
    batches = open_data(params, dataset).calibration(torch.device("cpu"))
    assert isinstance(batches, CalibrationBatches) and batches.num_samples == 40
    counting_source.READS.clear()
    assert len(batches) == 3 and counting_source.READS == []  # the data stage counted them
    assert len(batches[-1]) == 8 and counting_source.READS == list(range(40))  # one pass
    counting_source.READS.clear()
    training, held = split_held_out(batches, 1, seed=0)  # reads up to the held-out batch
    (index,) = held_out_indices(3, 1, 0)
    assert counting_source.READS == list(range(16 * index + len(held[0])))
    counting_source.READS.clear()
    first = batches[0]
    assert first.shape == (16, 1, 8, 8) and counting_source.READS == list(range(16))
    counting_source.READS.clear()
    assert [len(b) for b in batches] == [16, 16, 8] and len(batches) == 3
    assert [len(b) for b in batches] == [16, 16, 8]  # a second pass reads the source again
    assert counting_source.READS == list(range(40)) * 2
    assert torch.equal(batches[0], first)

    data = open_data(params, dataset)  # the source changed since the data stage
    data._source["calibration"].images[39] += 1
    with pytest.raises(DataSourceError, match="differ from those the data stage recorded"):
        list(data.calibration(torch.device("cpu")))
