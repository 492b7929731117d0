"""`freeze()`: bake a trained LCNN into plain torch layers for deployment.

* spectral-norm (and weight-standardization) parametrizations are removed, the weight kept as it is now
  (``torch.nn.utils.parametrize.remove_parametrizations(..., leave_parametrized=True)``): ``conv.weight``
  becomes a plain parameter holding W / sigma;
* every :class:`~lcnnify.nn.LipschitzBatchNorm` becomes the ``nn.BatchNorm{1,2,3}d`` that computes the same
  eval-mode map: its weight is ``w * min(1, gamma / L)`` (frozen-BN semantics: running statistics);
  a fused ``LipschitzBatchNormAct`` becomes ``nn.Sequential(bn, drop, act)``;
* centered softplus modules stay (they are plain torch) with beta frozen (``requires_grad=False``).

The result is in eval mode, has no forward pre-hooks of lcnnify, no ``curvature_penalty`` and no power
iteration: it computes exactly what the LCNN computed in eval mode, and traces / exports like any model.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize

from .nn import CenteredSoftplus, LipschitzBatchNorm
from .nn.batchnorm_act import LipschitzBatchNormAct
from .nn.spectral_norm import _conv_sn_pre_hook

_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d, None: nn.BatchNorm2d}


def _plain_batchnorm(lbn: LipschitzBatchNorm) -> nn.Module:
    if lbn.running_var is None:
        raise ValueError("freeze(): a LipschitzBatchNorm without running statistics has no fixed eval map")
    ref = lbn.running_var
    bn = _BN[lbn.dim](lbn.num_features, eps=lbn.eps, affine=True, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        scale = lbn._scale(torch.empty(0), use_batch_var=False)
        w = lbn.weight if lbn.weight is not None else torch.ones_like(ref)
        bn.weight.copy_(w * scale)
        bn.bias.copy_(lbn.bias if lbn.bias is not None else torch.zeros_like(ref))
        bn.running_mean.copy_(lbn.running_mean)
        bn.running_var.copy_(lbn.running_var)
    return bn.eval()


def _bake(module: nn.Module) -> None:
    """Replace every parametrized tensor by a plain parameter holding its current value.

    Not ``parametrize.remove_parametrizations``: that deletes the property from the injected
    ``Parametrized<Cls>`` class, which a deep copy SHARES with the original module — baking a copy would break
    the original model. Here only this instance changes (its class is reset to the original one).
    """
    values = {}
    with torch.no_grad():
        for tensor_name in list(module.parametrizations.keys()):
            original = module.parametrizations[tensor_name].original
            values[tensor_name] = (getattr(module, tensor_name).detach().clone(), original.requires_grad)
    del module._modules["parametrizations"]
    module.__class__ = module.__class__.__bases__[0]  # parametrize injected Parametrized<Cls>(Cls)
    for tensor_name, (value, requires_grad) in values.items():
        module.register_parameter(tensor_name, nn.Parameter(value, requires_grad=requires_grad))


def freeze(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """A deployment copy of a converted model with only plain torch layers (see module docstring)."""
    model = model if inplace else copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if parametrize.is_parametrized(module):
            _bake(module)
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is _conv_sn_pre_hook:
                del module._forward_pre_hooks[key]
        if isinstance(module, CenteredSoftplus):
            module.log_beta.requires_grad_(False)
    for name, module in list(model.named_modules()):
        if isinstance(module, LipschitzBatchNorm):
            new = _plain_batchnorm(module)
            if isinstance(module, LipschitzBatchNormAct):
                new = nn.Sequential(new, module.drop, module.act)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, new)
    for attr in ("curvature_penalty", "lcnn_report", "lcnn_config"):
        model.__dict__.pop(attr, None)
        if hasattr(model, "meta"):
            model.meta.get("_user_preserved_attributes", {}).pop(attr, None)
    return model.eval()
