"""Several pipeline variants at once, each a task on the configured task runner.

    python -m flows sweep -V quant.weight_bits=2 -V quant.weight_bits=4
    python -m flows sweep -V "quant.weight_bits=2,adaround.num_steps=1000" -V ""   # "" = as is

A variant is the params plus its overrides (``section.key=value``, comma-separated).
Each gets its own runtime dirs under ``<results_dir>/sweep/<variant>/`` (data,
checkpoints, results, cache), so variants never share a file or a lock. With
``runtime.task_runner: dask`` and ``runtime.dask_address`` the variants run at once on
the workers of that existing Dask cluster; give the workers ``PREFECT_API_URL`` (else
each starts its own temporary Prefect server).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.runtime import anchored, make_task_runner
from tasks.io import write_json
from tasks.params import PipelineParams, apply_overrides, parse_params
from tasks.run_logging import run_logger

# A comma starts a new override only where ``section.key=`` follows, so list values
# such as ``adaround.b_range=[20,2]`` stay whole.
_OVERRIDE_SPLIT = re.compile(r",\s*(?=[A-Za-z_]\w*(?:\.\w+)+\s*=)")


@dataclass(frozen=True)
class Variant:
    """One configuration of a sweep: its name (also its directory) and params."""

    name: str
    overrides: tuple[str, ...]
    params: PipelineParams


def split_overrides(spec: str) -> tuple[str, ...]:
    """``"a.b=1,c.d=[2,3]"`` -> ``("a.b=1", "c.d=[2,3]")``; ``""`` -> ``()``."""
    return tuple(p.strip() for p in _OVERRIDE_SPLIT.split(spec) if p.strip())


def variant_name(overrides: tuple[str, ...]) -> str:
    """A readable, file-system-safe name: ``quant.weight_bits-2``; ``base`` for none."""
    if not overrides:
        return "base"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(overrides)).strip("-")
    if len(name) > 60:
        name = f"{name[:51]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return name


def make_variants(base: PipelineParams, specs: list[str], root: Path) -> list[Variant]:
    """Validated variants, with runtime dirs under ``root/<name>`` and the thread runner
    inside each variant (the sweep itself is what is spread over the cluster)."""
    if not specs:
        raise ValueError("a sweep needs at least one variant (-V section.key=value)")
    variants: list[Variant] = []
    for spec in specs:
        overrides = split_overrides(spec)
        name = variant_name(overrides)
        if name in {v.name for v in variants}:
            name = f"{name}-{len(variants)}"
        directory = Path(root) / name
        runtime = {"data_dir": str(directory / "data"),
                   "checkpoint_dir": str(directory / "checkpoints"),
                   "results_dir": str(directory / "results"),
                   "cache_dir": str(directory / "cache"),
                   "task_runner": "threads", "dask_address": None}
        raw = apply_overrides(base.model_dump(mode="json"), list(overrides))
        raw["runtime"] = {**raw.get("runtime", {}), **runtime}
        variants.append(Variant(name, overrides, parse_params(raw)))
    return variants


@task(name="pipeline-variant", task_run_name="variant-{name}", cache_policy=NO_CACHE,
      persist_result=False)
def run_variant(name: str, params: PipelineParams) -> dict:
    """The whole pipeline for one variant (a subflow run); returns its metrics."""
    # Imported here, on the worker: Dask ships this function by value, and a flow shipped
    # along with it would lose the module globals its type hints need (PipelineParams).
    from flows.pipeline import pipeline_flow

    run_logger(__name__).info("variant %s: outputs under %s", name,
                              Path(params.runtime.results_dir).parent)
    return pipeline_flow.with_options(flow_run_name=f"pipeline-{name}")(params)


def _summary_rows(variants: list[Variant], metrics: dict[str, dict]) -> list[dict]:
    rows = []
    for v in variants:
        m = metrics.get(v.name)
        row = {"variant": v.name, "overrides": ", ".join(v.overrides) or "(none)",
               "results_dir": v.params.runtime.results_dir}
        if m is None:
            row["status"] = "failed"
        else:
            name = next(iter(m["adaround"]))  # the metric's first name (digits: top1)
            row.update(status="completed", **{f"{role}_{name}": m[role][name]
                                              for role in ("float", "baseline", "adaround")},
                       **{f"delta_{name}": m[f"delta_{name}"]})
        rows.append(row)
    return rows


@flow(persist_result=False, name="adaround-sweep")
def sweep_flow(params: PipelineParams, specs: list[str]) -> dict[str, dict]:
    """Run every variant at once on this flow's task runner; write
    ``<results_dir>/sweep/summary.json`` and a table artifact; fail if any variant failed."""
    params = anchored(params, Path.cwd())  # workers may run in another directory
    root = Path(params.runtime.results_dir) / "sweep"
    variants = make_variants(params, specs, root)
    futures = {v.name: run_variant.submit(v.name, v.params) for v in variants}
    metrics: dict[str, dict] = {}
    errors: dict[str, str] = {}
    for name, future in futures.items():
        try:
            metrics[name] = future.result()
        except Exception as err:  # report every variant before failing
            errors[name] = f"{type(err).__name__}: {err}"
    rows = _summary_rows(variants, metrics)
    write_json(root / "summary.json", {"variants": rows, "errors": errors})
    create_table_artifact(rows, key="adaround-sweep", description="one row per variant")
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(variants)} variants failed: {errors}")
    return metrics


def run_sweep(params: PipelineParams, specs: list[str]) -> dict[str, dict]:
    """The sweep flow on the task runner ``params`` choose (threads, or Dask on a cluster)."""
    return sweep_flow.with_options(task_runner=make_task_runner(params))(params, specs)


def format_sweep(metrics: dict[str, dict]) -> str:
    """One line per variant: the metric's first name (digits: top-1) of float / baseline /
    AdaRound."""
    w = max([len("variant"), *map(len, metrics)]) + 2
    lines = [f"{'variant':<{w}}{'float':>8}{'baseline':>10}{'AdaRound':>10}{'delta':>8}"]
    for name, m in metrics.items():
        key = next(iter(m["adaround"]))
        lines.append(f"{name:<{w}}{m['float'][key]:>8.2f}{m['baseline'][key]:>10.2f}"
                     f"{m['adaround'][key]:>10.2f}{m[f'delta_{key}']:>+8.2f}")
    return "\n".join(lines)
