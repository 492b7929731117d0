"""The training methods of the paper's §5 as one table: which model each trains and which loss terms it adds.

============== ======================================= =====================================================
method         model (from a ReLU base model)          loss of a batch
============== ======================================= =====================================================
standard       softplus, beta = 1e3 (paper's baseline)  CE
lcnn           ``lcnnify(model)``                       CE + ``model.curvature_penalty()``
gradreg        softplus, beta = 1e3                     CE + w * ``gradient_norm_penalty``
lcnn+gradreg   ``lcnnify(model)``                       CE + curvature penalty + w * ``gradient_norm_penalty``
cure           softplus, beta = 1e3                     CE + 4 * ``cure_penalty`` (h = 0.1)
softplus+wd    softplus, beta = 10 (Dombrowski et al.)  CE (its own weight decay, see the recipe)
adversarial    softplus, beta = 1e3                     CE on l2-PGD examples (eps 0.1, 3 steps; Madry)
============== ======================================= =====================================================

Each row is a :class:`MethodSpec` in :data:`METHOD_SPECS`; :func:`prepare_model` and :func:`method_loss` read
the table and contain no per-method branches. A new method is one more row.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..penalty import curvature_penalty as _curvature_penalty
from ..regularizers import (
    DEFAULT_CURE_H,
    adversarial_examples,
    cure_penalty,
    gradient_norm_penalty,
    gradreg_weight_from_reference,
    softplus_model,
)

__all__ = ["MethodSpec", "METHOD_SPECS", "METHODS", "METHOD_LABELS", "get_method", "prepare_model",
           "method_loss", "train_step", "StepLoss", "has_lcnn_layers", "BASELINE_SOFTPLUS_BETA",
           "WD_SOFTPLUS_BETA", "DEFAULT_CURE_WEIGHT"]

#: Softplus beta of the paper's baseline models ("to mimic ReLU, and yet have well-defined curvatures").
BASELINE_SOFTPLUS_BETA = 1e3
#: Softplus beta of the "softplus + weight decay" baseline (reference implementation: ``low_softplus``).
WD_SOFTPLUS_BETA = 10.0
#: CURE's regularization weight (gamma = 4 in Moosavi-Dezfooli et al. 2019).
DEFAULT_CURE_WEIGHT = 4.0


@dataclass(frozen=True)
class MethodSpec:
    """One training method: the model it trains and the terms of its loss.

    Attributes:
        name, label: the method's key (``fit(method=name)``) and its display name in tables.
        lcnn: the model is ``lcnnify(base)`` (True) or the softplus baseline ``softplus_model(base, beta)``.
        softplus_beta: the baseline's beta, as ``(prepare_model keyword, default)``; ``None`` for LCNNs.
        curvature_penalty: add ``model.curvature_penalty()`` (paper eq. 5).
        gradreg: add ``w * gradient_norm_penalty`` (double backpropagation).
        cure: add ``cure_weight * cure_penalty``.
        adversarial: train on l2-PGD examples instead of the clean batch.
        weight_decay_field: the :class:`~lcnnify.train.Recipe` field that overrides the weight decay for this
            method when it is not ``None`` (``softplus+wd``: ``softplus_wd_weight_decay``).
    """

    name: str
    label: str
    lcnn: bool = False
    softplus_beta: tuple[str, float] | None = ("softplus_beta", BASELINE_SOFTPLUS_BETA)
    curvature_penalty: bool = False
    gradreg: bool = False
    cure: bool = False
    adversarial: bool = False
    weight_decay_field: str | None = None

    def terms(self) -> tuple[str, ...]:
        """The names of the penalty terms this method logs (besides ``loss`` and ``total_loss``)."""
        return tuple(t for t, on in (("curvature_penalty", self.curvature_penalty), ("gradreg", self.gradreg),
                                     ("cure", self.cure)) if on)


#: The methods of the paper's §5 (Tables 1 and 2), in the paper's order.
METHOD_SPECS: dict[str, MethodSpec] = {s.name: s for s in (
    MethodSpec("standard", "Standard"),
    MethodSpec("lcnn", "LCNN", lcnn=True, softplus_beta=None, curvature_penalty=True),
    MethodSpec("gradreg", "GradReg", gradreg=True),
    MethodSpec("lcnn+gradreg", "LCNN + GradReg", lcnn=True, softplus_beta=None, curvature_penalty=True,
               gradreg=True),
    MethodSpec("cure", "CURE", cure=True),
    MethodSpec("softplus+wd", "Softplus + Wt. Decay", softplus_beta=("wd_softplus_beta", WD_SOFTPLUS_BETA),
               weight_decay_field="softplus_wd_weight_decay"),
    MethodSpec("adversarial", "Adversarial Training", adversarial=True),
)}
#: The method names, in the paper's order.
METHODS = tuple(METHOD_SPECS)
#: Display names, in the paper's order.
METHOD_LABELS = {name: spec.label for name, spec in METHOD_SPECS.items()}


def get_method(method: str | MethodSpec) -> MethodSpec:
    """The :class:`MethodSpec` of ``method`` (a name or a spec). Raises ValueError listing the valid names."""
    if isinstance(method, MethodSpec):
        return method
    spec = METHOD_SPECS.get(method)  # type: ignore[arg-type]
    if spec is None:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(repr(m) for m in METHODS)}")
    return spec


# ------------------------------------------------------------------------------------------------ model
def has_lcnn_layers(model: nn.Module) -> bool:
    """Whether ``model`` is already an LCNN (converted by :func:`lcnnify.lcnnify`, or holds LCNN layers)."""
    from ..convert.api import is_converted

    return getattr(model, "lcnn_report", None) is not None or is_converted(model)


def prepare_model(model: nn.Module, method: str | MethodSpec, *, example_inputs: Any = None,
                  softplus_beta: float | None = None, wd_softplus_beta: float | None = None,
                  **lcnn_overrides: Any) -> nn.Module:
    """The model that ``method`` trains, built from a user's base (ReLU) model. ``model`` is never mutated.

    * softplus baselines (``standard``, ``gradreg``, ``cure``, ``adversarial``: beta = ``softplus_beta``,
      default 1e3; ``softplus+wd``: ``wd_softplus_beta``, default 10): :func:`~lcnnify.regularizers.softplus_model`;
    * LCNN methods: ``lcnnify(model, example_inputs=example_inputs, **lcnn_overrides)``; a model that is already
      an LCNN is copied, not converted again.

    Raises:
        ValueError: unknown method; a baseline method given a model that is already an LCNN; LCNN options for
            a model that is already an LCNN.
        TypeError: LCNN options for a baseline method.
    """
    spec = get_method(method)
    if spec.lcnn:
        if has_lcnn_layers(model):
            if lcnn_overrides:
                raise ValueError(f"the model is already an LCNN; LCNN options {sorted(lcnn_overrides)} cannot be "
                                 "applied again (convert the base model with them instead)")
            return copy.deepcopy(model)
        from ..convert import lcnnify

        return lcnnify(model, example_inputs=example_inputs, **lcnn_overrides)
    if lcnn_overrides:
        raise TypeError(f"prepare_model(method={spec.name!r}) got unexpected options {sorted(lcnn_overrides)} "
                        "(LCNN conversion options only apply to the 'lcnn' methods)")
    if has_lcnn_layers(model):
        raise ValueError(f"method {spec.name!r} trains the paper's softplus baseline built from a base (ReLU) "
                         "model, but this model is already an LCNN. Pass the original model, or "
                         "fit(..., prepare=False) to train this model as it is.")
    assert spec.softplus_beta is not None
    option, default = spec.softplus_beta
    given = {"softplus_beta": softplus_beta, "wd_softplus_beta": wd_softplus_beta}[option]
    return softplus_model(model, beta=default if given is None else given)


# ----------------------------------------------------------------------------------------------- loss
@dataclass
class StepLoss:
    """What :func:`method_loss` returns: the loss to back-propagate and its parts (all for one batch).

    ``terms`` holds detached floats: ``loss`` (the data term, CE), and for the methods that use them
    ``curvature_penalty`` (as added, i.e. weighted by lambda_beta/lambda_gamma and ``penalty_scale``),
    ``gradreg`` (the unweighted mean squared input-gradient norm) and ``cure`` (unweighted); ``total_loss`` is
    the sum as trained.
    """

    total: Tensor
    logits: Tensor
    y: Tensor
    terms: dict[str, float] = field(default_factory=dict)


def _model_curvature_penalty(model: nn.Module) -> Tensor:
    fn = getattr(model, "curvature_penalty", None)
    return fn() if callable(fn) else _curvature_penalty(model)


def method_loss(model: nn.Module, x: Tensor, y: Tensor, method: str | MethodSpec, *,
                gradreg_weight: float | None = None, cure_weight: float = DEFAULT_CURE_WEIGHT,
                cure_h: float | None = None, adv_eps: float = 0.1, adv_steps: int = 3,
                generator: torch.Generator | None = None, cure_mode: str = "eval",
                penalty_scale: float = 1.0) -> StepLoss:
    """The training loss of one batch for ``method`` (the model should be in train mode).

    ``gradreg_weight`` defaults to the reference's constant converted for this batch size
    (:func:`~lcnnify.regularizers.gradreg_weight_from_reference`). ``generator`` drives the random start of the
    adversarial examples (default: the global RNG). ``penalty_scale`` multiplies the curvature penalty (the
    fine-tuning recipe ramps it from 0 to 1).
    """
    spec = get_method(method)
    terms: dict[str, float] = {}
    if spec.adversarial:
        x = adversarial_examples(model, x, y, adv_eps, adv_steps, generator=generator)
    if spec.gradreg:
        x = x.detach().requires_grad_(True)
    logits = model(x)
    total = data = F.cross_entropy(logits, y)
    terms["loss"] = data.item()
    if spec.curvature_penalty:
        cp = penalty_scale * _model_curvature_penalty(model)
        total = total + cp
        terms["curvature_penalty"] = cp.item()
    if spec.gradreg:
        w = gradreg_weight_from_reference(x.shape[0]) if gradreg_weight is None else gradreg_weight
        gr = gradient_norm_penalty(model, x, y, logits=logits)
        total = total + w * gr
        terms["gradreg"] = gr.item()
    if spec.cure:
        cu = cure_penalty(model, x, y, h=DEFAULT_CURE_H if cure_h is None else cure_h, mode=cure_mode)
        total = total + cure_weight * cu
        terms["cure"] = cu.item()
    terms["total_loss"] = total.item()
    return StepLoss(total=total, logits=logits, y=y, terms=terms)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
               method: str | MethodSpec, **loss_kwargs: Any) -> StepLoss:
    """One training step: ``zero_grad``, :func:`method_loss`, ``backward``, ``optimizer.step()``."""
    optimizer.zero_grad(set_to_none=True)
    out = method_loss(model, x, y, method, **loss_kwargs)
    out.total.backward()
    optimizer.step()
    return out
