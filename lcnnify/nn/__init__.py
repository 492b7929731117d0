"""The LCNN layers (Srinivas et al., NeurIPS 2022, §3.3-3.4); pure torch, each usable on its own.

* :class:`CenteredSoftplus` — s0(x; beta) = log((1 + exp(beta x)) / 2) / beta, learnable beta (§3.3, eq. 4).
* :class:`ConvSpectralNorm` / :func:`conv_spectral_norm` — conv weight W / ||A_W||_2 with the real operator
  norm of the convolution for the input shape it sees (§3.4.1, Ryu et al. 2019); :class:`ConvGeometry` and
  :class:`ConvOperator` describe that operator (forward, exact adjoint, weight-gradient).
* :class:`LinearSpectralNorm` / :func:`linear_spectral_norm` — W / ||W||_2 for Linear layers (§3.4.1), with
  the same modes as the conv one (converged in eval, zero-safe).
* :class:`LipschitzBatchNorm` — BN whose linear part is scaled by min(1, gamma / L), Lipschitz constant
  min(L, gamma) <= gamma, learnable gamma >= 1 (§3.4.2).
"""
from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from .centered_softplus import CenteredSoftplus, centered_softplus
from .lipschitz_batchnorm import LipschitzBatchNorm
from .batchnorm_act import LipschitzBatchNormAct
from .weight_standardization import WeightStandardization
from .conv_operator import ConvGeometry, ConvOperator
from .spectral_norm import (DEFAULT_MIN_SIGMA, ConvSpectralNorm, SpectralNormBase, conv_operator_norm,
                            conv_spectral_norm, find_conv_spectral_norm, find_spectral_norm)
from .linear_spectral_norm import (LinearSpectralNorm, MatrixOperator, find_linear_spectral_norm,
                                   linear_spectral_norm)

__all__ = [
    "CenteredSoftplus",
    "centered_softplus",
    "ConvGeometry",
    "ConvOperator",
    "MatrixOperator",
    "SpectralNormBase",
    "ConvSpectralNorm",
    "LinearSpectralNorm",
    "DEFAULT_MIN_SIGMA",
    "conv_spectral_norm",
    "linear_spectral_norm",
    "conv_operator_norm",
    "find_conv_spectral_norm",
    "find_linear_spectral_norm",
    "find_spectral_norm",
    "LipschitzBatchNorm",
    "LipschitzBatchNormAct",
    "WeightStandardization",
    "is_lcnn_layer",
]


def is_lcnn_layer(module: nn.Module) -> bool:
    """True for CenteredSoftplus, LipschitzBatchNorm, and modules whose ``weight`` carries an lcnnify spectral
    normalization (:class:`ConvSpectralNorm`, :class:`LinearSpectralNorm`) or a torch spectral normalization
    (parametrization or the legacy hook: a user's own, left as it is)."""
    if isinstance(module, (CenteredSoftplus, LipschitzBatchNorm)):
        return True
    if parametrize.is_parametrized(module, "weight"):
        from torch.nn.utils.parametrizations import _SpectralNorm
        if any(isinstance(p, (SpectralNormBase, _SpectralNorm)) for p in module.parametrizations["weight"]):
            return True
    from torch.nn.utils.spectral_norm import SpectralNorm as _LegacySpectralNorm
    return any(isinstance(h, _LegacySpectralNorm) for h in module._forward_pre_hooks.values())
