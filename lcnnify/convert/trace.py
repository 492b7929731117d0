"""Get an ``fx.Graph`` of a model that sees every layer the conversion needs.

The tracer treats as leaves (never traced into):

* every module the conversion rewrites or reports as a unit: activations, norms, convs, linears, dropout /
  drop-path / stochastic depth (their forward reads ``self.training`` at trace time, so tracing into them
  would bake one mode into the graph), and
* timm's own "notrace" modules (``timm.layers.get_notrace_modules()``) — except the ones that would HIDE
  convertible layers from us and trace fine on torch 2.x (``NormFreeBlock``); those timm lists as
  notrace but that are norms/convs (``BatchNormAct2d``, ``Conv2dSame``...) are leaves anyway.

timm's notrace *functions* (dynamic "same" padding and friends) are autowrapped so that models using them
trace. The graph is traced on the model in train mode and again in eval mode and the two are compared node by
node -- op, target, every argument and the wiring (:func:`compare_traces`). Traces that differ only in constant
booleans equal to the training flag (``F.dropout(x, p, training=self.training)``) are merged into one graph
whose flag arguments read the owning module's ``training`` attribute at run time (:func:`bind_training_flags`),
so one graph serves both modes; any other difference means the forward takes different paths per mode.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch.fx as fx
from torch import nn

from .. import ops
from .._utils import modes_preserved
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


class LCNNTracer(fx.Tracer):
    """An ``fx.Tracer`` whose leaves are the layers lcnnify converts or reports (see module docstring)."""

    def __init__(self, extra_leaves: Iterable[type] = (), leaf_ids: Iterable[int] = ()) -> None:
        notrace_mods, notrace_fns = _timm_notrace()
        super().__init__(autowrap_modules=(math,), autowrap_functions=notrace_fns, param_shapes_constant=True)
        self._leaves = tuple(notrace_mods) + ops.dropout_types() + tuple(extra_leaves)
        self._leaf_ids = frozenset(leaf_ids)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self._leaf_ids or is_rule_leaf(m) or isinstance(m, self._leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module, *, training: bool | None = None, leaves: Iterable[nn.Module] = ()) -> fx.Graph:
    """Symbolically trace ``model`` with the model temporarily in ``training`` mode (default: its own).

    Every submodule's own ``training`` flag is restored afterwards (a BatchNorm frozen with ``bn.eval()``
    stays frozen). ``leaves``: extra submodules (by identity) not to trace into, e.g. ones whose forward fx
    cannot trace."""
    with modes_preserved(model, training):
        return LCNNTracer(leaf_ids=[id(m) for m in leaves]).trace(model)


def graph_module(root: nn.Module, graph: fx.Graph, *, cls: type[fx.GraphModule] = fx.GraphModule,
                 class_name: str | None = None) -> fx.GraphModule:
    """An ``fx.GraphModule`` (of class ``cls``) running ``graph`` over ``root``'s own submodules.

    Unlike a bare ``fx.GraphModule(root, graph)`` (which rebuilds containers as plain modules), the user's
    module hierarchy is kept: every child of ``root`` is installed as it is, so ``model.features[0]`` works and
    the state-dict keys are exactly the original ones."""
    gm = cls(root, graph, class_name=class_name or type(root).__name__)
    for name, child in root.named_children():
        setattr(gm, name, child)
    return gm


def trace_module(model: nn.Module, *, training: bool | None = None, leaves: Iterable[nn.Module] = (),
                 cls: type[fx.GraphModule] = fx.GraphModule) -> fx.GraphModule:
    """:func:`trace` then :func:`graph_module`: ``model`` as a GraphModule traced by :class:`LCNNTracer`."""
    return graph_module(model, trace(model, training=training, leaves=leaves), cls=cls)


def is_leaf(module: nn.Module) -> bool:
    """Whether :class:`LCNNTracer` treats ``module`` as a leaf (never traces into it)."""
    return LCNNTracer().is_leaf_module(module, "")


def graph_signature(graph: fx.Graph) -> list[tuple[str, Any]]:
    """A coarse fingerprint of a graph (op and target of every node); :func:`compare_traces` is the full test."""
    return [(n.op, n.target if isinstance(n.target, str) else getattr(n.target, "__name__", repr(n.target)))
            for n in graph.nodes]


# ---------------------------------------------------------------------------------------------- train vs eval
@dataclass(frozen=True)
class FlagArg:
    """A constant boolean argument that is the training flag (``negated``: its negation) of node ``index``."""

    index: int
    key: int | str  # position in args (int) or name in kwargs (str)
    negated: bool = False


@dataclass(frozen=True)
class TraceComparison:
    """How the train-mode and the eval-mode traces of one forward relate.

    ``same``: identical op by op (target, arguments, wiring) except for ``flags``, constant booleans that are
    True in train and False in eval (or the reverse: ``negated``), i.e. the training flag read at trace time.
    ``first_difference``: index of the first node where the traces differ otherwise (None when ``same``).
    """

    same: bool
    flags: tuple[FlagArg, ...] = ()
    first_difference: int | None = None
    nodes: tuple[tuple[fx.Node, fx.Node], ...] = field(default=(), repr=False, compare=False)

    @property
    def identical(self) -> bool:
        return self.same and not self.flags


def compare_traces(g_train: fx.Graph, g_eval: fx.Graph) -> TraceComparison:
    """Compare two traces of the same forward node by node: op, target, every argument, and the wiring (which
    earlier node each argument reads). See :class:`TraceComparison`."""
    train, evl = list(g_train.nodes), list(g_eval.nodes)
    pos_t = {n: i for i, n in enumerate(train)}
    pos_e = {n: i for i, n in enumerate(evl)}

    def same(a: Any, b: Any) -> bool:
        if isinstance(a, fx.Node) or isinstance(b, fx.Node):
            return isinstance(a, fx.Node) and isinstance(b, fx.Node) and pos_t.get(a) == pos_e.get(b)
        if type(a) is not type(b):
            return False
        if isinstance(a, (tuple, list)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, slice):
            return same((a.start, a.stop, a.step), (b.start, b.stop, b.step))
        try:
            return a is b or bool(a == b)
        except Exception:  # noqa: BLE001 - e.g. tensors: compare by identity only
            return False

    flags: list[FlagArg] = []
    pairs = tuple(zip(train, evl))
    for i, (a, b) in enumerate(pairs):
        if a.op != b.op or not same(a.target, b.target) or len(a.args) != len(b.args) \
                or a.kwargs.keys() != b.kwargs.keys():
            return TraceComparison(False, first_difference=i, nodes=pairs)
        slots = [(k, a.args[k], b.args[k]) for k in range(len(a.args))]
        slots += [(k, a.kwargs[k], b.kwargs[k]) for k in a.kwargs]
        for key, x, y in slots:
            if same(x, y):
                continue
            if type(x) is bool and type(y) is bool:  # True/False: the flag itself or its negation
                flags.append(FlagArg(i, key, negated=not x))
                continue
            return TraceComparison(False, first_difference=i, nodes=pairs)
    if len(train) != len(evl):
        return TraceComparison(False, first_difference=len(pairs), nodes=pairs)
    return TraceComparison(True, tuple(flags), nodes=pairs)


def call_owner(node: fx.Node) -> str:
    """Path (relative to the traced root, "" for the root) of the module whose forward made the call ``node``:
    the innermost entry of fx's ``nn_module_stack``. It owns the training flag the call reads, and the
    conversion names a functional call site's new module under it."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else ""


def bind_training_flags(graph: fx.Graph, flags: Iterable[FlagArg]) -> list[tuple[fx.Node, str]]:
    """Make every flag argument of ``graph`` (the train-mode trace) read ``<owner>.training`` at run time.

    The owner is the module whose forward made the call (:func:`call_owner`): what ``self.training`` meant in
    the source. One ``get_attr`` node per owner reads the flag (``operator.not_`` of it for a negated flag).
    Returns (node, owner path) for each rewired call."""
    nodes = list(graph.nodes)
    readers: dict[tuple[str, bool], fx.Node] = {}
    done: list[tuple[fx.Node, str]] = []
    for flag in flags:
        node = nodes[flag.index]
        owner = call_owner(node)
        key = (owner, flag.negated)
        if key not in readers:
            with graph.inserting_before(node):
                value = graph.get_attr(f"{owner}.training" if owner else "training")
                if flag.negated:
                    value = graph.call_function(operator.not_, (value,))
            readers[key] = value
        if isinstance(flag.key, int):
            args = list(node.args)
            args[flag.key] = readers[key]
            node.args = tuple(args)
        else:
            node.kwargs = {**node.kwargs, flag.key: readers[key]}
        done.append((node, owner))
    return done


@dataclass(frozen=True)
class ModeFreeTrace:
    """The result of :func:`trace_both_modes`: the train-mode and eval-mode traces and how they relate.

    ``graph``: the train-mode graph with every training-flag argument bound to ``<owner>.training``, so that it
    runs correctly in both modes; None when the two traces differ otherwise (``comparison`` says where; ``train``
    and ``eval`` are the two traces). ``bound_flags``: (call node, owner path) of each rewired flag argument.
    """

    comparison: TraceComparison
    train: fx.Graph = field(repr=False)
    eval: fx.Graph = field(repr=False)
    bound_flags: tuple[tuple[fx.Node, str], ...] = ()

    @property
    def graph(self) -> fx.Graph | None:
        return self.train if self.comparison.same else None


def trace_both_modes(model: nn.Module, *, leaves: Iterable[nn.Module] = ()) -> ModeFreeTrace:
    """Trace ``model`` in train and in eval mode and merge the two into one graph that serves both modes.

    A single trace bakes the mode it was taken in into the graph (``F.dropout(x, p, training=self.training)``
    becomes always-on or always-off; ``if self.training: return out, aux`` keeps one branch). The traces are
    compared node by node (:func:`compare_traces`); when they differ only in constant booleans equal to the
    training flag, those arguments are made to read the owning module's ``training`` at run time
    (:func:`bind_training_flags`). Raises whatever the tracer raises on an untraceable forward."""
    leaves = list(leaves)
    g_train = trace(model, training=True, leaves=leaves)
    g_eval = trace(model, training=False, leaves=leaves)
    cmp = compare_traces(g_train, g_eval)
    bound = tuple(bind_training_flags(g_train, cmp.flags)) if cmp.same else ()
    return ModeFreeTrace(cmp, g_train, g_eval, bound)
