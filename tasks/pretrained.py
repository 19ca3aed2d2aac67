"""``model.pretrained``: a state_dict file (safetensors, or ``torch.save`` of a state_dict
read with ``weights_only=True``) checked against the factory's model before it is loaded."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tasks.datasets import first_line
from tasks.io import load_tensors


class CheckpointMismatchError(ValueError):
    """``model.pretrained`` cannot be loaded into ``model.factory``'s model."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"model.pretrained {path}: {problem}")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a state_dict file; an unreadable file or a non-state_dict is one line."""
    try:
        if path.endswith(".safetensors"):
            state = load_tensors(Path(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, pickle and zip errors alike
        raise CheckpointMismatchError(path, f"cannot be read as a state_dict "
                                            f"({type(err).__name__}: {first_line(err)}); save "
                                            f"it with torch.save(model.state_dict(), path) or "
                                            f"safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise CheckpointMismatchError(path, f"holds a {type(state).__name__} that is not a "
                                            f"state_dict (names -> tensors); save "
                                            f"model.state_dict()")
    return state


def check_keys(model: nn.Module, state: dict[str, torch.Tensor], path: str,
               factory: str) -> None:
    """The file's names and shapes are the model's: else the first missing and the first
    unexpected name, or the first shape that differs."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = [f"{len(missing)} missing key(s) (first: {missing[0]!r})" if missing else "",
                 f"{len(unexpected)} unexpected key(s) (first: {unexpected[0]!r})"
                 if unexpected else ""]
        raise CheckpointMismatchError(path, f"does not match model.factory {factory!r}: "
                                            f"{', '.join(p for p in parts if p)}; save the "
                                            f"state_dict of the model the factory builds (same "
                                            f"model.kwargs)")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointMismatchError(path, f"{key!r} has shape "
                                                f"{tuple(state[key].shape)} but model.factory "
                                                f"{factory!r} makes {tuple(value.shape)}")


def load_pretrained(model: nn.Module, path: str, factory: str) -> nn.Module:
    """Load ``path`` into ``model`` after :func:`check_keys`."""
    state = read_state_dict(path)
    check_keys(model, state, path, factory)
    model.load_state_dict(state)
    return model
