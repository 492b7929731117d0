"""Conv subclasses whose forward is not the plain convolution (timm), and how to normalize what they apply.

A table, by class name (no timm import needed): each entry returns a module whose ``weight`` the spectral norm
can be registered on such that ``conv.weight`` is exactly the weight the layer convolves with.

* ``Conv2dSame``: pads the input dynamically (TF "same") and convolves with ``self.weight`` — kept as it is;
  :class:`~lcnnify.nn.ConvSpectralNorm` computes the padding from the input shape it sees.
* ``StdConv2d(Same)`` / ``ScaledStdConv2d(Same)`` (BiT, NF-Nets): standardize the weight inside forward —
  replaced by a plain ``nn.Conv2d`` (or ``Conv2dSame`` for dynamic padding) whose weight carries a
  :class:`~lcnnify.nn.WeightStandardization` parametrization (with the layer's gain), so the chain is
  ``SN(WS(W))``.
"""
from __future__ import annotations

from typing import Callable

from torch import nn
from torch.nn.utils import parametrize

from ..nn.weight_standardization import WeightStandardization


def _keep(conv: nn.Module) -> nn.Module:
    return conv


def _std_conv(conv: nn.Module) -> nn.Module:
    dynamic = bool(getattr(conv, "same_pad", False))
    if dynamic:
        from timm.layers import Conv2dSame

        new: nn.Module = Conv2dSame(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                                    padding=0, dilation=conv.dilation, groups=conv.groups,
                                    bias=conv.bias is not None)
    else:
        new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                        padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                        bias=conv.bias is not None, padding_mode=conv.padding_mode)
    new = new.to(device=conv.weight.device, dtype=conv.weight.dtype)
    new.weight.data.copy_(conv.weight.data)
    if conv.bias is not None:
        new.bias.data.copy_(conv.bias.data)
    gain = getattr(conv, "gain", None)
    scale = float(getattr(conv, "scale", 1.0))
    parametrize.register_parametrization(new, "weight", WeightStandardization(conv.eps, scale, gain))
    new.train(conv.training)
    return new


CONV_ADAPTERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "Conv2dSame": _keep,
    "StdConv2d": _std_conv,
    "StdConv2dSame": _std_conv,
    "ScaledStdConv2d": _std_conv,
    "ScaledStdConv2dSame": _std_conv,
}


def adapter_for(conv: nn.Module) -> Callable[[nn.Module], nn.Module] | None:
    """The adapter of a conv subclass with its own forward, or None if unknown."""
    return CONV_ADAPTERS.get(type(conv).__name__)
