"""The script the data-parallel tests start with ``torchrun`` (or plainly, as one process).

    python ddp_script.py OUT.pt '{"num_steps": 20}' [--rank-config '{"1": {...}}'] [--die RANK:STEP]

Rounds a small calibrated CNN with ``weight_reconstruction`` and saves, from rank 0, the
rounded weights and every layer's final ``V``. ``--rank-config`` gives one rank other
settings; ``--die`` kills that rank with SIGKILL at that optimisation step.
"""

from __future__ import annotations

import argparse
import json
import os
import signal

import torch
from torch import nn

from adaround_core.quantization import FakeQuantState, prepare_qat_fx, set_fake_quantize
from adaround_core.reconstruction import soft_rounding
from adaround_core.reconstruction.weight_reconstruction import weight_reconstruction


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()


def _calibrated(batches: list[torch.Tensor]) -> nn.Module:
    model = prepare_qat_fx(_model())
    set_fake_quantize(model, FakeQuantState.CALIBRATION)
    with torch.no_grad():
        for batch in batches:
            model(batch)
    return model


def _record_v(store: list[torch.Tensor]) -> None:
    """Keep every layer's final ``V`` (read when its hard weight is taken)."""
    original = soft_rounding.SoftRounding.hard_weight

    def hard_weight(self):
        store.append(self.v.detach().clone())
        return original(self)

    soft_rounding.SoftRounding.hard_weight = hard_weight


def _die_at(step: int) -> None:
    """SIGKILL this process at optimisation step ``step`` of the first layer."""
    original = soft_rounding.FusedAdam.step
    count = [0]

    def step_then_die(self, grad):
        count[0] += 1
        if count[0] > step:
            os.kill(os.getpid(), signal.SIGKILL)
        original(self, grad)

    soft_rounding.FusedAdam.step = step_then_die


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("config")
    p.add_argument("--rank-config", default="{}")
    p.add_argument("--die", default="")
    args = p.parse_args()
    rank = os.environ.get("RANK", "0")
    config = {**json.loads(args.config), **json.loads(args.rank_config).get(rank, {})}
    if args.die and args.die.split(":")[0] == rank:
        _die_at(int(args.die.split(":")[1]))
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 3, 6, 6, generator=g) for _ in range(4)]
    model = _calibrated(batches)
    vs: list[torch.Tensor] = []
    _record_v(vs)
    report = weight_reconstruction(model, batches, None, {"progress": False, **config})
    if rank == "0":
        torch.save({"state": model.state_dict(), "v": vs,
                    "mse": [layer.adaround_mse for layer in report.layers]}, args.out)


if __name__ == "__main__":
    main()
