"""The adaround stage at real scale: wall time split, peak memory, peak cache disk, FLOP floor.

One example model (torchvision ResNet-18 / MobileNetV2 at 224 px with random weights, or the
pretrained all-MiniLM-L6-v2) with N calibration samples goes through the real pipeline in its
own directory: ``python -m flows data``, ``train`` (no trainer: the factory's weights),
``calibrate``, then the measured ``python -m flows adaround`` with AdaRound on all N samples
(``adaround.num_batches`` = N / batch size). Per run it reports:

* wall time of the adaround stage's process, split into capture (the layers' activation cache
  tasks: running the models and writing the cache), rounding (the AdaRound optimisation of
  every layer) and orchestration (the rest: imports, Prefect, planning, the checkpoint);
* peak RSS of that process (``wait4``), peak disk under ``runtime.cache_dir`` (polled
  every 0.2 s) against the largest layer's cache (inputs and targets);
* per layer, seconds per AdaRound step against its fwd+bwd FLOP floor, the step's FLOPs over
  the machine's best measured GEMM / convolution rate with all cores
  (``bench.bench_flop_floor.machine_rates``); summarised over the layers that hold 90 % of the
  FLOPs.

Run from the repo root, one model and size per piece (minutes each on 2 cores):

    .venv/bin/python -m bench.bench_scale --model resnet18 --samples 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import yaml
from torch import nn

from bench.bench_flop_floor import FLOP_SHARE, WITHIN, machine_rates
from tasks.disk_usage import tree_bytes

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "resnet18": ("examples.vision.models:resnet18", "examples.vision.data:photo_crops",
                 "examples.vision.metrics:output_agreement", {"image_size": 224}),
    "mobilenet_v2": ("examples.vision.models:mobilenet_v2", "examples.vision.data:photo_crops",
                     "examples.vision.metrics:output_agreement", {"image_size": 224}),
    "minilm": ("examples.minilm.model:minilm", "examples.minilm.data:stdlib_text",
               "examples.minilm.metrics:embedding_agreement", {"max_length": 48}),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, choices=sorted(MODELS))
    p.add_argument("--samples", type=int, default=512, help="calibration samples")
    p.add_argument("--steps", type=int, default=100, help="AdaRound steps per layer")
    p.add_argument("--bits", default="4,8", help="weight,activation bit widths")
    p.add_argument("--batch-size", type=int, default=32, help="calibration batch size")
    p.add_argument("--adaround-batch-size", type=int, default=None,
                   help="samples per AdaRound step (default: the pipeline's, the "
                        "calibration batch size)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="the run's directory (default: bench/results/scale/<model>_<samples>)")
    p.add_argument("--out", type=Path, default=None, help="JSON (default: <workdir>.json)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one pipeline setting (YAML value), e.g. "
                        "runtime.frontier_memory_mb=0; repeatable")
    return p.parse_args(argv)


def apply_overrides(params: dict, overrides: list[str]) -> dict:
    """``params`` with each ``section.key=value`` of ``overrides`` set (value read as YAML)."""
    for item in overrides:
        path, sep, value = item.partition("=")
        section, dot, key = path.partition(".")
        if not sep or not dot or section not in params:
            raise SystemExit(f"--set {item}: expected SECTION.KEY=VALUE with a section of "
                             f"params.yaml ({', '.join(params)})")
        params[section][key] = yaml.safe_load(value)
    return params


def pipeline_params(args: argparse.Namespace, workdir: Path) -> dict:
    """The root params.yaml made this example's: its factory, data, metric, sizes, dirs."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    factory, source, metric, data_kwargs = MODELS[args.model]
    weight_bits, activation_bits = (int(b) for b in args.bits.split(","))
    params["data"] = {"source": source, "batch_process": None, "kwargs": {
        "num_calibration": args.samples, "num_evaluation": 64, "seed": 0, **data_kwargs}}
    params["model"] = {"factory": factory, "kwargs": {}, "pretrained": None}
    params["train"] = {"trainer": None, "kwargs": {}}
    params["quant"].update(weight_bits=weight_bits, activation_bits=activation_bits,
                           weight_observer="minmax")
    params["calibration"] = {"batch_size": args.batch_size, "num_samples": args.samples}
    params["adaround"].update(num_steps=args.steps, batch_size=args.adaround_batch_size,
                              num_batches=-(-args.samples // args.batch_size))
    params["eval"].update(metric=metric, batch_size=args.batch_size)
    params["tracking"]["enabled"] = False
    params["runtime"].update({key: str(workdir / key.removesuffix("_dir")) for key in
                              ("data_dir", "checkpoint_dir", "results_dir", "cache_dir")})
    return params


def run_stage(stage: str, params_file: Path, cache_dir: Path | None = None) -> dict:
    """Run ``python -m flows <stage>``: wall time, peak RSS of that process (``wait4``), and
    with ``cache_dir`` the peak disk under it and when the RSS peaked (polled; the stage
    runs with ``-v``, so the log line before the peak says which task was running)."""
    log = params_file.parent / f"{stage}.log"
    verbose = ["-v"] if cache_dir else []
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows", stage, "--params",
                                 str(params_file), *verbose], cwd=REPO, stdout=out, stderr=out,
                                env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        poller = _Poller(proc.pid, cache_dir, log) if cache_dir else None
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"python -m flows {stage} failed: {log.read_text()[-3000:]}")
    result = {"wall_s": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "peak_cache_bytes": 0}
    if poller is not None:
        result.update(poller.stop())
    return result


class _Poller:
    """Every 0.2 s: the disk under ``cache_dir``, the RSS of process ``pid`` and, when that
    peaks, the last line of its ``log``."""

    def __init__(self, pid: int, cache_dir: Path, log: Path) -> None:
        self.pid, self.cache_dir, self.log = pid, cache_dir, log
        self.peak_disk, self.peak_rss, self.peak_rss_line = 0, 0, ""
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.2):
            self.peak_disk = max(self.peak_disk, tree_bytes(self.cache_dir))
            rss = _rss_bytes(self.pid)
            if rss > self.peak_rss:
                self.peak_rss, self.peak_rss_line = rss, _last_line(self.log)

    def stop(self) -> dict:
        self._done.set()
        self._thread.join()
        return {"peak_cache_bytes": self.peak_disk, "polled_peak_rss_bytes": self.peak_rss,
                "peak_rss_during": self.peak_rss_line}


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _last_line(log: Path) -> str:
    """The last line of ``log`` (being written) so far that names a layer's task."""
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if "samples in" in line or "layers:" in line or "rounding" in line:
            return line.strip()[:200]
    return ""


def layer_floor(report: list[dict], rates: dict, kinds: dict[str, str]) -> dict:
    """Seconds per step over the FLOP floor, per layer and over the layers that hold
    ``FLOP_SHARE`` of the step FLOPs. The floor divides by the higher of the machine's GEMM
    and convolution rates (``over_floor``, the strict one) and, beside it, by the rate of
    the layer's own kind (``over_own``: a convolution's by the convolution rate)."""
    best = max(rates.values())
    rows = [{"layer": r["layer"], "step_flops": r["step_flops"], "threads": r["threads"],
             "kind": kinds.get(r["layer"], "gemm"), "step_s": r["seconds"] / r["num_steps"],
             "floor_s": r["step_flops"] / best} for r in report]
    for row in rows:
        row["over_floor"] = row["step_s"] / row["floor_s"]
        row["over_own"] = row["step_s"] * rates[row["kind"]] / row["step_flops"]
    total, running, heavy = sum(r["step_flops"] for r in rows), 0, []
    for row in sorted(rows, key=lambda r: -r["step_flops"]):
        if running >= FLOP_SHARE * total:
            break
        heavy.append(row)
        running += row["step_flops"]
    return {"layers": rows, "heavy_layers": len(heavy),
            "heavy_worst_over_floor": max(r["over_floor"] for r in heavy),
            "heavy_within_target": sum(r["over_floor"] <= WITHIN for r in heavy),
            "heavy_worst_over_own": max(r["over_own"] for r in heavy),
            "heavy_within_own": sum(r["over_own"] <= WITHIN for r in heavy)}


def layer_kinds(factory: str, names: list[str]) -> dict[str, str]:
    """``conv`` or ``gemm`` per layer name, from a fresh model of ``factory``."""
    from tasks.io import import_object

    model = import_object(factory)()
    return {name: "conv" if isinstance(model.get_submodule(name), nn.modules.conv._ConvNd)
            else "gemm" for name in names}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = (args.workdir or REPO / "bench/results/scale" / f"{args.model}_{args.samples}")
    workdir.mkdir(parents=True, exist_ok=True)
    params = apply_overrides(pipeline_params(args, workdir), args.set)
    params_file = workdir / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    setup = {stage: run_stage(stage, params_file)
             for stage in ("check", "data", "train", "calibrate")}
    print(f"setup {setup}", flush=True)
    stage = run_stage("adaround", params_file, workdir / "cache")
    report = json.loads((workdir / "results" / "adaround_report.json").read_text())
    capture = sum(r["capture_seconds"] for r in report)
    rounding = sum(r["seconds"] for r in report)
    rates = machine_rates(repeats=5)
    result = {
        "model": args.model, "samples": args.samples, "steps": args.steps, "bits": args.bits,
        "overrides": args.set,
        "step_batch": args.adaround_batch_size or args.batch_size,
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "torch": torch.__version__,
                    "rates_flops": rates},
        "setup_wall_s": setup, "adaround_wall_s": stage["wall_s"],
        "capture_s": capture, "rounding_s": rounding,
        "orchestration_s": stage["wall_s"] - capture - rounding,
        "capture_share": capture / stage["wall_s"],
        "peak_rss_bytes": stage["peak_rss_bytes"],
        "peak_cache_bytes": stage["peak_cache_bytes"],
        "peak_rss_during": stage.get("peak_rss_during", ""),
        "largest_layer_cache_bytes": max(r["cache_bytes"] for r in report),
        "capture_method": report[0]["capture_method"],
        "floor": layer_floor(report, rates,
                             layer_kinds(MODELS[args.model][0], [r["layer"] for r in report])),
    }
    result["peak_cache_over_largest"] = (result["peak_cache_bytes"]
                                         / result["largest_layer_cache_bytes"])
    out = args.out or workdir.with_suffix(".json")
    out.write_text(json.dumps(result, indent=1))
    summary = {k: v for k, v in result.items() if k not in ("floor", "machine")}
    summary.update({k: v for k, v in result["floor"].items() if k != "layers"})
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
