"""Find the blocks of a model for block reconstruction (BRECQ), and check given ones.

The rule, on the module tree of the prepared model:

1. A *candidate* is a submodule (not the root, not a quantized layer) that holds at least
   two quantized layers.
2. A candidate is *residual* when its own ``forward`` adds its input to something computed
   from it: traced with ``torch.fx``, its direct children kept opaque, some addition has
   both operands depending on the forward's inputs (ResNet's BasicBlock / Bottleneck, a
   MobileNetV2 inverted residual with a shortcut, a transformer layer's ``x + attn(x)``).
3. The blocks are the candidates that are residual or of the same class as a residual one
   (MobileNetV2's stride-2 inverted residuals have no shortcut but are blocks all the
   same), outermost first: a block's submodules are not blocks of their own.

Quantized layers in no block are reconstructed alone. Names alone never make a block.
"""

from __future__ import annotations

import difflib
import logging
import operator

import torch
from torch import fx, nn

from adaround_core.quant.fake_quantize import FakeQuantize
from adaround_core.quant.quant_layers import QuantLayerMixin

logger = logging.getLogger(__name__)

_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_ADD_METHODS = ("add", "add_")


def find_blocks(model: nn.Module) -> list[str]:
    """Qualified names of the model's blocks (module order), by the rule above."""
    candidates = _candidates(model)
    residual_types = {type(m) for m in candidates.values() if adds_its_input(m)}
    blocks: list[str] = []
    for name, module in candidates.items():
        inside_block = any(name.startswith(b + ".") for b in blocks)
        if type(module) in residual_types and not inside_block:
            blocks.append(name)
    return blocks


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    found = {}
    for name, module in model.named_modules():
        if not name or isinstance(module, (QuantLayerMixin, FakeQuantize)):
            continue
        if sum(isinstance(m, QuantLayerMixin) for m in module.modules()) >= 2:
            found[name] = module
    return found


class _ChildrenOpaque(fx.Tracer):
    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self._children = set(root.children())

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m in self._children or super().is_leaf_module(m, module_qualified_name)


def adds_its_input(module: nn.Module) -> bool:
    """Whether ``module.forward`` adds two values that both depend on its inputs (False
    when its forward cannot be traced)."""
    try:
        graph = _ChildrenOpaque(module).trace(module)
    except Exception as error:  # noqa: BLE001 - untraceable forward: not a residual block
        logger.debug("block discovery: cannot trace %s (%s)", type(module).__name__, error)
        return False
    depends: set[fx.Node] = set()
    for node in graph.nodes:
        inputs = node.all_input_nodes
        if node.op == "placeholder" or any(n in depends for n in inputs):
            depends.add(node)
        if _is_add(node) and len(node.args) >= 2 and \
                all(isinstance(a, fx.Node) and a in depends for a in node.args[:2]):
            return True
    return False


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or \
        (node.op == "call_method" and node.target in _ADD_METHODS)


def check_blocks(model: nn.Module, blocks: list[str]) -> list[str]:
    """The modules named in ``custom_config_dict['blocks']``, checked: each exists, holds
    a quantized layer, and none lies inside another. A trailing dot is ignored."""
    names = [b.rstrip(".") for b in blocks]
    modules = dict(model.named_modules())
    for name in names:
        if name not in modules or not name:
            hint = difflib.get_close_matches(name, list(modules), n=1)
            tip = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ValueError(f"custom_config_dict['blocks']: no module named {name!r} in "
                             f"calib_model{tip}")
        if not any(isinstance(m, QuantLayerMixin) for m in modules[name].modules()):
            raise ValueError(f"custom_config_dict['blocks']: module {name!r} holds no "
                             f"quantized layer")
    for a in names:
        for b in names:
            if a != b and b.startswith(a + "."):
                raise ValueError(f"custom_config_dict['blocks']: {b!r} lies inside {a!r}; "
                                 f"give blocks that do not overlap")
    return names
