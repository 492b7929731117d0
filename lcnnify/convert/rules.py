"""The replacement table: which call sites convert to what (DESIGN §3). Data, not an if-chain.

Each :class:`Rule` names a *kind* of call site (a module type, a function, or a tensor method) and the family it
belongs to; :func:`match` finds the rule of an fx node. What each family becomes is decided by the rewriter
from :class:`~lcnnify.config.LCNNConfig` (policy for smooth activations, per-type overrides, skips).

Families:
  ``relu``     ReLU, ReLU6, LeakyReLU, Softplus, Hardtanh-free kinks: always converted to a centered softplus
               (their curvature is undefined or fixed; paper §3.3).
  ``smooth``   SiLU, GELU, Hardswish, Mish, ELU, CELU, SELU: converted by default (``smooth_activations``);
               their slopes exceed 1 (SiLU 1.10, GELU 1.13, Hardswish 1.5) and their curvature is not
               learnable, so they void the bound of Theorem 1 if kept.
  ``conv``     nn.Conv1d/2d/3d (and subclasses): "real" spectral normalization (paper §3.4.1).
  ``linear``   nn.Linear (and subclasses, e.g. timm's Linear): vanilla spectral normalization.
  ``batchnorm`` nn.BatchNorm1d/2d/3d, SyncBatchNorm, torchvision FrozenBatchNorm2d: gamma-Lipschitz BN (§3.4.2).
  ``batchnorm_act`` timm BatchNormAct2d & co: gamma-Lipschitz BN + its (converted) activation + its drop.

Ops that void the curvature guarantee are listed in :data:`VOIDING`; they are reported, never changed.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..nn import is_lcnn_layer

# ----------------------------------------------------------------------------------------------------------
# optional third-party types (timm, torchvision); resolved lazily so that neither package is required


def _timm(*names: str) -> tuple[type, ...]:
    try:
        import timm.layers as tl
    except Exception:
        return ()
    return tuple(getattr(tl, n) for n in names if hasattr(tl, n))


def _torchvision(*names: str) -> tuple[type, ...]:
    try:
        import torchvision.ops as tvo
    except Exception:
        return ()
    return tuple(getattr(tvo, n) for n in names if hasattr(tvo, n))


@dataclass(frozen=True)
class Rule:
    """One kind of call site and the family it belongs to.

    Attributes:
        family: ``relu``, ``smooth``, ``conv``, ``linear``, ``batchnorm``, ``batchnorm_act``.
        name: a readable name of the pattern (``nn.ReLU``, ``F.relu``, ``Tensor.relu_``...).
        module_types: for ``call_module`` nodes, the module types (subclasses match too).
        functions: for ``call_function`` nodes, the callables.
        methods: for ``call_method`` nodes, the tensor method names.
        inplace: whether the call mutates its input (``relu_``); module/kwarg ``inplace=True`` is read per call.
    """

    family: str
    name: str
    module_types: tuple[type, ...] = ()
    functions: tuple[Callable[..., Any], ...] = ()
    methods: tuple[str, ...] = ()
    inplace: bool = False


def _act_rules() -> list[Rule]:
    return [
        Rule("relu", "nn.ReLU", module_types=(nn.ReLU,)),
        Rule("relu", "nn.ReLU6", module_types=(nn.ReLU6,)),
        Rule("relu", "nn.LeakyReLU", module_types=(nn.LeakyReLU,)),
        Rule("relu", "nn.Softplus", module_types=(nn.Softplus,)),
        Rule("relu", "F.relu", functions=(F.relu, torch.relu)),
        Rule("relu", "F.relu_", functions=(F.relu_, torch.relu_), inplace=True),
        Rule("relu", "F.relu6", functions=(F.relu6,)),
        Rule("relu", "F.leaky_relu", functions=(F.leaky_relu,)),
        Rule("relu", "F.leaky_relu_", functions=(F.leaky_relu_,), inplace=True),
        Rule("relu", "F.softplus", functions=(F.softplus,)),
        Rule("relu", "Tensor.relu", methods=("relu",)),
        Rule("relu", "Tensor.relu_", methods=("relu_",), inplace=True),
        Rule("smooth", "nn.SiLU", module_types=(nn.SiLU,) + _timm("Swish")),
        Rule("smooth", "nn.GELU", module_types=(nn.GELU,) + _timm("GELU", "GELUTanh")),
        Rule("smooth", "nn.Hardswish", module_types=(nn.Hardswish,) + _timm("HardSwish")),
        Rule("smooth", "nn.Mish", module_types=(nn.Mish,) + _timm("Mish")),
        Rule("smooth", "nn.ELU", module_types=(nn.ELU, nn.CELU, nn.SELU)),
        Rule("smooth", "F.silu", functions=(F.silu,)),
        Rule("smooth", "F.gelu", functions=(F.gelu,)),
        Rule("smooth", "F.hardswish", functions=(F.hardswish,)),
        Rule("smooth", "F.mish", functions=(F.mish,)),
        Rule("smooth", "F.elu", functions=(F.elu, F.celu, F.selu)),
        Rule("smooth", "Tensor.silu", methods=("silu",)),
    ]


def _layer_rules() -> list[Rule]:
    bn_types: tuple[type, ...] = (nn.modules.batchnorm._BatchNorm,) + _torchvision("FrozenBatchNorm2d")
    bn_act = _timm("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d")
    return [
        # order matters: the fused BN+act types are BatchNorm subclasses, so they come first
        Rule("batchnorm_act", "timm.BatchNormAct2d", module_types=bn_act),
        Rule("batchnorm", "nn.BatchNorm", module_types=bn_types),
        Rule("conv", "nn.ConvNd", module_types=(nn.Conv1d, nn.Conv2d, nn.Conv3d)),
        Rule("linear", "nn.Linear", module_types=(nn.Linear,)),
    ]


_RULES: list[Rule] | None = None


def rules() -> list[Rule]:
    """The replacement table (built once; includes timm/torchvision types when those packages import)."""
    global _RULES
    if _RULES is None:
        _RULES = _layer_rules() + _act_rules()
    return _RULES


def rule_for_module(m: nn.Module) -> Rule | None:
    """The rule whose module types ``m`` is an instance of (first match in table order)."""
    for r in rules():
        if r.module_types and isinstance(m, r.module_types):
            return r
    return None


def match(node: fx.Node, modules: dict[str, nn.Module]) -> Rule | None:
    """The rule of an fx node, or None."""
    if node.op == "call_module":
        return rule_for_module(modules[node.target])
    if node.op == "call_function":
        for r in rules():
            if node.target in r.functions:
                return r
    if node.op == "call_method":
        for r in rules():
            if node.target in r.methods:
                return r
    return None


def is_inplace_call(node: fx.Node, rule: Rule, modules: dict[str, nn.Module]) -> bool:
    """Whether the call mutates its input (so later users of the input must read the new value)."""
    if rule.inplace:
        return True
    if node.op == "call_module":
        return bool(getattr(modules[node.target], "inplace", False))
    return bool(node.kwargs.get("inplace", False)) or (
        rule.name in ("F.relu", "F.leaky_relu", "F.softplus") and _positional_inplace(node))


def _positional_inplace(node: fx.Node) -> bool:
    # F.relu(x, True) / F.leaky_relu(x, 0.01, True)
    idx = {F.relu: 1, F.leaky_relu: 2}.get(node.target)  # type: ignore[arg-type]
    return idx is not None and len(node.args) > idx and node.args[idx] is True


_LEAF_TYPES: tuple[type, ...] | None = None


def is_rule_leaf(m: nn.Module) -> bool:
    """Modules the tracer must not trace into: everything the table or the report treats as a unit."""
    global _LEAF_TYPES
    if _LEAF_TYPES is None:
        types: list[type] = [t for r in rules() for t in r.module_types]
        types += [t for t, _ in VOIDING_MODULES()]
        types += [nn.Sigmoid, nn.Tanh, nn.Hardsigmoid] + list(_timm("Sigmoid", "Tanh", "HardSigmoid"))
        _LEAF_TYPES = tuple(types)
    return isinstance(m, _LEAF_TYPES) or is_lcnn_layer(m)


# ----------------------------------------------------------------------------------------------------------
# ops that void the curvature guarantee (reported, never changed)


def VOIDING_MODULES() -> list[tuple[type, str]]:  # noqa: N802 (a table)
    return [
        (nn.MaxPool1d, "max-pool is not differentiable (piecewise linear; curvature undefined)"),
        (nn.MaxPool2d, "max-pool is not differentiable (piecewise linear; curvature undefined)"),
        (nn.MaxPool3d, "max-pool is not differentiable (piecewise linear; curvature undefined)"),
        (nn.AdaptiveMaxPool1d, "max-pool is not differentiable"),
        (nn.AdaptiveMaxPool2d, "max-pool is not differentiable"),
        (nn.AdaptiveMaxPool3d, "max-pool is not differentiable"),
        (nn.LayerNorm, "LayerNorm divides by a data-dependent std: unbounded Lipschitz constant near zero variance"),
        (nn.GroupNorm, "GroupNorm divides by a data-dependent std: unbounded Lipschitz constant"),
        (nn.InstanceNorm1d, "InstanceNorm divides by a data-dependent std"),
        (nn.InstanceNorm2d, "InstanceNorm divides by a data-dependent std"),
        (nn.InstanceNorm3d, "InstanceNorm divides by a data-dependent std"),
        (nn.LocalResponseNorm, "LocalResponseNorm is a data-dependent division"),
        (nn.MultiheadAttention, "attention (softmax of products) has unbounded curvature"),
        (nn.Softmax, "softmax inside the network (attention/gating)"),
    ]


VOIDING_FUNCTIONS: dict[Any, str] = {
    F.max_pool1d: "max-pool is not differentiable",
    F.max_pool2d: "max-pool is not differentiable",
    F.max_pool3d: "max-pool is not differentiable",
    F.adaptive_max_pool1d: "max-pool is not differentiable",
    F.adaptive_max_pool2d: "max-pool is not differentiable",
    F.layer_norm: "LayerNorm divides by a data-dependent std",
    F.group_norm: "GroupNorm divides by a data-dependent std",
    F.softmax: "softmax inside the network (attention/gating)",
    torch.softmax: "softmax inside the network (attention/gating)",
    F.scaled_dot_product_attention: "attention has unbounded curvature",
    torch.sigmoid: "sigmoid gate (kept; its product with features is a gating product)",
    F.sigmoid: "sigmoid gate (kept)",
    F.hardsigmoid: "hard-sigmoid gate (kept; kinked)",
    torch.max: "max is not differentiable",
    torch.amax: "max is not differentiable",
}

VOIDING_METHODS: dict[str, str] = {
    "sigmoid": "sigmoid gate (kept; its product with features is a gating product)",
    "sigmoid_": "sigmoid gate (kept)",
    "softmax": "softmax inside the network (attention/gating)",
    "max": "max is not differentiable",
    "amax": "max is not differentiable",
}

PRODUCT_FUNCTIONS = (operator.mul, operator.imul, torch.mul, operator.matmul, torch.matmul, torch.bmm,
                     torch.einsum)
PRODUCT_METHODS = ("mul", "mul_", "matmul", "bmm")

GATE_MODULE_NAMES = ("Sigmoid", "Hardsigmoid", "HardSigmoid", "Tanh")
