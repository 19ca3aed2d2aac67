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

from flows.environment import apply_process_defaults

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


def configure_logging() -> None:
    """Our packages log at INFO; third-party chatter (HTTP requests) only at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("adaround_core", "tasks", "flows"):
        logging.getLogger(name).setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging()
    if args.stage in REPORT_COMMANDS or args.stage == "serve":
        return _no_flow_run(args, load_args_params(args))
    from flows.api_server import start_temporary_api_server

    server = start_temporary_api_server()  # boots while the imports below run
    params = load_args_params(args)
    if args.stage == "sweep":
        from flows.sweep import format_sweep, run_sweep

        server.wait_until_ready()
        print(format_sweep(run_sweep(params, args.variant)))
        return 0
    from flows.pipeline import run_stage  # imported late: Prefect start-up is slow

    server.wait_until_ready()
    result = run_stage(args.stage, params)
    if args.stage in ("evaluate", "run"):
        from flows.summary import format_metrics

        print(format_metrics(result))
    return 0


def load_args_params(args: argparse.Namespace):
    """The params file with the ``-S`` overrides applied, validated."""
    from tasks.params import load_params  # imports torch: after the server has started

    return load_params(args.params, args.set)


def _no_flow_run(args: argparse.Namespace, params) -> int:
    """``show``, ``compare`` (no compute) and ``serve`` (needs a running server)."""
    if args.stage == "show":
        from flows.summary import show_metrics

        print(show_metrics(params))
    elif args.stage == "compare":
        from flows.compare import compare_runs

        print(compare_runs(params, args.last))
    else:
        from flows.schedule import serve

        serve(args.params, args.set, args.cron, args.name)  # blocks until stopped
    return 0


EXIT_BAD_INPUT = 2  # bad params, a missing input, an unreachable store: fix, then rerun
EXIT_BUSY = 75  # another run holds the outputs (EX_TEMPFAIL): rerun when it has finished


def cli(argv: list[str] | None = None) -> int:
    """``main``, with errors a user acts on as one line: exit 2 (fix the input) or 75 (the
    outputs are busy: try again later)."""
    apply_process_defaults()
    try:
        return main(argv)
    except Exception as err:
        from flows.runtime import OutputsBusyError  # imported late: they import torch
        from tasks.params import PreflightError

        if isinstance(err, OutputsBusyError):
            code = EXIT_BUSY
        elif isinstance(err, (ValueError, FileNotFoundError, LookupError, PreflightError)):
            code = EXIT_BAD_INPUT
        else:
            raise
        print(f"error: {err}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(cli())
