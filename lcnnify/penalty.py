"""The curvature penalty (paper eq. 5) and optimizer parameter groups.

    R = lambda_beta * sum_i beta_i + lambda_gamma * sum_j log(gamma_j)

over every centered softplus i and every gamma-Lipschitz BatchNorm j of the model, read straight from the
parameters (no forward pass, no hooks). A per-channel beta contributes the mean over its channels, so that
switching ``per_channel_beta`` on does not rescale the penalty.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from ._utils import model_device, model_dtype
from .config import LCNNConfig
from .nn import CenteredSoftplus, LipschitzBatchNorm


def _lcnn_modules(model: nn.Module) -> Iterator[nn.Module]:
    for m in model.modules():
        if isinstance(m, (CenteredSoftplus, LipschitzBatchNorm)):
            yield m


def curvature_penalty(model: nn.Module, lambda_beta: float | None = None,
                      lambda_gamma: float | None = None) -> torch.Tensor:
    """lambda_beta * sum(beta) + lambda_gamma * sum(log gamma) over the model's LCNN layers (paper eq. 5).

    The lambdas default to the model's ``lcnn_config`` (set by :func:`lcnnify.lcnnify`), else to
    :class:`LCNNConfig`'s defaults (1e-2 each, as the reference implementation). Works on any module that
    holds LCNN layers, converted or hand-built. Returns a 0-dim tensor on the parameters' device (0 if the
    model has no LCNN layer).
    """
    cfg: LCNNConfig = getattr(model, "lcnn_config", None) or LCNNConfig()
    lb = cfg.lambda_beta if lambda_beta is None else lambda_beta
    lg = cfg.lambda_gamma if lambda_gamma is None else lambda_gamma
    betas: list[torch.Tensor] = []
    log_gammas: list[torch.Tensor] = []
    for m in _lcnn_modules(model):
        if isinstance(m, CenteredSoftplus):
            betas.append(m.beta.mean())
        else:
            log_gammas.append(m.log_gamma())  # log(1 + exp(rho)), stable
    total = torch.zeros((), device=model_device(model), dtype=model_dtype(model))
    if betas:
        total = total + lb * torch.stack(betas).sum()
    if log_gammas:
        total = total + lg * torch.stack(log_gammas).sum()
    return total


def curvature_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The beta and gamma parameters of the model (those the penalty acts on)."""
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for m in _lcnn_modules(model):
        # CenteredSoftplus holds only log_beta; LipschitzBatchNorm holds weight, bias and the gamma parameter
        # (a parametrized gamma lives under parametrizations.*; a fused BN+act's act/drop are visited on their own)
        for name, p in m.named_parameters():
            if name in ("weight", "bias") or name.startswith(("act.", "drop.")):
                continue
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


def param_groups(model: nn.Module, weight_decay: float, **group_options: Any) -> list[dict[str, Any]]:
    """Optimizer parameter groups: everything with ``weight_decay`` except beta/gamma (weight decay 0).

    ``torch.optim.SGD(param_groups(model, 5e-4), lr=0.1, momentum=0.9)`` is the paper's recipe: beta and gamma
    are already penalized by eq. 5, so weight decay would double-count them (as the reference does).
    Only parameters with ``requires_grad`` are included; empty groups are dropped.
    """
    special = {id(p) for p in curvature_parameters(model)}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in special]
    curv = [p for p in curvature_parameters(model) if p.requires_grad]
    groups = [{"params": rest, "weight_decay": weight_decay, **group_options},
              {"params": curv, "weight_decay": 0.0, **group_options}]
    return [g for g in groups if g["params"]]
