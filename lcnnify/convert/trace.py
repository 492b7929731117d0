"""Get an ``fx.Graph`` of a model that sees every layer the conversion needs (DESIGN §3, ZOO_NOTES).

The tracer treats as leaves (never traced into):

* every module the conversion rewrites or reports as a unit: activations, norms, convs, linears, dropout /
  drop-path / stochastic depth (their forward reads ``self.training`` at trace time, so tracing into them
  would bake one mode into the graph), and
* timm's own "notrace" modules (``timm.layers.get_notrace_modules()``) — except the ones that would HIDE
  convertible layers from us and trace fine on torch 2.x (``NormFreeBlock``); those timm lists as
  notrace but that are norms/convs (``BatchNormAct2d``, ``Conv2dSame``...) are leaves anyway.

timm's notrace *functions* (dynamic "same" padding and friends) are autowrapped so that models using them
trace. The graph is traced on the model in train mode and again in eval mode; callers compare the two.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch.fx as fx
from torch import nn

from .rules import is_rule_leaf

_TIMM_HIDES_CONVERTIBLE = ("NormFreeBlock", "ConvMlp")


def _timm_notrace() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    try:
        import timm.layers as tl  # noqa: F401  (importing timm fills the registries)
    except Exception:  # timm is optional
        return (), ()
    mods = tuple(m for m in tl.get_notrace_modules() if m.__name__ not in _TIMM_HIDES_CONVERTIBLE)
    fns = tuple(tl.get_notrace_functions())
    return mods, fns


def _dropout_like() -> tuple[type, ...]:
    types: list[type] = [nn.modules.dropout._DropoutNd]
    try:
        from timm.layers import DropBlock2d, DropPath

        types += [DropPath, DropBlock2d]
    except Exception:
        pass
    try:
        from torchvision.ops import StochasticDepth

        types.append(StochasticDepth)
    except Exception:
        pass
    return tuple(types)


class LCNNTracer(fx.Tracer):
    """An ``fx.Tracer`` whose leaves are the layers lcnnify converts or reports (see module docstring)."""

    def __init__(self, extra_leaves: Iterable[type] = (), leaf_ids: Iterable[int] = ()) -> None:
        notrace_mods, notrace_fns = _timm_notrace()
        super().__init__(autowrap_modules=(math,), autowrap_functions=notrace_fns, param_shapes_constant=True)
        self._leaves = tuple(notrace_mods) + _dropout_like() + tuple(extra_leaves)
        self._leaf_ids = frozenset(leaf_ids)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self._leaf_ids or is_rule_leaf(m) or isinstance(m, self._leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, *, training: bool | None = None, leaves: Iterable[nn.Module] = ()) -> fx.Graph:
    """Symbolically trace ``model`` with the model temporarily in ``training`` mode (default: its own).

    ``leaves``: extra submodules (by identity) not to trace into, e.g. ones whose forward fx cannot trace."""
    was_training = model.training
    if training is not None:
        model.train(training)
    try:
        return LCNNTracer(leaf_ids=[id(m) for m in leaves]).trace(model)
    finally:
        model.train(was_training)


def is_leaf(module: nn.Module) -> bool:
    """Whether :class:`LCNNTracer` treats ``module`` as a leaf (never traces into it)."""
    return LCNNTracer().is_leaf_module(module, "")


def graph_signature(graph: fx.Graph) -> list[tuple[str, Any]]:
    """A structural fingerprint of a graph (op and target of every node), to compare train/eval traces."""
    return [(n.op, n.target if isinstance(n.target, str) else getattr(n.target, "__name__", repr(n.target)))
            for n in graph.nodes]
