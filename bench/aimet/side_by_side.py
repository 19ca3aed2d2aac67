"""Our AdaRound against AIMET's (aimet-torch 2.42) on the same model, data, bits and steps.

Runs in ``bench/aimet/.venv`` (made by ``bench/aimet/setup_env.sh``; our engine comes
from the source tree on PYTHONPATH). From the repository root:

    bash bench/aimet/run.sh                   # W4, W3, W2; 100 steps; 1 thread; seeds 0 1 2
    bash bench/aimet/run.sh --steps 1000

What is shared, per seed: one float DigitsCNN (trained here with that seed, BatchNorms
folded before either tool sees it), the same 256 calibration images in batches of 32,
per-channel symmetric weights with the integer range [-2^(b-1), 2^(b-1)-1], the same
steps per layer and AdaRound hyper-parameters (lambda 0.01, beta 20 -> 2, warm-up 0.2),
and the same torch thread setting. Each method runs in a fresh subprocess, so its wall
time and peak RSS are its own; methods are interleaved. Top-1 is averaged over the seeds
(the test split has 540 images: one image is 0.19 points).

Methods (per bit width):
  ours         weight_reconstruction on our calibrated W<b>A8 model (weight observer --observer)
  aimet        Adaround.apply_adaround with AIMET's default range setting (tf_enhanced) and
               its per-channel config; timed call = apply_adaround
  aimet-grid   the same AIMET AdaRound, but on our weight grid (our scales injected into its
               weight quantizers): isolates the rounding optimiser from the range setting

Every result is evaluated in one harness: our fake-quant model with the same calibrated
A8 activation quantizers, with the method's integer weights and grid written in. AIMET's
results are also evaluated in AIMET's own QuantizationSimModel (A8 activations, min-max,
its own placement: outputs of ops and the model input), reported as "AIMET QuantSim".
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from adaround_core import quantization as q
from adaround_core.demo.digits import load_digits_splits
from adaround_core.demo.models import DigitsCNN
from adaround_core.demo.training import top1, train_classifier
from adaround_core.quant.bn_folding import fold_batchnorms
from adaround_core.quant.quant_layers import quant_layers
from adaround_core.quant.quant_math import fake_quantize

ROOT = Path(__file__).resolve().parents[2]
CALIB_BATCH = 32
ACTIVATION_BITS = 8
METHODS = ("ours", "aimet", "aimet-grid")


# ---------------------------------------------------------------- shared model and data

def _data(seed: int):
    return load_digits_splits(seed=seed)


def _batches(data) -> list[torch.Tensor]:
    return list(data.calib_x.split(CALIB_BATCH))


def make_float_model(path: Path, seed: int) -> float:
    """Train the float DigitsCNN (fixed seed), fold its BatchNorms, save the state_dict;
    returns its top-1."""
    data = _data(seed)
    torch.manual_seed(seed)
    model = train_classifier(DigitsCNN(), data.train_x, data.train_y, seed=seed)
    fold_batchnorms(model, lambda m: m(data.calib_x[:CALIB_BATCH]))
    torch.save(model.state_dict(), path)
    return top1(model, data.test_x, data.test_y)


def load_float_model(path: Path, seed: int) -> torch.nn.Module:
    """The saved folded float model (the folded structure is rebuilt, then loaded)."""
    model = DigitsCNN().eval()
    fold_batchnorms(model, lambda m: m(_data(seed).calib_x[:2]))
    model.load_state_dict(torch.load(path, weights_only=True))
    return model


def calibrated(model: torch.nn.Module, batches: list[torch.Tensor], bits: int,
               observer: str) -> torch.nn.Module:
    """Our W<bits>A8 fake-quant model, calibrated, weight scales frozen, in CALIBRATION."""
    cm = q.prepare_qat_fx(model, q.QConfig(weight_bits=bits, activation_bits=ACTIVATION_BITS,
                                           weight_observer=observer))
    q.set_fake_quantize(cm, q.FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for batch in batches:
            cm(batch)
    return cm


def harness_top1(cm: torch.nn.Module, data) -> float:
    """Top-1 of ``cm`` in VALIDATION (fake-quant weights and A8 activations)."""
    q.set_fake_quantize(cm, q.FakeQuantState.VALIDATION)
    acc = top1(cm, data.test_x, data.test_y)
    q.set_fake_quantize(cm, q.FakeQuantState.CALIBRATION)
    return acc


def with_weights(cm: torch.nn.Module, weights: dict[str, torch.Tensor],
                 scales: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Write another tool's grid (per-channel scales) and weights into our model; each
    weight is put on that grid (round to nearest), as the tool's own evaluation does."""
    for name, layer in quant_layers(cm).items():
        fq = layer.weight_fake_quant
        with torch.no_grad():
            fq.scale.copy_(scales[name].reshape(fq.scale.shape))
            fq.freeze()
            layer.weight.copy_(fake_quantize(weights[name], fq.scale, fq.zero_point, fq.qmin,
                                             fq.qmax, layer.weight_axis))
    return cm


def our_scales(model: torch.nn.Module, bits: int, observer: str) -> dict[str, torch.Tensor]:
    """Our per-channel weight scales (they depend on the weights alone, not on data)."""
    cm = q.prepare_qat_fx(model, q.QConfig(weight_bits=bits, activation_bits=ACTIVATION_BITS,
                                           weight_observer=observer))
    scales = {}
    for name, layer in quant_layers(cm).items():
        layer.freeze_weight_qparams()
        scales[name] = layer.weight_fake_quant.scale.clone()
    return scales


# ---------------------------------------------------------------- measurement helpers

def rss_mb() -> float:
    """Current resident set size (MB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS, so that the next
    :func:`peak_rss_mb` covers only what runs after this call (evaluations done before,
    e.g. the nearest-rounding top-1, do not count); returns the current RSS (MB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return rss_mb()


def peak_rss_mb() -> float:
    """Peak resident set size since the last :func:`reset_peak_rss` (MB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- workers (subprocesses)

def worker_ours(spec: dict) -> dict:
    data, model = _data(spec["seed"]), load_float_model(Path(spec["model"]), spec["seed"])
    batches = _batches(data)
    start = time.perf_counter()
    cm = calibrated(model, batches, spec["bits"], spec["observer"])
    calibrate_s = time.perf_counter() - start
    nearest = harness_top1(cm, data)
    rss_before = reset_peak_rss()
    config = {"num_steps": spec["steps"], "num_threads": spec["threads"], "seed": spec["seed"],
              "progress": False}
    start = time.perf_counter()
    report = q.weight_reconstruction(cm, batches, None, config)
    wall = time.perf_counter() - start
    peak = peak_rss_mb()
    return {"top1": harness_top1(cm, data), "nearest_top1": nearest, "wall_s": wall,
            "calibrate_s": calibrate_s, "rss_before_mb": rss_before, "peak_rss_mb": peak,
            "layer_s": {r.name: r.seconds for r in report},
            "kept_nearest": [r.name for r in report if r.kept_nearest]}


def _aimet_classes(scales: dict[str, torch.Tensor] | None):
    """AIMET's Adaround, or a subclass whose weight quantizers get ``scales`` (our grid)
    right after AIMET computed its own."""
    from aimet_torch.adaround.adaround_weight import Adaround

    if scales is None:
        return Adaround

    class AdaroundOnOurGrid(Adaround):
        @staticmethod
        def _compute_param_encodings(quant_sim):
            Adaround._compute_param_encodings(quant_sim)
            for name, module in quant_sim.model.named_modules():
                if name in scales:
                    quantizer = module.param_quantizers["weight"]
                    s = scales[name].reshape(quantizer.shape)
                    quantizer.set_range(s * quantizer.qmin, s * quantizer.qmax)

    return AdaroundOnOurGrid


def _timed_layers(layer_s: dict[str, float]):
    """Patch AIMET's per-module optimisation to record each layer's seconds."""
    from aimet_torch._base.adaround.adaround_optimizer import AdaroundOptimizer

    original = AdaroundOptimizer.adaround_module.__func__
    names: dict[int, str] = {}

    def timed(cls, module, *args, **kwargs):
        start = time.perf_counter()
        original(cls, module, *args, **kwargs)
        layer_s[names.get(id(module), f"layer{len(layer_s)}")] = time.perf_counter() - start

    AdaroundOptimizer.adaround_module = classmethod(timed)
    return names


def _aimet_quantsim_top1(model, encodings: Path, bits: int, config_file: str, data,
                         batches) -> float:
    """Top-1 in AIMET's own QuantSim: param encodings frozen from ``encodings``, A8
    activation encodings (min-max) computed on the calibration batches."""
    from aimet_torch.common.defs import QuantScheme
    from aimet_torch.quantsim import QuantizationSimModel

    sim = QuantizationSimModel(model, data.calib_x[:1], quant_scheme=QuantScheme.post_training_tf,
                               default_param_bw=bits, default_output_bw=ACTIVATION_BITS,
                               config_file=config_file)
    sim.set_and_freeze_param_encodings(str(encodings))

    def calibrate(m):
        with torch.no_grad():
            for batch in batches:
                m(batch)

    sim.compute_encodings(calibrate)
    return top1(sim.model, data.test_x, data.test_y)


def worker_aimet(spec: dict) -> dict:
    import aimet_torch
    from aimet_torch.adaround.adaround_weight import AdaroundParameters
    from aimet_torch.common.defs import QuantScheme
    from aimet_torch.common.utils import AimetLogger
    from aimet_torch.model_preparer import prepare_model

    AimetLogger.set_level_for_all_areas(logging.WARNING)
    config_file = str(Path(aimet_torch.__file__).parent /
                      "common/quantsim_config/default_config_per_channel.json")
    seed, bits = spec["seed"], spec["bits"]
    data, model = _data(seed), load_float_model(Path(spec["model"]), seed)
    batches = _batches(data)
    grid = our_scales(model, bits, spec["observer"]) if spec["method"] == "aimet-grid" else None
    prepared = prepare_model(model)  # AIMET's standard first step (functional ops -> modules)
    loader = torch.utils.data.DataLoader(data.calib_x, batch_size=CALIB_BATCH, shuffle=False)
    params = AdaroundParameters(loader, num_batches=len(loader),
                                default_num_iterations=spec["steps"])
    layer_s: dict[str, float] = {}
    names = _timed_layers(layer_s)
    names.update({id(m): n for n, m in prepared.named_modules()})
    out_dir = Path(tempfile.mkdtemp(prefix="aimet-adaround-"))
    torch.manual_seed(seed)
    rss_before = reset_peak_rss()
    start = time.perf_counter()
    rounded = _aimet_classes(grid).apply_adaround(
        prepared, data.calib_x[:1], params, path=str(out_dir), filename_prefix="adaround",
        default_param_bw=bits, default_quant_scheme=QuantScheme.post_training_tf_enhanced,
        default_config_file=config_file)
    wall = time.perf_counter() - start
    peak = peak_rss_mb()
    encodings = out_dir / "adaround.encodings"
    param_enc = json.loads(encodings.read_text())["param_encodings"]
    scales = {k.removesuffix(".weight"): torch.tensor([c["scale"] for c in v])
              for k, v in param_enc.items()}
    rounded_w = {n: m.weight.detach().clone() for n, m in rounded.named_modules() if n in scales}
    fresh = load_float_model(Path(spec["model"]), seed)  # untouched by AIMET for sure
    float_w = {n: m.weight.detach().clone() for n, m in fresh.named_modules() if n in scales}
    adarounded = with_weights(calibrated(fresh, batches, bits, spec["observer"]), rounded_w, scales)
    nearest = with_weights(calibrated(fresh, batches, bits, spec["observer"]), float_w, scales)
    return {"top1": harness_top1(adarounded, data), "nearest_top1": harness_top1(nearest, data),
            "wall_s": wall, "rss_before_mb": rss_before, "peak_rss_mb": peak, "layer_s": layer_s,
            "quantsim_top1": _aimet_quantsim_top1(rounded, encodings, bits, config_file, data,
                                                  batches),
            "quantsim_nearest_top1": _aimet_quantsim_top1(prepare_model(fresh), encodings, bits,
                                                          config_file, data, batches),
            "versions": {"aimet_torch": getattr(aimet_torch, "__version__", "?")}}


def run_worker(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    result = worker_ours(spec) if spec["method"] == "ours" else worker_aimet(spec)
    result.update(method=spec["method"], bits=spec["bits"], steps=spec["steps"], seed=spec["seed"],
                  threads=torch.get_num_threads(), torch=torch.__version__)
    Path(spec["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------- parent

def spawn(spec: dict, workdir: Path) -> dict:
    """Run one method in a fresh interpreter; return its result."""
    stem = f"{spec['method']}-w{spec['bits']}-s{spec['seed']}-r{spec['repeat']}"
    spec_path, result_path = workdir / f"{stem}.spec.json", workdir / f"{stem}.json"
    spec_path.write_text(json.dumps({**spec, "result": str(result_path)}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "bench.aimet.side_by_side", "--worker",
                           str(spec_path)], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise RuntimeError(f"worker {stem} failed (exit {proc.returncode})")
    result = json.loads(result_path.read_text())
    result["process_s"] = time.perf_counter() - start
    return result


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (bits, method): top-1 averaged over seeds (each seed is its own float
    model, data split and AdaRound sampling), timings over every run."""
    groups: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for r in runs:
        groups[(r["bits"], r["method"])].append(r)
    rows = []
    for (bits, method), rs in sorted(groups.items(), key=lambda kv: (-kv[0][0],
                                                                     METHODS.index(kv[0][1]))):
        by_seed = {r["seed"]: r for r in rs}  # accuracy is deterministic per seed
        walls = [r["wall_s"] for r in rs]
        row = {"bits": bits, "method": method, "runs": len(rs), "seeds": sorted(by_seed),
               "wall_median_s": statistics.median(walls), "wall_min_s": min(walls),
               "walls_s": walls,
               "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
               "rss_before_mb": statistics.median(r["rss_before_mb"] for r in rs),
               "layer_s": {k: statistics.median(r["layer_s"][k] for r in rs)
                           for k in rs[0]["layer_s"]}}
        for key in ("top1", "nearest_top1", "quantsim_top1", "quantsim_nearest_top1"):
            if key in rs[0]:
                row[key + "_by_seed"] = {seed: r[key] for seed, r in by_seed.items()}
                row[key] = statistics.fmean(row[key + "_by_seed"].values())
        rows.append(row)
    return rows


def format_tables(result: dict) -> str:
    rows = {(r["bits"], r["method"]): r for r in result["rows"]}
    bits_list = sorted({b for b, _ in rows}, reverse=True)
    a = result["args"]
    runs = len(a["seeds"]) * a["repeats"]
    lines = [f"DigitsCNN (sklearn digits), seeds {a['seeds']}: mean float top-1 "
             f"{result['float_top1']:.2f} %; {a['steps']} steps/layer, {a['threads']} thread(s), "
             f"our weight observer {a['observer']}; top-1 = mean over seeds, wall = median of "
             f"{runs} runs (seeds x repeats, methods interleaved)", "",
             "top-1 (%), one evaluation harness (our fake-quant, same A8 activation quantizers):",
             f"{'bits':<6}{'float':>7}{'nearest':>9}{'ours':>8}{'AIMET':>8}{'AIMET-grid':>12}"
             f"{'AIMET nearest':>15}{'AIMET QuantSim':>16}"]
    for b in bits_list:
        ours, aimet, grid = rows[(b, "ours")], rows.get((b, "aimet")), rows.get((b, "aimet-grid"))
        lines.append(
            f"W{b}A8  {result['float_top1']:>7.2f}{ours['nearest_top1']:>9.2f}{ours['top1']:>8.2f}"
            f"{_f(aimet, 'top1'):>8}{_f(grid, 'top1'):>12}{_f(aimet, 'nearest_top1'):>15}"
            f"{_f(aimet, 'quantsim_top1'):>16}")
    lines += ["", "wall time of the AdaRound call (s) and peak RSS (MB):",
              f"{'bits':<6}{'ours':>8}{'AIMET':>8}{'ratio':>8}{'AIMET-grid':>12}{'ratio':>8}"
              f"{'RSS ours':>10}{'RSS AIMET':>11}"]
    for b in bits_list:
        ours, aimet, grid = rows[(b, "ours")], rows.get((b, "aimet")), rows.get((b, "aimet-grid"))
        lines.append(
            f"W{b}A8  {ours['wall_median_s']:>8.2f}{_f(aimet, 'wall_median_s'):>8}"
            f"{_ratio(ours, aimet):>8}{_f(grid, 'wall_median_s'):>12}{_ratio(ours, grid):>8}"
            f"{ours['peak_rss_mb']:>10.0f}{_f(aimet, 'peak_rss_mb', '.0f'):>11}")
    return "\n".join(lines)


def _f(row: dict | None, key: str, fmt: str = ".2f") -> str:
    return "-" if row is None or key not in row else format(row[key], fmt)


def _ratio(ours: dict, other: dict | None) -> str:
    return "-" if other is None else f"{ours['wall_median_s'] / other['wall_median_s']:.2f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both tools")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="one float model, data split and AdaRound seed each")
    p.add_argument("--repeats", type=int, default=1, help="timing repeats per seed")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--observer", default="minmax", choices=["minmax", "mse"],
                   help="our weight-scale observer (QConfig's default: minmax; AIMET uses "
                        "its default, tf_enhanced)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON result (default: bench/results/aimet_side_by_side_<steps>"
                        "[_<observer>].json)")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        run_worker(args.worker)
        return
    suffix = "" if args.observer == "minmax" else f"_{args.observer}"
    out = args.out or ROOT / f"bench/results/aimet_side_by_side_{args.steps}{suffix}.json"
    with tempfile.TemporaryDirectory(prefix="side-by-side-") as tmp:
        workdir = Path(tmp)
        torch.set_num_threads(args.threads)
        models, float_top1 = {}, {}
        for seed in args.seeds:
            models[seed] = workdir / f"float_folded_{seed}.pt"
            float_top1[seed] = make_float_model(models[seed], seed)
        runs = []
        for repeat in range(args.repeats):
            for seed in args.seeds:
                for bits in args.bits:
                    for method in args.methods:
                        spec = {"method": method, "bits": bits, "steps": args.steps,
                                "threads": args.threads, "seed": seed, "repeat": repeat,
                                "observer": args.observer, "model": str(models[seed])}
                        runs.append(spawn(spec, workdir))
                        print(f"  seed {seed} repeat {repeat} W{bits} {method:<10} top-1 "
                              f"{runs[-1]['top1']:6.2f}  wall {runs[-1]['wall_s']:6.2f} s",
                              file=sys.stderr)
    result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "float_top1": statistics.fmean(float_top1.values()),
              "float_top1_by_seed": float_top1, "rows": summarise(runs), "runs": runs,
              "machine": _machine(), "command": " ".join(sys.argv)}
    print(format_tables(result))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}", file=sys.stderr)


def _machine() -> dict:
    import platform

    cpu = platform.processor()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "loadavg": os.getloadavg()}


if __name__ == "__main__":
    main()
