"""``python -m flows <stage>``: run one pipeline stage, or ``run`` for the whole chain.

    python -m flows run                         # data -> train -> calibrate -> adaround -> evaluate
    python -m flows adaround -S adaround.num_steps=500
"""

from __future__ import annotations

import argparse
import logging
import sys

import yaml

from tasks.params import load_params, parse_params

STAGE_NAMES = ["data", "train", "calibrate", "adaround", "evaluate", "run"]
REPORT_COMMANDS = ["show"]  # print the metrics of the last run, computing nothing


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flows", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=STAGE_NAMES + REPORT_COMMANDS)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    p.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a param, e.g. -S adaround.num_steps=500 (repeatable)")
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
    from flows.pipeline import run_stage  # imported late: Prefect start-up is slow

    result = run_stage(args.stage, params)
    if args.stage in ("evaluate", "run"):
        from flows.summary import format_metrics

        print(format_metrics(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
