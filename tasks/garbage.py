"""Activation caches and layer results the current configuration no longer reaches.

What is reachable is found as the adaround stage finds it: the layer plan is walked in
order, each layer's key depending on the rounded weights of the layers before it. The walk
stops at the first layer without a valid result, since later layers' keys are unknown until
it is rounded. Results of torchrun runs are keyed by their number of ranks as well: the plan
is walked once more for each number of ranks the results record. Everything else under ``<cache_dir>/activations``, ``<cache_dir>/frontiers``
(the forward passes one layer's capture leaves for the next), ``<cache_dir>/trash`` (finished
caches a killed run had not finished deleting) and ``<results_dir>/layers``
(leftover temporary files and directories included) is garbage. Call under the output lock:
a run in progress writes temporary files there.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from tasks.artifacts import Artifact, LayerPlan, LayerResult
from tasks.cache_removal import TRASH
from tasks.disk_usage import tree_bytes
from tasks.layer_jobs import LayerJob, plan_job
from tasks.layer_results import WORLD_SIZE, InvalidResultError, result_metadata, valid_result
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
    frontiers are kept), in one process and under each number of torchrun ranks."""
    inputs = _inputs(params)
    plan = plan_layers.fn(params, *inputs)
    paths: set[Path] = set()
    for world_size in (None, *_result_world_sizes(params)):
        paths |= _walk(params, inputs, plan, world_size)
    return paths


def _result_world_sizes(params: PipelineParams) -> list[int]:
    """The numbers of torchrun ranks recorded by the result files (unreadable ones skipped:
    they are garbage anyway)."""
    sizes = set()
    for path in (Path(params.runtime.results_dir) / "layers").glob("*.safetensors"):
        try:
            size = result_metadata(path).get(WORLD_SIZE)
        except InvalidResultError:  # garbage, not a size
            continue
        if size and size.isdigit():
            sizes.add(int(size))
    return sorted(sizes)


def _walk(params: PipelineParams, inputs: tuple[Artifact, Artifact, Artifact], plan: LayerPlan,
          world_size: int | None) -> set[Path]:
    """The paths of :func:`reachable_paths` for results keyed by ``world_size`` ranks."""
    paths: set[Path] = set()
    results: list[LayerResult] = []
    job: LayerJob | None = None
    for _ in plan.names:
        job = plan_job(params, *inputs, plan, results, upstream=job, world_size=world_size)
        paths.update((job.cache_dir(), job.frontier_dir()))
        result = valid_result(job)  # an invalid file is garbage: a run would delete it
        if result is None:
            break
        paths.add(job.result_path())
        results.append(result)
    return paths


def find_garbage(params: PipelineParams) -> list[Garbage]:
    """Everything under the caches' and results' folders that is not reachable, sorted."""
    keep = reachable_paths(params)
    roots = (Path(params.runtime.cache_dir) / "activations",
             Path(params.runtime.cache_dir) / "frontiers",
             Path(params.runtime.cache_dir) / TRASH,  # left by a run killed mid-deletion
             Path(params.runtime.results_dir) / "layers")
    return [Garbage(path, tree_bytes(path)) for root in roots if root.is_dir()
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
