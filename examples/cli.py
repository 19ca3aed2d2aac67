"""Command-line options shared by the examples' ``__main__`` modules."""

from __future__ import annotations

import argparse

from adaround_core import quantization as q
from examples.chain import ChainResult, quantize_and_compare


def add_quantization_options(parser: argparse.ArgumentParser, steps: int) -> None:
    """``--weight-bits --activation-bits (0 = float activations) --weight-observer --steps
    --batch-size --adaround-batch-size --seed``, and the reconstruction variants
    ``--granularity --drop-prob --activation-lr --guard``."""
    parser.add_argument("--weight-bits", type=int, default=4)
    parser.add_argument("--activation-bits", type=int, default=8,
                        help="0: activations stay float (weight-only quantization)")
    # minmax: on all-MiniLM-L6-v2, AdaRound beats nearest rounding with min-max weight scales
    # and not with MSE-searched ones after 200 steps (examples/README.md, "Measured")
    parser.add_argument("--weight-observer", default="minmax", choices=["minmax", "mse"])
    parser.add_argument("--steps", type=int, default=steps, help="AdaRound steps per layer")
    parser.add_argument("--batch-size", type=int, default=32, help="calibration batch size")
    parser.add_argument("--adaround-batch-size", type=int, default=8,
                        help="samples per AdaRound step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--granularity", default="layer", choices=["layer", "block"],
                        help="block: reconstruct whole blocks (BRECQ)")
    parser.add_argument("--drop-prob", type=float, default=0.0,
                        help="QDrop: probability of passing an activation unquantized")
    parser.add_argument("--activation-lr", type=float, default=None,
                        help="learn the activation scales (LSQ) at this learning rate")
    parser.add_argument("--guard", default="layer", choices=["layer", "output", "off"])


def qconfig_from(args: argparse.Namespace) -> q.QConfig:
    """The ``QConfig`` the options name."""
    return q.QConfig(weight_bits=args.weight_bits, activation_bits=args.activation_bits or None,
                     weight_observer=args.weight_observer)


def adaround_config_from(args: argparse.Namespace) -> dict:
    """``weight_reconstruction``'s ``custom_config_dict`` from the options."""
    return {"num_steps": args.steps, "batch_size": args.adaround_batch_size, "seed": args.seed,
            "granularity": args.granularity, "drop_prob": args.drop_prob,
            "activation_lr": args.activation_lr, "guard": args.guard}


def print_result(title: str, result: ChainResult) -> None:
    """The per-layer report, then float / nearest / AdaRound metrics and timings."""
    print(result.report.format_table())
    print(f"\n{title}")
    print(result.format())
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items()))


def run_and_print(name: str, model, data, metric, args: argparse.Namespace,
                  data_description: str) -> ChainResult:
    """``quantize_and_compare(model, data, metric, ...)`` (a float ``nn.Module``, its
    ``{"calibration", "evaluation"}`` Datasets, a metric) with the options' settings, then
    ``print_result`` under the title "NAME WxAy, DATA_DESCRIPTION, N steps per layer"."""
    result = quantize_and_compare(model, data, metric, qconfig_from(args),
                                  adaround_config_from(args), args.batch_size)
    precision = f"W{args.weight_bits}A{args.activation_bits or 'float'}"
    print_result(f"{name} {precision}, {data_description}, {args.steps} steps per layer", result)
    return result
