"""Data-parallel AdaRound under ``torchrun``: the ranks and their collectives.

Every rank holds the whole layer's samples and draws the same global batch indices
from the same generator; each computes the reconstruction gradient on its slice of
that batch, the slices' gradients are summed by all-reduce, and every rank then takes
the same Adam step, so ``V`` stays identical on all ranks. Outside ``torchrun`` (no
``WORLD_SIZE`` > 1 and no process group) nothing here runs and results are unchanged.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

# How long a rank waits in one collective (e.g. for rank 0 to capture the next layer's
# activations) before the run fails; a dead peer is noticed at once by gloo, and torchrun
# stops the other ranks when one exits.
COLLECTIVE_TIMEOUT = timedelta(hours=2)
TIMEOUT_ENV = "ADAROUND_COLLECTIVE_TIMEOUT_S"  # overrides COLLECTIVE_TIMEOUT (seconds)


class RankLostError(RuntimeError):
    """A collective failed because another rank stopped; the message names it if it can."""


@dataclass(frozen=True)
class RankGroup:
    """This process's place in the default process group (world size > 1)."""

    rank: int
    world_size: int

    def check_divides(self, batch_size: int, source: str, setting: str) -> None:
        """The global batch must split evenly: every slice is one rank's share. ``source``
        says where ``batch_size`` came from, ``setting`` is the key that changes it."""
        if batch_size % self.world_size:
            lower = batch_size - batch_size % self.world_size
            raise ValueError(f"{source} = {batch_size} is not divisible by the torchrun world "
                             f"size {self.world_size}: set {setting} to a multiple of "
                             f"{self.world_size} (e.g. {lower or self.world_size} or "
                             f"{lower + self.world_size}) or start a number of processes that "
                             f"divides {batch_size}")

    def part(self, batch_size: int) -> tuple[int, int]:
        """``(start, stop)`` of this rank's slice of a global batch of ``batch_size``."""
        share = batch_size // self.world_size
        return self.rank * share, (self.rank + 1) * share

    def all_reduce_sum(self, tensor: torch.Tensor, what: str) -> None:
        """Sum ``tensor`` over the ranks, in place."""
        self._collective(lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM), what)

    def barrier(self, what: str) -> None:
        self._collective(dist.barrier, what)

    def broadcast(self, value: Any, what: str) -> Any:
        """Rank 0's ``value`` on every rank (pickled)."""
        box = [value]
        self._collective(lambda: dist.broadcast_object_list(box, src=0), what)
        return box[0]

    def gather(self, value: Any, what: str) -> list[Any]:
        """Every rank's ``value``, by rank (pickled)."""
        values: list[Any] = [None] * self.world_size
        self._collective(lambda: dist.all_gather_object(values, value), what)
        return values

    def _collective(self, call, what: str) -> None:
        try:
            call()
        except (RuntimeError, dist.DistError) as err:
            peer = f"rank {1 - self.rank}" if self.world_size == 2 else "another rank"
            detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RankLostError(f"rank {self.rank}: {peer} stopped during {what} ({detail}); "
                                f"torchrun's failure summary names the rank that died; rerun "
                                f"the same command to resume") from None


def current_group() -> RankGroup | None:
    """The group of an initialised default process group of more than one rank, else None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    return RankGroup(dist.get_rank(), world) if world > 1 else None


def launched_by_torchrun() -> bool:
    """``torchrun`` (or another launcher) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: torch.device) -> RankGroup | None:
    """The process group of this run: the one already initialised, else one initialised from
    torchrun's environment (gloo for CPU tensors, NCCL for CUDA ones), else None."""
    group = current_group()
    if group is not None or not launched_by_torchrun() or dist.is_initialized():
        return group
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=collective_timeout())
    atexit.register(leave)  # a group left open aborts the process at exit (gloo's threads)
    return current_group()


def leave() -> None:
    """Destroy the default process group, if there is one: its background threads must be
    joined before the interpreter exits, or the process aborts ("terminate called without an
    active exception") after its work is done. Errors of a group whose peer died are ignored."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(RuntimeError, ValueError, dist.DistError):
            dist.destroy_process_group()


def collective_timeout() -> timedelta:
    """:data:`COLLECTIVE_TIMEOUT`, or the seconds in ``$ADAROUND_COLLECTIVE_TIMEOUT_S``."""
    text = os.environ.get(TIMEOUT_ENV, "")
    if not text:
        return COLLECTIVE_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV}={text!r}: give the seconds a rank may wait in one "
                         f"collective, a positive number (default {COLLECTIVE_TIMEOUT})")
    return timedelta(seconds=seconds)


def check_same_settings(group: RankGroup, settings: dict[str, Any], label: str) -> None:
    """Refuse to run when any rank's ``settings`` (flat key -> value) differ from rank 0's,
    naming the first differing key; raised on every rank."""
    values = group.gather(json.dumps(settings, sort_keys=True, default=str),
                          f"the check of {label} across ranks")
    reference = json.loads(values[0])
    for rank, value in enumerate(values[1:], start=1):
        theirs = json.loads(value)
        for key in sorted(set(reference) | set(theirs)):
            if reference.get(key) != theirs.get(key):
                raise ValueError(f"{label}: {key} differs between ranks (rank 0: "
                                 f"{reference.get(key)!r}, rank {rank}: {theirs.get(key)!r}); "
                                 f"start every rank with the same settings")
