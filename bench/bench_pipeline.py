"""Benchmark the Prefect pipeline against the bare library call doing the same work.

(a) Overhead: wall time of ``python -m flows adaround`` (fresh results and caches) against
    ``weight_reconstruction`` on the same calibrated checkpoint and config, each in a fresh
    process with the same thread setting; with no Prefect server (the command starts a
    temporary one, flows/api_server.py) and with a running ``prefect server start``
    (PREFECT_API_URL set).
    The fixed part is the same command rerun with every layer reused.
(b) Peak RSS of the adaround stage with 1x and 4x the calibration samples (disk cache).
(c) Kill-and-resume: the stage is SIGKILLed after 2 finished layers and rerun.

Prints a table and PASS/FAIL per target; writes JSON. From the repo root:

    .venv/bin/python -m bench.bench_pipeline            # ~4 min on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
OVERHEAD_RATIO, OVERHEAD_FIXED_S = 1.15, 10.0  # pipeline <= 1.15 x library + 10 s
RSS_RATIO = 1.2  # peak RSS at 4x samples <= 1.2 x the 1x figure
MAX_REDONE = 1  # a resumed run redoes at most the layer in flight
KILL_AFTER = 2  # finished layers on disk when the run is killed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=Path, default=REPO / "params.yaml",
                   help="base params (tracking is switched off)")
    p.add_argument("--samples", type=int, default=256, help="1x calibration samples")
    p.add_argument("--rss-steps", type=int, default=100,
                   help="adaround.num_steps of the RSS runs (memory does not depend on it)")
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary dir")
    p.add_argument("--out", type=Path, default=REPO / "bench/results/pipeline.json")
    return p.parse_args(argv)


# --- processes ---------------------------------------------------------------------------

def run(args: list[str], cwd: Path, env: dict, log: Path | None = None) -> dict:
    """Run a command; its wall seconds, exit code, output and peak RSS (MiB, with waited
    descendants)."""
    start = time.perf_counter()
    with open(log or os.devnull, "w") as out:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    result = {"wall_s": wall, "rc": os.waitstatus_to_exitcode(status),
              "peak_rss_mb": usage.ru_maxrss / 1024}
    result["output"] = log.read_text() if log else ""
    if result["rc"] != 0:
        raise RuntimeError(f"{' '.join(args)} exited {result['rc']}:\n{result['output'][-3000:]}")
    return result


def base_env(api_url: str | None, home: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(home),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONUNBUFFERED": "1"}
    env.pop("PREFECT_API_URL", None)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


@contextlib.contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """A ``prefect server start`` on loopback, for the runs with a running server."""
    from flows.api_server import free_port

    port = free_port()
    env = {**base_env(None, home), "PREFECT_SERVER_UI_ENABLED": "false"}
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([str(Path(PY).parent / "prefect"), "server", "start", "--host",
                             "127.0.0.1", "--port", str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("prefect server did not start")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


# --- projects ----------------------------------------------------------------------------

def make_project(directory: Path, base: Path, samples: int, steps: int | None = None) -> Path:
    """A project dir whose params are ``base`` with ``samples`` calibration samples."""
    raw = yaml.safe_load(base.read_text())
    raw["tracking"]["enabled"] = False
    raw["data"]["kwargs"]["num_calibration"] = samples
    raw["calibration"]["num_samples"] = samples
    if steps is not None:
        raw["adaround"]["num_steps"] = steps
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return directory


def prepare(project: Path, env: dict) -> None:
    for stage in ("data", "train", "calibrate"):
        run([PY, "-m", "flows", stage], project, env, project / f"{stage}.log")


def fresh(project: Path) -> None:
    """Forget every AdaRound result and activation cache (keep data and checkpoints)."""
    shutil.rmtree(project / "results", ignore_errors=True)
    shutil.rmtree(project / "cache", ignore_errors=True)
    (project / "checkpoints" / "adaround.safetensors").unlink(missing_ok=True)


def adaround(project: Path, env: dict, name: str) -> dict:
    result = run([PY, "-m", "flows", "adaround", "-v"], project, env, project / f"{name}.log")
    counts = re.findall(r"(\d+) layers rounded, (\d+) reused", result.pop("output"))
    result["rounded"], result["reused"] = map(int, counts[-1])
    return result


def library(project: Path, env: dict, name: str) -> dict:
    """The bare library call in a fresh process (this module's ``--library`` mode)."""
    dump = project / f"{name}.safetensors"
    result = run([PY, "-m", "bench.bench_pipeline", "--library", str(project), str(dump)],
                 project, env, project / f"{name}.log")
    result.update(json.loads(result.pop("output").strip().splitlines()[-1]))
    return result


def library_main(project: Path, dump: Path) -> None:
    """``--library PROJECT DUMP``: time ``weight_reconstruction`` on the project's calibrated
    checkpoint with its config; save the resulting state_dict; print JSON."""
    import torch

    from adaround_core.reconstruction.weight_reconstruction import weight_reconstruction
    from tasks.io import save_tensors
    from tasks.layout import Layout, existing
    from tasks.model_state import calibrated_model, calibration_inputs
    from tasks.params import load_params

    os.chdir(project)
    params = load_params("params.yaml")
    layout = Layout(params)
    dataset = existing(layout.dataset, "data")
    batches = calibration_inputs(params, dataset)
    model = calibrated_model(params, dataset, existing(layout.float_checkpoint, "train"),
                             existing(layout.calibrated_checkpoint, "calibrate"))
    start = time.perf_counter()
    report = weight_reconstruction(model, batches, None, params.adaround.model_dump())
    seconds = time.perf_counter() - start
    save_tensors(dump, model.state_dict())
    print(json.dumps({"call_s": seconds, "num_threads": report.num_threads,
                      "torch_threads": torch.get_num_threads()}))


def same_weights(checkpoint: Path, dump: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(checkpoint)), load_file(str(dump))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the measurements --------------------------------------------------------------------

NOOP_FLOW = "from prefect import flow\nflow(name='noop')(lambda: None)()\n"


def prefect_startup(work: Path, home: Path, api_url: str) -> dict:
    """Wall seconds of a process running one empty flow: temporary server on a fresh and on
    a used PREFECT_HOME, and against the running server."""
    cold_home = work / "prefect-home-cold"
    cold_home.mkdir()
    cold = run([PY, "-c", NOOP_FLOW], work, base_env(None, cold_home))["wall_s"]
    run([PY, "-c", NOOP_FLOW], work, base_env(None, home))  # PREFECT_HOME in use from now on
    return {"ephemeral_fresh_home_s": cold,
            "ephemeral_s": run([PY, "-c", NOOP_FLOW], work, base_env(None, home))["wall_s"],
            "server_s": run([PY, "-c", NOOP_FLOW], work, base_env(api_url, home))["wall_s"]}


def overhead(project: Path, home: Path, api_url: str) -> dict:
    """Library call vs the adaround stage (fresh, then all reused) in both Prefect modes."""
    out = {"library": library(project, base_env(None, home), "library")}
    for mode, url in (("ephemeral", None), ("server", api_url)):
        fresh(project)
        env = base_env(url, home)
        full = adaround(project, env, f"{mode}-fresh")
        reused = adaround(project, env, f"{mode}-reused")
        lib = out["library"]["call_s"]
        out[mode] = {"total_s": full["wall_s"], "rounded": full["rounded"],
                     "fixed_s": reused["wall_s"], "reused": reused["reused"],
                     "overhead_s": full["wall_s"] - lib,
                     "limit_s": OVERHEAD_RATIO * lib + OVERHEAD_FIXED_S,
                     "bit_identical_to_library": same_weights(
                         project / "checkpoints" / "adaround.safetensors",
                         project / "library.safetensors")}
        out[mode]["pass"] = out[mode]["total_s"] <= out[mode]["limit_s"]
    return out


def peak_rss(work: Path, base: Path, samples: int, steps: int, home: Path, api_url: str) -> dict:
    """Peak RSS of the adaround stage (and, for contrast, of the in-memory library call)."""
    out = {}
    for factor in (1, 4):
        project = make_project(work / f"rss-{factor}x", base, factor * samples, steps)
        env = base_env(api_url, home)
        prepare(project, env)
        stage = adaround(project, env, "rss")
        out[f"{factor}x"] = {"samples": factor * samples, "stage_peak_rss_mb":
                             stage["peak_rss_mb"],
                             "library_peak_rss_mb": library(project, env, "lib")["peak_rss_mb"],
                             "cache_mb": sum(p.stat().st_size for p in
                                             (project / "cache").rglob("*.bin")) / 2**20}
    out["ratio"] = out["4x"]["stage_peak_rss_mb"] / out["1x"]["stage_peak_rss_mb"]
    out["library_ratio"] = out["4x"]["library_peak_rss_mb"] / out["1x"]["library_peak_rss_mb"]
    out["pass"] = out["ratio"] <= RSS_RATIO
    return out


def _finished_layers(project: Path) -> list[str]:
    folder = project / "results" / "layers"
    return [p.name for p in folder.glob("*.safetensors")] if folder.is_dir() else []


def kill_and_resume(project: Path, home: Path, api_url: str) -> dict:
    """SIGKILL the stage after ``KILL_AFTER`` finished layers, rerun it, count the redone."""
    reference = (project / "checkpoints" / "adaround.safetensors").read_bytes()
    fresh(project)
    env = base_env(api_url, home)
    proc = subprocess.Popen([PY, "-m", "flows", "adaround"], cwd=project, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while len(_finished_layers(project)) < KILL_AFTER and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(_finished_layers(project))
    resumed = adaround(project, env, "resumed")
    total = resumed["rounded"] + resumed["reused"]
    recomputed_finished = done - resumed["reused"]
    redone = recomputed_finished + (1 if done < total else 0)  # + the layer in flight
    return {"layers": total, "finished_at_kill": done, "resumed_rounded": resumed["rounded"],
            "resumed_reused": resumed["reused"], "finished_layers_recomputed":
            recomputed_finished, "layers_redone": redone, "killed_rc": proc.returncode,
            "byte_identical": (project / "checkpoints" / "adaround.safetensors").read_bytes()
            == reference, "pass": redone <= MAX_REDONE and recomputed_finished == 0}


# --- report ------------------------------------------------------------------------------

def environment() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"python": platform.python_version(), "torch": torch.__version__,
            "prefect": _version("prefect"), "cpu_count": os.cpu_count(), "processor": cpu,
            "loadavg_start": os.getloadavg()}


def _version(name: str) -> str:
    from importlib import metadata

    return metadata.version(name)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def format_report(r: dict) -> str:
    o, m, k, s = r["overhead"], r["rss"], r["resume"], r["prefect_startup"]
    lib = o["library"]["call_s"]
    lines = [f"library weight_reconstruction call: {lib:.2f} s "
             f"(num_threads {o['library']['num_threads']})",
             f"empty Prefect flow process: Prefect's temporary server {s['ephemeral_s']:.1f} s "
             f"({s['ephemeral_fresh_home_s']:.1f} s on a fresh PREFECT_HOME), running server "
             f"{s['server_s']:.1f} s", "",
             f"{'adaround stage':<22}{'total s':>9}{'fixed s':>9}{'limit s':>9}"
             f"{'identical':>11}  target"]
    for mode in ("ephemeral", "server"):
        x = o[mode]
        lines.append(f"{mode:<22}{x['total_s']:>9.2f}{x['fixed_s']:>9.2f}{x['limit_s']:>9.2f}"
                     f"{str(x['bit_identical_to_library']):>11}  {_verdict(x['pass'])}")
    lines += ["", f"peak RSS of the stage: {m['1x']['stage_peak_rss_mb']:.0f} MiB at "
              f"{m['1x']['samples']} samples, {m['4x']['stage_peak_rss_mb']:.0f} MiB at "
              f"{m['4x']['samples']} ({m['ratio']:.3f}x, target <= {RSS_RATIO}x)  "
              f"{_verdict(m['pass'])}",
              f"  (in-memory library call: {m['1x']['library_peak_rss_mb']:.0f} -> "
              f"{m['4x']['library_peak_rss_mb']:.0f} MiB, {m['library_ratio']:.3f}x)",
              f"kill after {k['finished_at_kill']} of {k['layers']} layers: resumed run "
              f"rounded {k['resumed_rounded']}, reused {k['resumed_reused']}; layers redone "
              f"{k['layers_redone']} (target <= {MAX_REDONE}); byte-identical "
              f"{k['byte_identical']}  {_verdict(k['pass'])}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 4 and sys.argv[1] == "--library":
        library_main(Path(sys.argv[2]), Path(sys.argv[3]))
        return 0
    args = parse_args(argv)
    start = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    home = work / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    report: dict = {"env": environment(), "args": {k: str(v) for k, v in vars(args).items()}}
    (work / "server-home").mkdir(exist_ok=True)
    with prefect_server(work / "server-home") as api_url:  # its own database
        project = make_project(work / "main", args.params, args.samples)
        prepare(project, base_env(api_url, home))
        report["prefect_startup"] = prefect_startup(work, home, api_url)
        report["overhead"] = overhead(project, home, api_url)
        report["resume"] = kill_and_resume(project, home, api_url)
        report["rss"] = peak_rss(work, args.params, args.samples, args.rss_steps, home, api_url)
    report["env"]["loadavg_end"] = os.getloadavg()
    report["total_s"] = time.perf_counter() - start
    print(format_report(report))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nwritten to {args.out}")
    ok = all(report[k]["pass"] for k in ("rss", "resume")) and \
        all(report["overhead"][mode]["pass"] for mode in ("ephemeral", "server"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
