"""``python -m flows <stage>``: run one pipeline stage, or ``run`` for the whole chain.

    python -m flows run                         # data -> train -> calibrate -> adaround -> evaluate
    python -m flows adaround -S adaround.num_steps=500
    python -m flows sweep -V quant.weight_bits=2 -V quant.weight_bits=4   # variants at once
    python -m flows serve --cron "0 2 * * *"    # nightly, against `prefect server start`
    python -m flows worker --pool adaround      # a process worker for prefect.yaml's deployments
    python -m flows compare --last 5            # the last MLflow pipeline runs side by side
    python -m flows check                       # validate params, files, callables, store
    python -m flows gc --dry-run                # caches and results the params cannot reach
    torchrun --nproc-per-node 2 -m flows adaround   # data-parallel AdaRound (README)
"""

from __future__ import annotations

import argparse
import sys

from flows.console import (
    DEBUG_ENV,
    configure_logging,
    debug_requested,
    exit_code,
    report_failure,
    show_prefect_runs,
)
from flows.environment import apply_process_defaults
from flows.ranks import launched_by_torchrun, run_on_ranks
from flows.summary import format_stage_result

STAGE_NAMES = ["data", "train", "calibrate", "adaround", "export", "evaluate", "run"]
# no flow run, no Prefect server: validate everything / metrics of the last run / the last
# MLflow runs / remove caches and results the current params cannot reach
LOCAL_COMMANDS = ["check", "show", "compare", "gc"]
# variants at once (flows/sweep.py); nightly (schedule.py); a checked worker (worker.py)
SCALE_COMMANDS = ["sweep", "serve", "worker"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flows", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGE_NAMES + LOCAL_COMMANDS + SCALE_COMMANDS)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a param, e.g. -S adaround.num_steps=500 (repeatable)")
    p.add_argument("-V", "--variant", action="append", default=[], metavar="KEY=VALUE[,...]",
                   help="sweep: one variant's overrides, e.g. -V quant.weight_bits=2 "
                        "(repeat per variant)")
    p.add_argument("--cron", default="0 2 * * *",
                   help="serve: cron schedule of the pipeline (default: 02:00 nightly)")
    p.add_argument("--name", default="nightly", help="serve: deployment name")
    p.add_argument("--pool", default="adaround",
                   help="worker: the Prefect work pool to take runs from (default: adaround)")
    p.add_argument("--last", type=int, default=5, help="compare: how many runs (default: 5)")
    p.add_argument("--dry-run", action="store_true", help="gc: list what would be removed")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="log every step (Prefect's run states, our INFO logs)")
    p.add_argument("--debug", action="store_true",
                   help=f"show the traceback of a failure (or set {DEBUG_ENV}=1)")
    return p


def main(args: argparse.Namespace) -> int:
    configure_logging(args.verbose)
    if args.stage == "worker":
        from flows.worker import start_worker

        start_worker(args.params, args.pool)  # checks the pool, then becomes the worker
        return 0
    if launched_by_torchrun():
        if args.stage not in STAGE_NAMES:
            raise ValueError(f"under torchrun only the pipeline stages run "
                             f"({', '.join(STAGE_NAMES)}); run `python -m flows {args.stage}` "
                             f"without torchrun")
        return run_on_ranks(load_args_params(args), lambda: _flow_run(args))
    if args.stage in LOCAL_COMMANDS or args.stage == "serve":
        return _no_flow_run(args, load_args_params(args))
    return _flow_run(args)


def _flow_run(args: argparse.Namespace) -> int:
    """A stage, the whole chain or a sweep, as Prefect flow runs."""
    from flows.api_server import start_temporary_api_server

    server = start_temporary_api_server()  # boots while the imports below run
    params = load_args_params(args)
    if args.stage == "sweep":
        from flows.sweep import format_sweep, run_sweep

        _wait_for_prefect(server, args.verbose)
        print(format_sweep(run_sweep(params, args.variant)))
        return 0
    from flows.pipeline import run_stage  # imported late: Prefect start-up is slow

    _wait_for_prefect(server, args.verbose)
    print(format_stage_result(args.stage, run_stage(args.stage, params)))
    return 0


def _wait_for_prefect(server, verbose: bool) -> None:
    """Point Prefect at its server; show its run logs with ``-v`` or a real server."""
    server.wait_until_ready()
    show_prefect_runs(verbose or not server.is_temporary)


def load_args_params(args: argparse.Namespace):
    """The params file with the ``-S`` overrides applied, validated."""
    from tasks.params import load_params  # imports torch: after the server has started

    return load_params(args.params, args.set)


def _no_flow_run(args: argparse.Namespace, params) -> int:
    """``check``, ``show``, ``compare``, ``gc`` (no Prefect run) and ``serve`` (needs a
    running server)."""
    if args.stage == "check":
        from flows.check import check_everything

        print(check_everything(params))
    elif args.stage == "show":
        from flows.summary import show_metrics

        print(show_metrics(params))
    elif args.stage == "compare":
        from flows.compare import compare_runs

        print(compare_runs(params, args.last))
    elif args.stage == "gc":
        from flows.runtime import output_lock
        from tasks.garbage import collect_garbage, format_garbage

        with output_lock(params):  # no stage may be writing what is removed
            print(format_garbage(collect_garbage(params, args.dry_run), args.dry_run))
    else:
        from flows.schedule import serve

        serve(args.params, args.set, args.cron, args.name)  # blocks until stopped
    return 0


def cli(argv: list[str] | None = None) -> int:
    """``main``, with a failure the user acts on as one line and an exit code saying what
    kind (flows/console.py); anything else, or ``--debug``, with its traceback."""
    apply_process_defaults()
    args = _parser().parse_args(argv)
    try:
        return main(args)
    except Exception as err:
        code = exit_code(err)
        if code is None or debug_requested(args.debug):
            raise
        report_failure(err)
        return code


if __name__ == "__main__":
    sys.exit(cli())
