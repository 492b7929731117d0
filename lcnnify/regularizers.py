"""Training-side regularizers and baselines of the paper's experiments (paper §5).

* :func:`gradient_norm_penalty` -- "GradReg" (Drucker & LeCun 1992 double backpropagation; paper ref. [31]).
* :func:`cure_penalty` -- CURE (Moosavi-Dezfooli et al., CVPR 2019; paper ref. [6]).
* :func:`adversarial_examples` -- l2-PGD examples for Madry-style adversarial training (paper: eps 0.1, 3 steps).
* :func:`softplus_model` -- the "softplus + weight decay" baseline of Dombrowski et al. (paper ref. [7]), and the
  paper's *standard* baseline (softplus with beta = 1e3 to mimic ReLU while having defined curvature).

Every penalty returns a differentiable scalar that is meant to be *added* to the training loss, multiplied by a
weight of the caller's choice; the penalties never call ``.backward()`` themselves, so after a call the
parameters' ``.grad`` are exactly what they were before (gradients reach the parameters only when the caller
back-propagates the returned scalar). Every function leaves each module's ``training`` flag as it found it.

All of them work on any ``nn.Module`` classifier ``model(x) -> logits``; ``loss_fn(logits, y, reduction="none")``
must return per-sample losses (the convention of ``torch.nn.functional`` losses; default cross-entropy on the
logits, i.e. the post-softmax loss the paper measures).
"""
from __future__ import annotations

import copy
import warnings
from typing import Callable, ContextManager

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from lcnnify._utils import modes_preserved, redirect_later_readers
from lcnnify.convert.trace import graph_module, trace_both_modes
from lcnnify.errors import ConversionWarning
from lcnnify.ops import inplace_source

__all__ = [
    "gradient_norm_penalty",
    "cure_penalty",
    "adversarial_examples",
    "softplus_model",
    "DEFAULT_CURE_H",
    "REFERENCE_GRADREG_CONSTANT",
    "gradreg_weight_from_reference",
]

LossFn = Callable[..., torch.Tensor]

#: Default finite-difference step of :func:`cure_penalty` for inputs in [0, 1] (see its docstring).
DEFAULT_CURE_H = 0.1
#: The reference implementation's GradReg strength (``--reg-gnorm``), which multiplies ``1e5 * ||grad||^2 / B``.
REFERENCE_GRADREG_CONSTANT = 1e-3


# ----------------------------------------------------------------------------------------------- helpers
def _mode(model: nn.Module, mode: str) -> ContextManager[nn.Module]:
    """Put ``model`` in ``mode`` ("eval" or "current") and restore every submodule's own flag afterwards."""
    if mode not in ("eval", "current"):
        raise ValueError(f"mode must be 'eval' or 'current', got {mode!r}")
    return modes_preserved(model, training=False if mode == "eval" else None)


def _per_sample_losses(loss_fn: LossFn, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    try:
        losses = loss_fn(logits, y, reduction="none")
    except TypeError as exc:  # pragma: no cover - depends on the user's loss
        raise TypeError(
            "loss_fn must accept reduction='none' and return per-sample losses (like torch.nn.functional "
            f"losses); calling it that way failed: {exc}") from exc
    if losses.dim() == 0 and logits.shape[0] != 1:
        raise ValueError("loss_fn(..., reduction='none') returned a scalar; per-sample losses are needed")
    return losses


def _input_leaf(x: torch.Tensor) -> torch.Tensor:
    """A tensor to differentiate with respect to: ``x`` itself if it already requires grad, else a detached leaf."""
    return x if x.requires_grad else x.detach().requires_grad_(True)


def _sq_norms(g: torch.Tensor) -> torch.Tensor:
    return g.reshape(g.shape[0], -1).pow(2).sum(dim=1)


# ------------------------------------------------------------------------------------------ GradReg
def gradient_norm_penalty(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
                          loss_fn: LossFn = F.cross_entropy,
                          logits: torch.Tensor | None = None) -> torch.Tensor:
    r"""Gradient-norm regularizer ("GradReg"): :math:`\frac1B\sum_i \|\nabla_{x_i} \ell_i\|_2^2`.

    Double backpropagation (Drucker & LeCun): the input gradient is computed with ``create_graph=True``, so the
    returned scalar back-propagates into the parameters. One ``autograd.grad`` of the *sum* of the per-sample
    losses gives every per-sample gradient at once, because loss ``i`` depends on ``x_i`` only. That holds for a
    model in eval mode, and for any model without cross-sample operations. **In train mode BatchNorm couples
    the samples** through the batch statistics, so the gradient of the sum also carries the (small, O(1/B))
    cross terms; the reference implementation does exactly this (it differentiates its training-mode loss), and
    we follow it and accept that.

    The model is run in its *current* mode (as in the reference: the penalty is part of the training step); in
    train mode that forward updates BatchNorm running statistics once more unless ``logits`` is given.

    Args:
        model: any classifier ``x -> logits``.
        x, y: a batch of inputs and labels.
        loss_fn: ``loss_fn(logits, y, reduction="none")`` -> per-sample losses (extra dims are summed).
        logits: optionally the logits the training step already computed *from this very* ``x`` (then ``x``
            must require grad and no second forward is made), e.g.::

                x.requires_grad_(True); out = model(x); loss = F.cross_entropy(out, y)
                loss = loss + w * gradient_norm_penalty(model, x, y, logits=out)

    Returns:
        A differentiable scalar, independent of the batch size (duplicating the batch gives the same value).

    Matching the reference weight. The reference code (``GradNormRegularizedLoss``) adds
    ``reg * 1e5 * ||grad_x mean_i l_i||^2 / B`` with ``reg = 1e-3``. Since the gradient of the mean loss is
    ``g_i / B`` per sample, that is ``reg * 1e5 / B**3 * sum_i ||g_i||^2 = (reg * 1e5 / B**2) * penalty``. So to
    reproduce the reference at batch size ``B``, pass the weight ``reg * 1e5 / B**2``
    (:func:`gradreg_weight_from_reference`): ``1e-3 * 1e5 / 128**2 = 6.10e-3`` for the paper's ``B = 128``.
    Our penalty is batch-size independent; the reference strength falls as ``1 / B**2``.
    """
    if logits is None:
        xin = _input_leaf(x)
        out = model(xin)
    else:
        if not x.requires_grad:
            raise ValueError("gradient_norm_penalty(logits=...) needs the x the logits were computed from, "
                             "with x.requires_grad=True before the forward pass")
        xin, out = x, logits
    losses = _per_sample_losses(loss_fn, out, y)
    (g,) = torch.autograd.grad(losses.sum(), xin, create_graph=True)
    return _sq_norms(g).mean()


def gradreg_weight_from_reference(batch_size: int, reg: float = REFERENCE_GRADREG_CONSTANT) -> float:
    """The weight for :func:`gradient_norm_penalty` that reproduces the reference GradReg term at ``batch_size``.

    ``reg * 1e5 / batch_size**2`` (see :func:`gradient_norm_penalty`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return reg * 1e5 / batch_size ** 2


# ---------------------------------------------------------------------------------------------- CURE
def cure_penalty(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, h: float = DEFAULT_CURE_H,
                 loss_fn: LossFn = F.cross_entropy, mode: str = "eval") -> torch.Tensor:
    r"""CURE curvature regularizer: :math:`\frac1B\sum_i \|\nabla \ell_i(x_i + h z_i) - \nabla \ell_i(x_i)\|_2^2`.

    Moosavi-Dezfooli et al. (2019): ``z_i = sign(g_i) / ||sign(g_i)||_2`` with ``g_i = grad_x l_i(x_i)`` (treated
    as a constant, i.e. detached), so ``h z_i`` is a step of l2 length ``h`` along the direction of the sign of
    the gradient (a proxy of the direction of highest curvature). The finite difference is the exact change of
    the gradient along that step; for small ``h`` it is ``h * H_i z_i`` with ``H_i`` the input Hessian, so the
    penalty is ~ ``h**2 * mean ||H_i z_i||^2``. (A sample whose gradient is exactly zero gets ``z = 0``.)

    Scaling. The CURE paper trains on ``loss + gamma * L_r`` with ``L_r`` the *squared* norm above (gamma = 4
    and h = 1.5 are the values usually quoted from it; they are not checked against the CURE paper here, so
    treat them as unverified). The public reimplementation (F-Salehi/CURE_robustness, checked) uses
    ``lambda_ = 4``, but returns ``lambda_ * mean ||diff||`` (not squared) with ``z`` of length ``h`` and a
    step-length schedule whose default is ``h = 3``, all in eval mode. We return the paper's squared term,
    *unweighted*: multiply by the weight yourself (CURE: 4). Divide the weight by ``h**2`` if you want an
    ``h``-independent penalty on ``||H z||^2``.

    Default ``h = 0.1`` (inputs in [0, 1]). CURE picks ``h`` of the order of the perturbation against which
    robustness is wanted (the reimplementation above uses a few units on its scale); with inputs in [0, 1] the
    paper (LCNN §5) trains its adversarial-training baseline at l2 radius 0.1 and evaluates PGD at
    0.05 ... 0.2, so ``h = 0.1`` measures the gradient change at exactly that scale. (For a 3x32x32 image that
    is ~1.8e-3, i.e. ~0.5/255, per pixel.) Rescale ``h`` with the input range if your inputs are not in [0, 1].

    Args:
        mode: ``"eval"`` (default, as CURE's reference code: every forward of the regularizer is in eval mode,
            which makes the samples independent, keeps BatchNorm running statistics free of the perturbed
            batches and freezes spectral-norm power iterations) or ``"current"`` (the model's own mode). The
            modes of all submodules are restored afterwards.

    Returns:
        A differentiable scalar (two forward passes, one double-backward graph).
    """
    if not h > 0:
        raise ValueError(f"h must be > 0, got {h}")
    with _mode(model, mode):
        xin = x.detach().requires_grad_(True)
        loss0 = _per_sample_losses(loss_fn, model(xin), y).sum()
        (g0,) = torch.autograd.grad(loss0, xin, create_graph=True)
        s = torch.sign(g0.detach())
        norms = s.reshape(s.shape[0], -1).norm(dim=1).clamp_min(1.0)  # ||sign|| is 0 or >= 1
        z = s / norms.view(-1, *([1] * (s.dim() - 1)))
        loss1 = _per_sample_losses(loss_fn, model(xin + h * z), y).sum()
        (g1,) = torch.autograd.grad(loss1, xin, create_graph=True)
    return _sq_norms(g1 - g0).mean()


# ------------------------------------------------------------------------------ adversarial training
def adversarial_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, *,
                         step_size: float | None = None, random_start: bool = True,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """l2-PGD adversarial examples for Madry-style adversarial training (paper §5: eps = 0.1, 3 steps).

    Runs :func:`lcnnify.metrics.pgd_l2` (the same attack used for the robustness evaluation; inputs must be in
    [0, 1], it raises a ``MeasurementError`` otherwise) and returns ``x_adv`` detached, with
    ``||x_adv - x||_2 <= eps`` per sample and ``x_adv`` in [0, 1]. ``step_size`` defaults to pgd_l2's
    ``2.5 * eps / steps``. Train on ``loss_fn(model(x_adv), y)`` afterwards, in train mode.

    Mode. Many adversarial-training codebases attack the model in its current (train) mode. We attack in
    **eval mode** and restore every submodule's mode afterwards (pgd_l2 does the same): the attack's forward
    passes then (1) do not pollute BatchNorm running statistics with adversarial batches, (2) do not advance
    the spectral-norm power iterations of an LCNN once per attack step, and (3) attack the deterministic
    function that will be deployed (dropout off).

    The parameters' ``requires_grad`` flags are switched off during the attack (and restored), so it neither
    builds parameter-gradient graphs nor touches ``.grad``.
    """
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    from lcnnify.metrics.robustness import pgd_l2  # lazy: metrics is optional for the rest of this module

    # pgd_l2 attacks in eval mode with the parameters' requires_grad off, restores both, and projects onto the
    # eps-ball and the [0, 1] box
    return pgd_l2(model, x.detach(), y, eps, steps=steps, step_size=step_size, random_start=random_start,
                  generator=generator).detach()


# ---------------------------------------------------------------------------------- softplus baseline
_RELU_MODULES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6, nn.LeakyReLU)
_RELU_FUNCTIONS = frozenset({F.relu, torch.relu, F.relu6, F.leaky_relu, F.relu_, torch.relu_, F.leaky_relu_})
_RELU_METHODS = frozenset({"relu", "relu_"})


def _swap_relu_modules(model: nn.Module, beta: float, threshold: float) -> int:
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _RELU_MODULES):
                setattr(parent, name, nn.Softplus(beta=beta, threshold=threshold))
                count += 1
    return count


def _is_relu_call(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _RELU_FUNCTIONS) or (
        node.op == "call_method" and node.target in _RELU_METHODS)


def softplus_model(model: nn.Module, beta: float = 1e3, inplace: bool = False, *,
                   threshold: float = 20.0) -> nn.Module:
    """The model with every ReLU-family activation replaced by a fixed-beta ``nn.Softplus(beta)``.

    The "softplus + weight decay" baseline (Dombrowski et al.): softplus activations, no spectral norm, no
    learnable beta; the weight decay is the optimizer's job (``weight_decay=...``), not this function's. With
    ``beta = 1e3`` (the default) it is also the paper's *standard* baseline: softplus that mimics ReLU
    (|softplus_beta - relu| <= log(2)/beta) yet has a well-defined curvature, so every method is measured on a
    twice-differentiable model.

    Replaced: ``nn.ReLU``, ``nn.ReLU6`` and ``nn.LeakyReLU`` modules (ReLU6's clipping and LeakyReLU's slope are
    not kept: the baseline is plain softplus), and -- when the model traces with ``torch.fx`` -- the functional
    call sites ``F.relu``, ``torch.relu``, ``F.relu6``, ``F.leaky_relu``, their in-place variants and
    ``x.relu()`` / ``x.relu_()``, each by its own ``nn.Softplus`` submodule named ``softplus_<node>``. The model
    is traced with lcnnify's tracer in train and in eval mode (:func:`lcnnify.convert.trace.trace_both_modes`):
    dropout reading ``self.training`` keeps following the mode; modules the op registry knows as a unit
    (dropout, drop-path, registered activations) are not traced into.

    Returns:
        A deep copy of the model of the same class if it has no functional ReLU calls; otherwise a
        ``torch.fx.GraphModule`` (same module hierarchy and parameter names). If the model does not trace, or
        its forward takes different paths in train and eval mode (auxiliary heads), only the modules are
        swapped and a :class:`~lcnnify.errors.ConversionWarning` says that functional calls (if any) were left.
        With ``inplace=True`` the modules are swapped in ``model`` itself (a GraphModule sharing its
        parameters is returned if functional calls had to be rewritten).
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if isinstance(model, _RELU_MODULES):
        return nn.Softplus(beta=beta, threshold=threshold)
    m = model if inplace else copy.deepcopy(model)
    _swap_relu_modules(m, beta, threshold)

    left = (f"only ReLU/ReLU6/LeakyReLU *modules* were replaced, functional relu calls inside forward() (if "
            "any) were left as they are.")
    try:
        traced = trace_both_modes(m)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: module swap only
        warnings.warn(f"softplus_model: {type(model).__name__} could not be traced with torch.fx "
                      f"({type(exc).__name__}: {exc}); {left}", ConversionWarning, stacklevel=2)
        return m
    graph = traced.graph
    if graph is None:  # one graph would bake one mode's branch (auxiliary heads) into the other mode
        if any(_is_relu_call(n) for g in (traced.train, traced.eval) for n in g.nodes):
            warnings.warn(f"softplus_model: the forward of {type(model).__name__} takes different paths in train "
                          f"and eval mode; {left}", ConversionWarning, stacklevel=2)
        return m

    sites = [n for n in graph.nodes if _is_relu_call(n)]
    if not sites:
        return m

    gm = graph_module(m, graph)
    modules = dict(gm.named_modules())
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in sites:
        inp = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
        src = inplace_source(node, modules)
        name = f"softplus_{node.name}"
        gm.add_submodule(name, nn.Softplus(beta=beta, threshold=threshold))
        with graph.inserting_after(node):
            new = graph.call_module(name, (inp,))
        order[new] = order[node]
        node.replace_all_uses_with(new)
        if src is not None:  # the in-place op also changed its input: later readers must read the softplus
            redirect_later_readers(src, new, order)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm

