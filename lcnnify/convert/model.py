"""The converted model as an object: ``curvature_penalty()``, ``lcnn_report``, ``lcnn_config``, and how it
survives ``copy.copy``, ``copy.deepcopy``, ``pickle`` and whole-model ``torch.save`` / ``torch.load``.

* A traced model becomes an :class:`LCNNGraphModule` (an ``fx.GraphModule`` with a real
  ``curvature_penalty`` method). Its copies, deep copies and unpickled copies are LCNNGraphModules again, keep
  ``lcnn_report`` / ``lcnn_config`` and the user's module hierarchy (``model.features[0]`` keeps working).
* A model converted module by module (its own forward could not be traced) keeps its class; its
  ``curvature_penalty`` is a picklable :class:`BoundPenalty` attribute.
* Modules carrying a ``torch.nn.utils.parametrize`` parametrization (spectral norm, weight standardization)
  live in per-instance classes that torch refuses to pickle; :func:`make_picklable` gives those classes a
  ``__reduce_ex__`` that rebuilds them on load (original class, same parametrizations, same tensors).

Loading a whole pickled model needs ``lcnnify`` importable, like any pickled custom module. For a deployment
artefact without lcnnify, use ``lcnnify.freeze(model)``; for checkpoints, ``state_dict()``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from ..config import LCNNConfig
from .report import ConversionReport
from .trace import graph_module

PRESERVED = "_user_preserved_attributes"  # torch.fx.graph_module._USER_PRESERVED_ATTRIBUTES_KEY
LCNN_ATTRIBUTES = ("lcnn_config", "lcnn_report", "lcnn_preservation")


def _penalty(model: nn.Module, lambda_beta: float | None, lambda_gamma: float | None) -> torch.Tensor:
    from ..penalty import curvature_penalty

    return curvature_penalty(model, lambda_beta, lambda_gamma)


class LCNNGraphModule(fx.GraphModule):
    """A converted, traced model: an ``fx.GraphModule`` with the LCNN's penalty, report and config.

    ``curvature_penalty()`` is ``lambda_beta * sum(beta) + lambda_gamma * sum(log gamma)`` over the model's
    LCNN layers (paper eq. 5; see :func:`lcnnify.curvature_penalty`). It exists while the model is an LCNN
    (has ``lcnn_config``); ``lcnnify.freeze`` removes it with the config.
    """

    lcnn_config: LCNNConfig
    lcnn_report: ConversionReport

    @property
    def curvature_penalty(self) -> "BoundPenalty":
        """``model.curvature_penalty(lambda_beta=None, lambda_gamma=None)``: the penalty of paper eq. 5."""
        if "lcnn_config" not in self.__dict__:
            raise AttributeError("curvature_penalty: this model is no longer an LCNN (frozen); "
                                 "use lcnnify.curvature_penalty(model) on the converted model")
        return BoundPenalty(self)

    def _restore_hierarchy(self, children: dict[str, nn.Module]) -> None:
        # fx rebuilds the containers on the way to each called submodule as bare nn.Modules; put the user's back
        for name, child in children.items():
            setattr(self, name, child)
        for attr in LCNN_ATTRIBUTES:
            if attr in self.meta.get(PRESERVED, {}):
                object.__setattr__(self, attr, self.meta[PRESERVED][attr])

    def __copy__(self) -> "LCNNGraphModule":
        res = graph_module(self, self.graph, cls=LCNNGraphModule, class_name=type(self).__name__)
        res.meta = self.meta
        res._restore_hierarchy({})
        return res

    def __deepcopy__(self, memo: dict[int, Any]) -> "LCNNGraphModule":
        res = super().__deepcopy__(memo)
        res._restore_hierarchy({n: memo.get(id(c), c) for n, c in self.named_children()})
        make_picklable(res)
        return res

    def __reduce__(self) -> tuple[Any, ...]:
        _, (body, import_block) = super().__reduce__()
        body["_graphmodule_cls_name"] = type(self).__name__  # the user's class name, as in repr(model)
        return (_rebuild_graph_module, (body, import_block))


def _rebuild_graph_module(body: dict[str, Any], import_block: str) -> LCNNGraphModule:
    """Unpickle an :class:`LCNNGraphModule` (what ``fx.graph_module.reduce_graph_module`` does for a plain one)."""
    from torch.fx.graph_module import _deserialize_graph_module, _forward_from_src

    children = dict(body.get("_modules", {}))
    forward = _forward_from_src(import_block + (body.get("_code") or body["code"]), {})
    gm = _deserialize_graph_module(forward, body, graph_module_cls=LCNNGraphModule)
    gm._restore_hierarchy(children)
    return gm


class BoundPenalty:
    """``model.curvature_penalty`` of a model that is not an :class:`LCNNGraphModule` (picklable, copyable)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, lambda_beta: float | None = None, lambda_gamma: float | None = None) -> torch.Tensor:
        return _penalty(self.model, lambda_beta, lambda_gamma)

    def __reduce__(self) -> tuple[Any, ...]:
        return (BoundPenalty, (self.model,))

    def __repr__(self) -> str:
        return f"<curvature_penalty of {type(self.model).__name__}>"


def attach(model: nn.Module, config: LCNNConfig, report: ConversionReport) -> None:
    """Give a converted model its ``lcnn_config``, ``lcnn_report`` and ``curvature_penalty``."""
    attrs: dict[str, Any] = {"lcnn_config": config, "lcnn_report": report}
    if not isinstance(model, LCNNGraphModule):
        attrs["curvature_penalty"] = BoundPenalty(model)
    for k, v in attrs.items():
        object.__setattr__(model, k, v)
    if isinstance(model, fx.GraphModule):  # survive GraphModule.__deepcopy__ (EMA copies, etc.)
        model.meta.setdefault(PRESERVED, {}).update(attrs)
    make_picklable(model)


# ---------------------------------------------------------------------------------------------- parametrize
def _reduce_parametrized(self: nn.Module, protocol: int) -> tuple[Any, ...]:
    base = type(self).__bases__[0]
    return (_rebuild_parametrized, (base, tuple(self.parametrizations.keys())), self.__dict__)


def _rebuild_parametrized(base: type, names: tuple[str, ...]) -> nn.Module:
    """An empty instance of ``base`` in a fresh parametrized class with properties ``names`` (its state follows)."""
    obj = base.__new__(base)
    parametrize._inject_new_class(obj)
    for name in names:
        parametrize._inject_property(obj, name)
    type(obj).__reduce_ex__ = _reduce_parametrized
    return obj


def make_picklable(model: nn.Module) -> None:
    """Let pickle / ``copy.copy`` handle every parametrized submodule of ``model`` (see module docstring)."""
    for m in model.modules():
        if parametrize.is_parametrized(m) and type(m).__dict__.get("__reduce_ex__") is not _reduce_parametrized:
            type(m).__reduce_ex__ = _reduce_parametrized  # type: ignore[method-assign]

