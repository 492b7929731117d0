"""Spectral normalization of ``nn.Linear``: ``W -> W / max(||W||_2, min_sigma)`` (paper §3.4.1; Miyato et al.).

The same parametrization as for convolutions (:class:`~lcnnify.nn.spectral_norm.SpectralNormBase`), with the
matrix as the operator: one power iteration per training step, converged (warm-started Lanczos, Ritz residual
test) in eval mode and in ``freeze()``, zero-safe, ``inference_mode``-safe, the same Lanczos warm-up at
registration. A Linear's operator norm does not depend on its input shape, so the shape is known at once.

Replaces ``torch.nn.utils.parametrizations.spectral_norm``, which gives NaN for an all-zero weight and is
never more accurate than its last power iteration. Checkpoints written with torch's parametrization
(buffers ``_u``, ``_v``) load into this one.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import ConversionError
from .spectral_norm import DEFAULT_MIN_SIGMA, _EVAL_RTOL, SpectralNormBase, _refuse_double

__all__ = ["MatrixOperator", "LinearSpectralNorm", "linear_spectral_norm", "find_linear_spectral_norm"]


class MatrixOperator:
    """``x -> x W^T`` on batched inputs ``(N, in_features)``: forward, exact adjoint and weight-gradient
    (``<y, x W^T> = <W, y^T x>``)."""

    def __init__(self, out_features: int, in_features: int) -> None:
        self.input_shape = (int(in_features),)
        self.output_shape = (int(out_features),)

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        return F.linear(x, w)

    def adjoint(self, y: Tensor, w: Tensor) -> Tensor:
        return y.matmul(w)

    def weight_grad(self, x: Tensor, y: Tensor, w: Tensor | None = None) -> Tensor:
        return y.t().matmul(x)

    def forward_and_cols(self, x: Tensor, w: Tensor) -> tuple[Tensor, None]:
        return F.linear(x, w), None

    def axpby_weight_grad(self, g: Tensor, beta: Tensor, x: Tensor, y: Tensor, alpha: Tensor,
                          cols: Tensor | None = None, buffer: Callable[[], Tensor] | None = None) -> Tensor:
        """``beta * g + alpha * y^T x``: ``beta * g`` written into ``buffer()`` if given, the product
        accumulated into it."""
        out = torch.mul(g, beta) if buffer is None else torch.mul(g, beta, out=buffer())
        return out.addmm_((y * alpha).t(), x)

    def __repr__(self) -> str:
        return f"MatrixOperator({self.input_shape} -> {self.output_shape})"


class LinearSpectralNorm(SpectralNormBase):
    """Parametrization ``W -> W / max(||W||_2, min_sigma)`` of a Linear weight ``(out_features, in_features)``.

    Buffers ``u`` ``(1, out_features)`` and ``v`` ``(1, in_features)``, warmed up at construction. Register it
    with :func:`linear_spectral_norm`. Modes, zero weights, inference_mode: see :mod:`lcnnify.nn.spectral_norm`.
    """

    def __init__(self, linear: nn.Module, n_power_iterations: int = 1, warmup_iterations: int = 15,
                 eps: float = 1e-12, min_sigma: float = DEFAULT_MIN_SIGMA, eval_rtol: float = _EVAL_RTOL) -> None:
        w = linear.weight
        if not isinstance(w, Tensor) or w.dim() != 2 or isinstance(w, nn.parameter.UninitializedParameter):
            raise ConversionError(f"linear_spectral_norm: {type(linear).__name__} has no initialized 2-d weight; "
                                  f"fix: run one forward pass (lazy layers) before converting")
        super().__init__(w, n_power_iterations=n_power_iterations, warmup_iterations=warmup_iterations, eps=eps,
                         min_sigma=min_sigma, eval_rtol=eval_rtol)
        self.out_features, self.in_features = int(w.shape[0]), int(w.shape[1])
        self.reset((self.in_features,), w)

    def _make_op(self, input_shape: tuple[int, ...]) -> MatrixOperator:
        if tuple(input_shape) != (self.in_features,):
            raise ValueError(f"input_shape {tuple(input_shape)} does not fit a Linear with "
                             f"in_features={self.in_features}")
        return MatrixOperator(self.out_features, self.in_features)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # checkpoints of torch.nn.utils.parametrizations.spectral_norm: _u (out,), _v (in,)
        for old, new in (("_u", "u"), ("_v", "v")):
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old).reshape(1, -1)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def find_linear_spectral_norm(module: nn.Module) -> LinearSpectralNorm | None:
    """The LinearSpectralNorm registered on ``module.weight``, or None."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations["weight"]:
        if isinstance(p, LinearSpectralNorm):
            return p
    return None


def linear_spectral_norm(linear: nn.Linear, *, n_power_iterations: int = 1, warmup_iterations: int = 15,
                         eps: float = 1e-12, min_sigma: float = DEFAULT_MIN_SIGMA) -> nn.Linear:
    """Register :class:`LinearSpectralNorm` on ``linear.weight`` (in place) and return ``linear``: afterwards
    ``linear.weight`` is ``W / ||W||_2`` (exact operator norm of a matrix). Raises ConversionError for
    anything but an ``nn.Linear`` and for a Linear that already has a spectral normalization."""
    if not isinstance(linear, nn.Linear):
        raise ConversionError(f"linear_spectral_norm: expected nn.Linear, got {type(linear).__name__}; "
                              f"fix: use conv_spectral_norm for convolutions")
    _refuse_double(linear, "linear_spectral_norm")
    parametrize.register_parametrization(
        linear, "weight", LinearSpectralNorm(linear, n_power_iterations=n_power_iterations,
                                             warmup_iterations=warmup_iterations, eps=eps, min_sigma=min_sigma))
    return linear
