"""What the pipeline's data-parallel tests start with ``torchrun``: ``python -m flows`` on
every rank, with test-only changes on rank 1.

    torchrun ... ddp_launch.py [--rank1-set KEY=VALUE] [--kill-rank1-at-step N] STAGE ...

``--rank1-set`` gives rank 1 one more ``-S`` override (params that differ between ranks);
``--kill-rank1-at-step`` SIGKILLs rank 1 at its N-th optimisation step (counted over all
the layers it helps round).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from adaround_core.reconstruction import soft_rounding
from flows.__main__ import cli


def _die_at(step: int) -> None:
    original = soft_rounding.FusedAdam.step
    count = [0]

    def step_then_die(self, grad):
        count[0] += 1
        if count[0] >= step:
            os.kill(os.getpid(), signal.SIGKILL)
        original(self, grad)

    soft_rounding.FusedAdam.step = step_then_die


def main() -> int:
    p = argparse.ArgumentParser(allow_abbrev=False)
    p.add_argument("--rank1-set", default=None)
    p.add_argument("--kill-rank1-at-step", type=int, default=0)
    args, flows_args = p.parse_known_args()
    if os.environ.get("RANK") == "1":
        if args.rank1_set:
            flows_args += ["-S", args.rank1_set]
        if args.kill_rank1_at_step:
            _die_at(args.kill_rank1_at_step)
    return cli(flows_args)


if __name__ == "__main__":
    sys.exit(main())
