"""The replacement table: which call sites convert to what -- a view of the op registry (:mod:`lcnnify.ops`).

Each :class:`Rule` is an :class:`~lcnnify.ops.OpSpec` whose ``convert`` field is set, seen by the rewriter:
its *conversion family* says which factory builds the replacement. What each family becomes is decided by
the rewriter from :class:`~lcnnify.config.LCNNConfig` (policy for smooth activations, per-type overrides,
skips).

Conversion families:
  ``relu``     ReLU, ReLU6, LeakyReLU, Softplus (modules, functions, methods): always converted to a centered
               softplus (their curvature is undefined or fixed; paper §3.3).
  ``smooth``   SiLU, GELU, Hardswish, Mish, ELU, CELU, SELU: converted by default (``smooth_activations``).
  ``conv``     nn.Conv1d/2d/3d (and subclasses): "real" spectral normalization (paper §3.4.1).
  ``linear``   nn.Linear (and subclasses, e.g. timm's Linear): vanilla spectral normalization.
  ``batchnorm`` nn.BatchNorm1d/2d/3d, SyncBatchNorm, torchvision FrozenBatchNorm2d: gamma-Lipschitz BN (§3.4.2).
  ``batchnorm_act`` timm BatchNormAct2d & co: gamma-Lipschitz BN + its (converted) activation + its drop.

Whether a kept op voids the guarantee, its bound constants and where its ``inplace`` flag sits are in the
registry; a user-registered activation (``lcnnify.ops.register_activation(..., convert="always")``) is a rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.fx as fx
from torch import nn

from .. import ops
from ..nn import is_lcnn_layer

__all__ = ["Rule", "rules", "rule_for_module", "match", "is_inplace_call", "is_rule_leaf"]


@dataclass(frozen=True)
class Rule:
    """One kind of call site the conversion rewrites, and its conversion family.

    Attributes:
        family: ``relu``, ``smooth``, ``conv``, ``linear``, ``batchnorm``, ``batchnorm_act``.
        name: a readable name of the pattern (``nn.ReLU``, ``F.relu``, ``Tensor.relu_``...).
        module_types / functions / methods: what it matches (module subclasses match too).
        inplace: whether the call always mutates its input (``relu_``); flags are read per call.
        spec: the registry entry.
    """

    family: str
    name: str
    module_types: tuple[type, ...] = ()
    functions: tuple[Callable[..., Any], ...] = ()
    methods: tuple[str, ...] = ()
    inplace: bool = False
    spec: ops.OpSpec | None = None


def _family(spec: ops.OpSpec) -> str:
    if spec.convert == "activation":
        return "relu" if spec.family is ops.Family.RELU else "smooth"
    return str(spec.convert)


_VIEWS: dict[int, Rule] = {}


def _rule(spec: ops.OpSpec | None) -> Rule | None:
    if spec is None or spec.convert is None:
        return None
    r = _VIEWS.get(id(spec))
    if r is None or r.spec is not spec:
        r = Rule(_family(spec), spec.name, spec.modules, spec.functions, spec.methods,
                 spec.inplace is ops.Inplace.ALWAYS, spec)
        _VIEWS[id(spec)] = r
    return r


def rules() -> list[Rule]:
    """The replacement table: every registry entry the conversion rewrites (user registrations first)."""
    return [r for r in (_rule(s) for s in ops.registry()) if r is not None]


def rule_for_module(m: nn.Module) -> Rule | None:
    """The rule of a module (first matching registry entry, if the conversion rewrites it)."""
    return _rule(ops.spec_for_module(m))


def match(node: fx.Node, modules: dict[str, nn.Module]) -> Rule | None:
    """The rule of an fx node, or None (ops the conversion leaves as they are)."""
    return _rule(ops.lookup(node, modules))


def is_inplace_call(node: fx.Node, rule: Rule, modules: dict[str, nn.Module]) -> bool:
    """Whether the call mutates its input (so later users of the input must read the new value)."""
    return ops.is_inplace(node, modules, rule.spec)


def is_rule_leaf(m: nn.Module) -> bool:
    """Modules the tracer must not trace into: every module type of the registry, and the LCNN layers."""
    return isinstance(m, ops.leaf_types()) or is_lcnn_layer(m)


def kept_void_reason(site: nn.Module | fx.Node | None, modules: dict[str, nn.Module] | None = None) -> str | None:
    """Why a call site the conversion leaves as it is (skipped, kept by policy, disabled by the config) voids
    the guarantee, or None -- the registry's verdict, the one the bound uses (a kept SiLU or an unconverted
    BatchNorm keeps the bound finite; a kept ReLU or Hardswish does not)."""
    if isinstance(site, fx.Node):
        modules = modules or {}
        if site.op == "call_module":
            return kept_void_reason(modules.get(str(site.target)))
        spec = ops.lookup(site, modules)
        if spec is None:
            return ops.UNKNOWN_OP
        return spec.void_reason(ops.node_call(site, modules, spec=spec))
    if isinstance(site, nn.Module):
        return next((why for _, _, why in ops.module_voids(site, "")), None)
    return None


def kept_voids(site: nn.Module | fx.Node | None, modules: dict[str, nn.Module] | None = None) -> bool:
    """Whether a call site left as it is voids the guarantee (see :func:`kept_void_reason`)."""
    return kept_void_reason(site, modules) is not None
