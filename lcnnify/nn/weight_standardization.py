"""Weight standardization as a parametrization (timm's StdConv2d / ScaledStdConv2d, NF-Nets).

    W_hat[o] = gain[o] * scale * (W[o] - mean(W[o])) / sqrt(var(W[o]) + eps)      (per output channel o)

timm applies this inside the conv's forward, which a spectral norm on ``weight`` could not see (and which
would undo it: standardization is scale invariant). As a parametrization placed *before*
:class:`~lcnnify.nn.ConvSpectralNorm` in the chain, the spectral norm normalizes the operator the layer really
applies: ``conv.weight = SN(WS(W))``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["WeightStandardization"]


class WeightStandardization(nn.Module):
    """Per-output-channel standardization of a conv weight with an optional learnable gain (see module doc)."""

    def __init__(self, eps: float = 1e-6, scale: float = 1.0, gain: Tensor | None = None) -> None:
        super().__init__()
        self.eps = float(eps)
        self.scale = float(scale)
        self.gain = None if gain is None else nn.Parameter(gain.detach().clone().reshape(-1))

    def forward(self, weight: Tensor) -> Tensor:
        flat = weight.reshape(weight.shape[0], -1)
        var, mean = torch.var_mean(flat, dim=1, unbiased=False, keepdim=True)
        out = (flat - mean) * torch.rsqrt(var + self.eps)
        if self.gain is not None:
            out = out * (self.gain.unsqueeze(1) * self.scale)
        elif self.scale != 1.0:
            out = out * self.scale
        return out.reshape_as(weight)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, scale={self.scale:.4g}, gain={'learnable' if self.gain is not None else 'none'}"
