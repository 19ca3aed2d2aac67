"""Activation caches and layer results the current configuration no longer reaches.

What is reachable is found as the adaround stage finds it: the layer plan is walked in
order, each layer's key depending on the rounded weights of the layers before it. The walk
stops at the first layer without a valid result, since later layers' keys are unknown until
it is rounded. Everything else under ``<cache_dir>/activations``, ``<cache_dir>/frontiers``
(the forward passes one layer's capture leaves for the next), ``<cache_dir>/trash`` (finished
caches a killed run had not finished deleting) and ``<results_dir>/layers``
(leftover temporary files and directories included) is garbage. Call under the output lock:
a run in progress writes temporary files there.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from tasks.artifacts import Artifact, LayerResult
from tasks.cache_removal import TRASH
from tasks.layer_jobs import LayerJob, plan_job
from tasks.layer_results import valid_result
from tasks.layout import Layout, existing
from tasks.params import PipelineParams
from tasks.planning import plan_layers

SIZE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")  # binary units, as du -h prints them


@dataclass(frozen=True)
class Garbage:
    """A file or directory nothing reachable uses, and how many bytes it holds."""

    path: Path
    bytes: int


def _inputs(params: PipelineParams) -> tuple[Artifact, Artifact, Artifact]:
    """Dataset, float and calibrated checkpoints; without them nothing can be keyed."""
    layout = Layout(params)
    try:
        return (existing(layout.dataset, "data"), existing(layout.float_checkpoint, "train"),
                existing(layout.calibrated_checkpoint, "calibrate"))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"cannot tell which caches and results are in use: {err}") \
            from None


def reachable_paths(params: PipelineParams) -> set[Path]:
    """Cache and frontier directories and result files the current configuration uses:
    every layer's up to the first layer without a valid result (whose cache directory and
    frontiers are kept)."""
    inputs = _inputs(params)
    plan = plan_layers.fn(params, *inputs)
    paths: set[Path] = set()
    results: list[LayerResult] = []
    job: LayerJob | None = None
    for _ in plan.names:
        job = plan_job(params, *inputs, plan, results, upstream=job)
        paths.update((job.cache_dir(), job.frontier_dir()))
        result = valid_result(job)  # an invalid file is garbage: a run would delete it
        if result is None:
            break
        paths.add(job.result_path())
        results.append(result)
    return paths


def _size(path: Path) -> int:
    """Bytes of a file, or of every file under a directory (links not followed)."""
    if path.is_dir() and not path.is_symlink():
        return sum(f.lstat().st_size for f in path.rglob("*") if not f.is_dir())
    return path.lstat().st_size


def find_garbage(params: PipelineParams) -> list[Garbage]:
    """Everything under the caches' and results' folders that is not reachable, sorted."""
    keep = reachable_paths(params)
    roots = (Path(params.runtime.cache_dir) / "activations",
             Path(params.runtime.cache_dir) / "frontiers",
             Path(params.runtime.cache_dir) / TRASH,  # left by a run killed mid-deletion
             Path(params.runtime.results_dir) / "layers")
    return [Garbage(path, _size(path)) for root in roots if root.is_dir()
            for path in sorted(root.iterdir()) if path not in keep]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def collect_garbage(params: PipelineParams, dry_run: bool) -> list[Garbage]:
    """The unreachable caches and results; removed unless ``dry_run``."""
    items = find_garbage(params)
    if not dry_run:
        for item in items:
            _remove(item.path)
    return items


def human_size(size: int) -> str:
    """``size`` bytes in binary units: ``512 B``, ``1.5 KiB``, ``3.2 GiB``."""
    value = float(size)
    for unit in SIZE_UNITS[:-1]:
        if value < 1024:
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} {SIZE_UNITS[-1]}"


def format_garbage(items: list[Garbage], dry_run: bool) -> str:
    """One line per item with its size, then the total ("would free" or "freed")."""
    verb, total = ("would remove", "would free") if dry_run else ("removed", "freed")
    lines = [f"{verb} {human_size(item.bytes):>10}  {item.path}" for item in items]
    lines.append(f"{total} {human_size(sum(item.bytes for item in items))} "
                 f"({len(items)} item{'' if len(items) == 1 else 's'})")
    return "\n".join(lines)
