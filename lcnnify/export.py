"""`freeze()`: bake a trained LCNN into plain torch layers for deployment.

* every spectral normalization (conv and linear) is first **converged** for the current weight (warm-started
  Lanczos until the Ritz residual is small, as in eval mode), then the parametrization is removed and the
  weight kept as it is now: ``conv.weight`` becomes a plain parameter holding W / sigma (operator norm 1 up
  to the convergence tolerance); weight standardizations are baked the same way;
* every :class:`~lcnnify.nn.LipschitzBatchNorm` becomes the ``nn.BatchNorm{1,2,3}d`` that computes the same
  eval-mode map: its weight is ``w * min(1, gamma / L)`` (frozen-BN semantics: running statistics);
  a fused ``LipschitzBatchNormAct`` becomes ``nn.Sequential(bn, drop, act)``;
* every :class:`~lcnnify.nn.CenteredSoftplus` (a custom autograd Function) becomes a
  :class:`FrozenCenteredSoftplus`: the same values from plain torch ops, beta a buffer.

The result is in eval mode, has no forward pre-hooks of lcnnify, no ``curvature_penalty``, no custom autograd
Function and no power iteration: it computes what the LCNN computes in eval mode and works with
``torch.jit.script``, ``torch.jit.trace`` + ``torch.jit.save`` and ``torch.export``. The model passed in is not
changed (unless ``inplace=True``).
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize

from .errors import ConversionError
from .nn import CenteredSoftplus, LipschitzBatchNorm
from .nn.batchnorm_act import LipschitzBatchNormAct
from .nn.spectral_norm import SpectralNormBase, _conv_sn_pre_hook

__all__ = ["freeze", "FrozenCenteredSoftplus"]

_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d, None: nn.BatchNorm2d}


class FrozenCenteredSoftplus(nn.Module):
    r"""The centered softplus with a fixed beta, from plain torch ops (TorchScript / export friendly).

    .. math:: s_0(x;\beta) = \frac{1}{\beta}\log\frac{1 + e^{\beta x}}{2}
              = \mathrm{relu}(x) - \frac{\log(1 + w)}{\beta},\qquad w = \tanh(\beta |x| / 2)

    (since ``1 + tanh(a/2) = 2 / (1 + e^{-a})``). ``log(1 + w)`` is computed as ``w log(u) / (u - 1)`` with
    ``u = fl(1 + w)`` (accurate for small w without ``log1p``; w is clamped to >= machine epsilon inside the
    ratio, which then equals 1 to rounding). Every term is bounded (w in [0, 1)), so values are finite for any
    beta > 0 and any finite x. float16/bfloat16 inputs are computed in float32; float64 stays float64.
    ``beta`` has shape () or (num_channels,), broadcast along ``channel_dim`` (``num_channels == 0``: scalar).
    """

    def __init__(self, beta: Tensor, num_channels: int = 0, channel_dim: int = 1) -> None:
        super().__init__()
        self.num_channels = int(num_channels)
        self.channel_dim = int(channel_dim)
        self.register_buffer("beta", beta.detach().clone())

    @classmethod
    def from_centered_softplus(cls, act: CenteredSoftplus) -> "FrozenCenteredSoftplus":
        with torch.no_grad():  # float64: as exact for float64 inputs as the module, rounded once for float32
            beta = act.log_beta.detach().double().exp()
        return cls(beta, act.num_channels or 0, act.channel_dim)

    def forward(self, x: Tensor) -> Tensor:
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        xc = x.to(cd)
        beta = self.beta.to(cd)
        if self.num_channels > 0:
            d = self.channel_dim if self.channel_dim >= 0 else x.dim() + self.channel_dim
            shape = [1] * x.dim()
            shape[d] = self.num_channels
            beta = beta.view(shape)
        w = torch.tanh(xc.abs() * (beta * 0.5))
        u = w.clamp(min=2.220446049250313e-16 if cd == torch.float64 else 1.1920928955078125e-07) + 1.0
        log1p_w = w * (torch.log(u) / (u - 1.0))
        y = torch.relu(xc) - log1p_w / beta
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"num_channels={self.num_channels}, channel_dim={self.channel_dim}"


def _plain_batchnorm(lbn: LipschitzBatchNorm) -> nn.Module:
    if lbn.running_var is None:
        raise ConversionError("freeze(): a LipschitzBatchNorm without running statistics has no fixed eval map; "
                              "fix: construct it with track_running_stats=True")
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
    """Replace every parametrized tensor by a plain parameter holding its current (eval-mode, i.e. converged)
    value.

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


def _frozen_batchnorm(lbn: LipschitzBatchNorm) -> nn.Module:
    bn = _plain_batchnorm(lbn)
    return nn.Sequential(bn, lbn.drop, lbn.act) if isinstance(lbn, LipschitzBatchNormAct) else bn


def _replace_all(model: nn.Module, cls: type, make) -> None:
    """Replace every submodule of type ``cls`` by ``make(it)``; a module registered under several names (shared)
    is replaced by one shared new module."""
    new_of: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, cls) and name:
            if id(module) not in new_of:
                new_of[id(module)] = make(module)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, new_of[id(module)])


def freeze(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """A deployment copy of a converted model with only plain torch layers (see the module docstring).

    Raises ConversionError if a spectral normalization has never seen an input (its operator norm is unknown).
    """
    model = model if inplace else copy.deepcopy(model)
    model.eval()  # eval mode: reading a spectrally normalized weight converges its estimate first
    for name, module in list(model.named_modules()):
        if parametrize.is_parametrized(module):
            for tensor_name, plist in module.parametrizations.items():
                if any(isinstance(p, SpectralNormBase) and p.input_shape is None for p in plist):
                    raise ConversionError(
                        f"freeze(): the spectral norm of '{name or type(module).__name__}.{tensor_name}' "
                        f"({type(module).__name__}) has never seen an input, so its operator norm is unknown; "
                        f"fix: run one forward pass (or convert with example_inputs) before freeze()")
            _bake(module)
        for key, hook in list(module._forward_pre_hooks.items()):
            if hook is _conv_sn_pre_hook:
                del module._forward_pre_hooks[key]
    _replace_all(model, LipschitzBatchNorm, _frozen_batchnorm)
    _replace_all(model, CenteredSoftplus, FrozenCenteredSoftplus.from_centered_softplus)
    for attr in ("curvature_penalty", "lcnn_report", "lcnn_config"):
        model.__dict__.pop(attr, None)
        if hasattr(model, "meta"):
            model.meta.get("_user_preserved_attributes", {}).pop(attr, None)
    _as_plain_graph_module(model)
    return model.eval()


def _as_plain_graph_module(model: nn.Module) -> None:
    """Make a converted GraphModule scriptable: an lcnnify subclass (with LCNN-only members such as
    ``curvature_penalty``) becomes a plain ``torch.fx.GraphModule`` (same instance, same class name), and the
    ``torch.Tensor`` annotations of its inputs / output are dropped (fx writes them under a mangled global name
    that TorchScript cannot resolve; they are optional)."""
    if not isinstance(model, fx.GraphModule):
        return
    bases = type(model).__mro__
    if not (len(bases) > 1 and bases[1] is fx.GraphModule):  # not a plain GraphModule's per-instance class
        model.__class__ = type(type(model).__name__, (fx.GraphModule,), {})
    for node in model.graph.nodes:
        if node.op in ("placeholder", "output") and node.type in (Tensor, "torch.Tensor", "Tensor"):
            node.type = None
    model.recompile()
