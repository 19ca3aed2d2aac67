"""Peak memory of the adaround stage stays flat with 4x the calibration samples.

The model upsamples the 8x8 digits to 64x64 before two 16-channel convolutions, so one
layer's cached samples are 0.5 MB each (input + output): 4x the samples would add
~100 MB to the peak if they were held in memory. With the disk cache they are not, and the
paused passes handed to the next layer in memory stop at ``runtime.frontier_memory_mb``
(8 MiB here, below both runs' frontiers). Large blocks are unmapped when freed
(:func:`tasks.allocator.map_large_allocations`). The runs here keep it that way inside the
tasks too (``runtime.reuse_freed_memory: none``): a task that reuses its freed memory
(:func:`tasks.allocator.heap_reuse`, tested below) holds its heap's high-water mark until
it ends, which depends on thread timing: 700-840 MiB from run to run of one project on
this model, against 618-623 MiB without, a spread that would hide the growth measured.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
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
        "adaround": {"num_steps": 5, "progress": False},
        "runtime": {"frontier_memory_mb": 8, "reuse_freed_memory": "none"}})
    params = pipe.params(directory)
    layout = Layout(params)
    dataset = prepare_data.fn(params, str(layout.dataset))
    float_model = train_float_model.fn(params, dataset, str(layout.float_checkpoint))
    calibrate.fn(params, dataset, float_model, str(layout.calibrated_checkpoint))
    return directory


def _peak_rss_mb(project: Path, api_url: str) -> float:
    """Run the adaround stage in a subprocess; its peak resident set size in MiB (its own
    high-water mark, polled: ``wait4``'s maximum starts at this large process's RSS)."""
    env = subprocess_env(api_url, PYTHONPATH=os.pathsep.join([str(REPO), str(HERE)]))
    peak_kib = 0
    with open(project / "adaround.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "flows", "adaround"], cwd=project,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            peak_kib = max(peak_kib, _high_water_kib(proc.pid))
            time.sleep(0.02)
    assert proc.returncode == 0, (project / "adaround.log").read_text()[-4000:]
    return peak_kib / 1024


def _high_water_kib(pid: int) -> int:
    """VmHWM of process ``pid`` (0 once it has exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    field = status.split("VmHWM:")
    return int(field[1].split()[0]) if len(field) > 1 else 0


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


ALLOCATIONS = """
import sys
import torch
if sys.argv[1] == "mapped":
    from tasks.allocator import map_large_allocations
    assert map_large_allocations()
kept = []
for _ in range(60):  # 8 MiB temporaries, 4 MiB of each kept a while: a capture's pattern
    a = torch.empty(2 << 20).fill_(1.0)
    kept.append((a + 1)[: 1 << 20].clone())
    del a
    kept = kept[-10:]
status = open("/proc/self/status").read().split("VmHWM:")[1]  # peak RSS since exec, KiB
print(int(status.split()[0]) // 1024)
"""


def _allocations_peak_mb(mode: str) -> int:
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "0", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", ALLOCATIONS, mode], env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return int(out.split()[-1])


def test_large_blocks_are_unmapped_when_freed():
    """With glibc's moving mmap threshold, freed blocks of a few MiB stay in the heap behind
    the kept ones; with the threshold fixed, the peak is what is alive."""
    moving, mapped = _allocations_peak_mb("moving"), _allocations_peak_mb("mapped")
    assert mapped < moving - 30, (mapped, moving)


REUSE = """
import json, resource
import torch
from tasks.allocator import heap_reuse, map_large_allocations
assert map_large_allocations()

def rss_mb():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024

def faults_per_step():  # a rounding step's pattern: the same 16 MiB allocated and freed
    faults = []
    for _ in range(40):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(4 << 20).fill_(1.0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults

mapped = faults_per_step()
with heap_reuse(enabled=False) as switched_off:
    still_mapped = faults_per_step()
rss_before = rss_mb()
with heap_reuse() as tuned:
    reused = faults_per_step()
    torch.empty(64 << 20).fill_(1.0)  # 256 MiB, freed inside the block
print(json.dumps([tuned, mapped, reused, rss_mb() - rss_before, switched_off, still_mapped]))
"""


def test_the_rounding_reuses_freed_memory_and_gives_it_back_afterwards():
    """Inside ``heap_reuse`` a block allocated and freed at every step stops being faulted
    in after the first steps (mapped, or with the switch off, it is faulted in at every
    step); the memory freed inside goes back to the system at its end."""
    import json

    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "0", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", REUSE], env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    tuned, mapped, reused, rss_growth_mb, switched_off, still_mapped = \
        json.loads(out.splitlines()[-1])
    assert tuned and not switched_off
    assert min(still_mapped) >= 4000, still_mapped  # a task runtime.reuse_freed_memory leaves out
    assert min(mapped) >= 4000, mapped  # 16 MiB is 4096 pages
    assert sum(reused[20:]) < 4000, reused  # steady state: not one block's faults in 20 steps
    assert rss_growth_mb < 32, rss_growth_mb


GIVE_BACK = """
import json
import torch
from adaround_core.calibration.held_frontiers import HELD_FRONTIERS
from adaround_core.calibration.segmented_forward import Frontier
from tasks.activation_cache import GIVE_BACK_BYTES, giving_back_memory
from tasks.allocator import heap_reuse, map_large_allocations
assert map_large_allocations()

def rss_mb():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) // 1024

def consumed(count):  # a capture's batches: each takes (and frees) a held frontier
    token = HELD_FRONTIERS.new_token()
    for i in range(count):  # held before the capture starts
        HELD_FRONTIERS.offer(token, i, Frontier(0, {"x": torch.ones(4 << 20)}), 1 << 40)
    return (HELD_FRONTIERS.take(token, i) is None for i in range(count))

def written(count):  # a capture's pairs, queued for the writer, freed once written
    pairs = [(torch.ones(4 << 20), torch.ones(1)) for _ in range(count)]
    for i in range(count):
        yield pairs[i]
        pairs[i] = None

count = GIVE_BACK_BYTES // (16 << 20)  # 16 MiB each: the threshold in all
growth = {}
for source in (consumed, written):
    for name, wrap in (("kept", iter), ("given back", giving_back_memory)):
        with heap_reuse():
            before = rss_mb()
            for _ in wrap(source(count)):
                pass
            growth[f"{source.__name__} {name}"] = rss_mb() - before
print(json.dumps([growth, count * 16]))
"""


def test_a_capture_gives_back_the_frontiers_and_shards_it_freed():
    """Inside ``heap_reuse`` the memory of the held frontiers a capture consumes, and of the
    pairs it hands to the cache writer, would stay with the process (beside the next
    boundary's); the capture's items return it to the system once ``GIVE_BACK_BYTES``
    moved."""
    import json

    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "0", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", GIVE_BACK], env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    growth, moved_mb = json.loads(out.splitlines()[-1])
    for source in ("consumed", "written"):
        assert growth[f"{source} kept"] > 0.8 * moved_mb, growth  # still resident
        assert growth[f"{source} given back"] < 32, growth  # returned at the threshold


def test_each_reuse_setting_names_the_tasks_that_reuse_memory():
    from tasks.allocator import REUSE_SETTINGS, reuses_memory
    from tasks.params import RuntimeParams

    assert [(reuses_memory(s, "capture"), reuses_memory(s, "rounding"))
            for s in ("all", "rounding", "none")] == [(True, True), (False, True), (False, False)]
    assert set(REUSE_SETTINGS) == set(RuntimeParams.model_fields["reuse_freed_memory"]
                                      .annotation.__args__)
