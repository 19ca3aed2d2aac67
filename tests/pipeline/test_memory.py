"""Peak memory of the adaround stage stays flat with 4x the calibration samples.

The model upsamples the 8x8 digits to 64x64 before two 16-channel convolutions, so one
layer's cached samples are 0.5 MB each (input + output): 4x the samples would add
~100 MB to the peak if they were held in memory. With the disk cache they are not.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, subprocess_env
from torch import nn

HERE = Path(__file__).resolve().parent
SAMPLES_1X = 64


class UpsampledCNN(nn.Module):
    """Digits upsampled 8x, two convolutions, pooling, a Linear head (the model factory)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=8)
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(self.up(x)))))
        return self.head(x.mean(dim=(2, 3)))


def _project(directory: Path, samples: int, pipe) -> Path:
    """Data, float and calibrated checkpoints for ``samples`` calibration samples."""
    from tasks.calibration import calibrate
    from tasks.data import prepare_data
    from tasks.layout import Layout
    from tasks.training import train_float_model

    pipe.project(directory, overrides={
        "data": {"kwargs": {"num_calibration": samples, "seed": 0}},
        "model": {"factory": "test_memory:UpsampledCNN", "kwargs": {"width": 16}},
        "train": {"kwargs": {"epochs": 0}},
        "calibration": {"batch_size": 64, "num_samples": samples},
        "adaround": {"num_steps": 5, "progress": False}})
    params = pipe.params(directory)
    layout = Layout(params)
    dataset = prepare_data.fn(params, str(layout.dataset))
    float_model = train_float_model.fn(params, dataset, str(layout.float_checkpoint))
    calibrate.fn(params, dataset, float_model, str(layout.calibrated_checkpoint))
    return directory


def _peak_rss_mb(project: Path, api_url: str) -> float:
    """Run the adaround stage in a subprocess; its peak resident set size in MiB."""
    env = subprocess_env(api_url, PYTHONPATH=os.pathsep.join([str(REPO), str(HERE)]))
    with open(project / "adaround.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "flows", "adaround"], cwd=project,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, (project / "adaround.log").read_text()[-4000:]
    return usage.ru_maxrss / 1024  # KiB on Linux


def _cache_bytes(project: Path) -> int:
    return sum(p.stat().st_size for p in (project / "cache").rglob("*.bin"))


def test_peak_memory_is_flat_in_the_number_of_calibration_samples(
        tmp_path, prefect_server, pipe):
    small = _project(tmp_path / "x1", SAMPLES_1X, pipe)
    large = _project(tmp_path / "x4", 4 * SAMPLES_1X, pipe)
    peak_1x = _peak_rss_mb(small, prefect_server)
    peak_4x = _peak_rss_mb(large, prefect_server)
    growth_in_memory_mb = 3 * SAMPLES_1X * 2 * 16 * 64 * 64 * 4 / 2**20  # conv2 in + out
    assert _cache_bytes(large) >= 3.9 * _cache_bytes(small)  # 4x the samples were cached
    print(f"peak RSS: {peak_1x:.0f} MiB at {SAMPLES_1X} samples, {peak_4x:.0f} MiB at "
          f"{4 * SAMPLES_1X} ({peak_4x / peak_1x:.3f}x; in memory would add "
          f"~{growth_in_memory_mb:.0f} MiB)")
    assert peak_4x <= 1.2 * peak_1x
    assert peak_4x - peak_1x < growth_in_memory_mb / 2


@pytest.fixture(autouse=True)
def _importable_model_factory(monkeypatch):
    """``test_memory:UpsampledCNN`` resolves in this process too (the task bodies)."""
    monkeypatch.syspath_prepend(str(HERE))
