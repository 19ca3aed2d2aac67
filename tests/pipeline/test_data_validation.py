"""The data stage checks ``data.source``'s tensors before writing: one ``ValueError`` that
names the source and the tensor, and the previous dataset file left untouched."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from prefect.states import Failed

from adaround_core.demo.digits import digits_dataset
from tasks.data import TENSORS_FILE, DataSourceError, prepare_data
from tasks.io import load_tensors


def _damaged(damage, **kwargs) -> dict:
    data = digits_dataset(**kwargs)
    damage(data)
    return data


def _to_three_channels(data: dict) -> None:
    for key in ("train_x", "calib_x", "test_x"):
        data[key] = data[key].repeat(1, 3, 1, 1)


def _nan_in_calib_x(data: dict) -> None:
    data["calib_x"][5, 0, 2, 2] = float("nan")


# data.source callables of these tests ("test_data_validation:<name>"), one damage each
def three_channel_images(**kwargs):
    return _damaged(_to_three_channels, **kwargs)


def wrong_test_x_shape(**kwargs):
    return _damaged(lambda d: d.update(test_x=d["test_x"][:, :, :, :7]), **kwargs)


def train_lengths_differ(**kwargs):
    return _damaged(lambda d: d.update(train_y=d["train_y"][:-1]), **kwargs)


def float_labels(**kwargs):
    return _damaged(lambda d: d.update(train_y=d["train_y"].float()), **kwargs)


def nan_in_calib_x(**kwargs):
    return _damaged(_nan_in_calib_x, **kwargs)


def missing_test_y(**kwargs):
    return _damaged(lambda d: d.pop("test_y"), **kwargs)


def numpy_calib_x(**kwargs):
    return _damaged(lambda d: d.update(calib_x=d["calib_x"].numpy()), **kwargs)


def empty_test_set(**kwargs):
    return _damaged(lambda d: d.update(test_x=d["test_x"][:0], test_y=d["test_y"][:0]),
                    **kwargs)


@pytest.fixture(scope="module")
def params(tmp_path_factory, pipe):
    return pipe.params(pipe.project(tmp_path_factory.mktemp("data-validation")))


@pytest.fixture(scope="module")
def good_file(params, tmp_path_factory) -> Path:
    """The dataset (manifest and tensors) written by the good demo source."""
    manifest = tmp_path_factory.mktemp("good") / "dataset" / "manifest.json"
    return Path(prepare_data.fn(params, str(manifest)).path).parent / TENSORS_FILE


def _with_source(params, name: str):
    data = params.data.model_copy(update={"source": f"test_data_validation:{name}"})
    return params.model_copy(update={"data": data})


def test_the_demo_source_passes_and_is_written(good_file):
    data = load_tensors(good_file)
    assert data["calib_x"].shape == (64, 1, 8, 8)
    assert len(data["train_x"]) == len(data["train_y"])


@pytest.mark.parametrize(("source", "tensor", "detail"), [
    ("three_channel_images", "calib_x",
     r"model\.factory 'adaround_core\.demo\.models:DigitsCNN' cannot take calib_x of shape "
     r"\(16, 3, 8, 8\): Given groups=1, weight of size \[4, 1, 3, 3\]"),
    ("wrong_test_x_shape", "test_x", r"test_x samples have shape \(1, 8, 7\) but train_x "
                                     r"samples have \(1, 8, 8\)"),
    ("train_lengths_differ", "train_y", r"train_x has 1257 samples but train_y has 1256"),
    ("float_labels", "train_y", r"train_y is torch\.float32; labels must be integer"),
    ("nan_in_calib_x", "calib_x", r"calib_x has 1 NaN/Inf values \(first in sample 5\)"),
    ("missing_test_y", "test_y", r"returned no test_y"),
    ("numpy_calib_x", "calib_x", r"calib_x is ndarray, not a tensor"),
    ("empty_test_set", "test_x", r"test_x is empty"),
])
def test_bad_data_fails_clearly_and_keeps_the_previous_file(
        params, good_file, tmp_path, source, tensor, detail):
    out = tmp_path / "dataset"
    shutil.copytree(good_file.parent, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ValueError) as caught:
        prepare_data.fn(_with_source(params, source), str(out / "manifest.json"))
    message = str(caught.value)
    assert message.startswith(f"data.source 'test_data_validation:{source}': ")
    assert re.search(rf"\b{tensor}\b", message), message
    assert re.search(detail, message), message
    assert "\n" not in message and caught.value.__cause__ is None
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary file either


def test_a_broken_data_contract_is_not_retried():
    """The same data would fail again; an I/O error may not."""
    retry = prepare_data.retry_condition_fn
    assert not retry(prepare_data, None, Failed(data=DataSourceError("m:f", "bad")))
    assert retry(prepare_data, None, Failed(data=OSError("disk full")))
