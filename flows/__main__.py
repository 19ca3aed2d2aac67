"""``python -m flows <stage>``: run one pipeline stage, or ``run`` for the whole chain.

    python -m flows run                         # data -> train -> calibrate -> adaround -> evaluate
    python -m flows adaround -S adaround.num_steps=500
    python -m flows sweep -V quant.weight_bits=2 -V quant.weight_bits=4   # variants at once
    python -m flows serve --cron "0 2 * * *"    # nightly, against `prefect server start`
    python -m flows compare --last 5            # the last MLflow pipeline runs side by side
"""

from __future__ import annotations

import argparse
import logging
import sys

import yaml

from tasks.params import load_params, parse_params

STAGE_NAMES = ["data", "train", "calibrate", "adaround", "evaluate", "run"]
REPORT_COMMANDS = ["show", "compare"]  # metrics of the last run / last MLflow runs; no compute
SCALE_COMMANDS = ["sweep", "serve"]  # variants at once (flows/sweep.py); nightly (schedule.py)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flows", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGE_NAMES + REPORT_COMMANDS + SCALE_COMMANDS)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a param, e.g. -S adaround.num_steps=500 (repeatable)")
    p.add_argument("-V", "--variant", action="append", default=[], metavar="KEY=VALUE[,...]",
                   help="sweep: one variant's overrides, e.g. -V quant.weight_bits=2 "
                        "(repeat per variant)")
    p.add_argument("--cron", default="0 2 * * *",
                   help="serve: cron schedule of the pipeline (default: 02:00 nightly)")
    p.add_argument("--name", default="nightly", help="serve: deployment name")
    p.add_argument("--last", type=int, default=5, help="compare: how many runs (default: 5)")
    return p


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a params mapping."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return raw


def configure_logging() -> None:
    """Our packages log at INFO; third-party chatter (HTTP requests) only at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("adaround_core", "tasks", "flows"):
        logging.getLogger(name).setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging()
    params = load_params(args.params)
    if args.set:
        params = parse_params(apply_overrides(params.model_dump(mode="json"), args.set))
    if args.stage == "show":
        from flows.summary import show_metrics

        print(show_metrics(params))
        return 0
    if args.stage == "compare":
        from flows.compare import compare_runs

        print(compare_runs(params, args.last))
        return 0
    if args.stage in SCALE_COMMANDS:
        return _scale(args, params)
    from flows.pipeline import run_stage  # imported late: Prefect start-up is slow

    result = run_stage(args.stage, params)
    if args.stage in ("evaluate", "run"):
        from flows.summary import format_metrics

        print(format_metrics(result))
    return 0


def _scale(args: argparse.Namespace, params) -> int:
    if args.stage == "serve":
        from flows.schedule import serve

        serve(args.params, args.set, args.cron, args.name)  # blocks until stopped
        return 0
    from flows.sweep import format_sweep, run_sweep

    print(format_sweep(run_sweep(params, args.variant)))
    return 0


def cli(argv: list[str] | None = None) -> int:
    """``main``, with errors a user fixes (bad params, unreachable store) as one line, exit 2."""
    from tasks.preflight import PreflightError

    try:
        return main(argv)
    except (ValueError, FileNotFoundError, LookupError, PreflightError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
