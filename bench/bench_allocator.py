"""An AdaRound step with glibc's moving mmap threshold against one fixed at 2 MiB.

``python -m flows`` fixes the threshold (``flows/environment.map_large_allocations``) so a
capture's freed activations leave the process; this measures what that costs a rounding
step, whose temporaries are then mapped, zeroed and unmapped every step instead of reused.
Each mode runs in its own process (the threshold cannot be unfixed), huge pages on, one
thread, a Linear of MiniLM's FFN-output shape (32 sentences × 48 tokens, 1536 → 384):

    .venv/bin/python -m bench.bench_allocator [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

STEPS = 50


def step_ms(fixed: bool) -> float:
    """Milliseconds per forward + weight-gradient step, in this process."""
    import torch

    if fixed:
        from flows.environment import map_large_allocations

        assert map_large_allocations()
    torch.set_num_threads(1)
    x, y = torch.randn(32 * 48, 1536), torch.randn(32 * 48, 384)
    w = torch.randn(384, 1536, requires_grad=True)

    def step() -> None:
        ((x @ w.t() - y) ** 2).mean().backward()

    for _ in range(5):
        step()
    start = time.perf_counter()
    for _ in range(STEPS):
        step()
    return (time.perf_counter() - start) / STEPS * 1000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", choices=["moving", "fixed"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(f"{step_ms(args.child == 'fixed'):.2f}")
        return 0
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": "1"}
    for _ in range(args.repeats):
        for mode in ("moving", "fixed"):
            out = subprocess.run([sys.executable, "-m", "bench.bench_allocator", "--child", mode],
                                 env=env, check=True, capture_output=True, text=True).stdout
            print(f"{mode} threshold: {float(out.split()[-1]):.1f} ms/step", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
