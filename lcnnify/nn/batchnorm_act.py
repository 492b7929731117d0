"""gamma-Lipschitz BatchNorm fused with its dropout and activation (the LCNN form of timm's BatchNormAct2d).

    y = act(drop(BN_gamma(x)))        (BN_gamma: :class:`LipschitzBatchNorm`, paper §3.4.2)

timm's ``BatchNormAct2d`` is a BatchNorm subclass that also applies ``.drop`` and ``.act``; replacing it by a
plain LipschitzBatchNorm would silently drop the activation (timm issue #1254). This module keeps the same
state-dict keys as the timm layer (``weight``, ``bias``, running stats, ``act.*``, ``drop.*``) plus gamma.
"""
from __future__ import annotations

import torch
from torch import nn

from .lipschitz_batchnorm import LipschitzBatchNorm

__all__ = ["LipschitzBatchNormAct"]


class LipschitzBatchNormAct(LipschitzBatchNorm):
    """``act(drop(LipschitzBatchNorm(x)))``; ``act`` is usually a :class:`CenteredSoftplus`."""

    def __init__(self, *args, act: nn.Module | None = None, drop: nn.Module | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(input)))

    @classmethod
    def from_batchnorm_act(cls, bn: nn.Module, *, act: nn.Module | None, drop: nn.Module | None,
                           gamma: float = 10.0) -> "LipschitzBatchNormAct":
        """Copy ``bn``'s statistics and parameters (as :meth:`LipschitzBatchNorm.from_batchnorm`) and attach
        ``act`` and ``drop``. timm's frozen variant (FrozenBatchNormAct2d) becomes a frozen one."""
        if type(bn).__name__.startswith("Frozen") and not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn = _as_frozen(bn)
        new = cls.from_batchnorm(bn, gamma=gamma)  # builds a cls(...) with Identity act/drop
        new.drop = drop if drop is not None else nn.Identity()
        new.act = act if act is not None else nn.Identity()
        return new


def _as_frozen(bn: nn.Module) -> nn.Module:
    from torchvision.ops import FrozenBatchNorm2d

    f = FrozenBatchNorm2d(bn.weight.shape[0], eps=bn.eps)
    f.load_state_dict({k: v for k, v in bn.state_dict().items() if k in f.state_dict()})
    return f
