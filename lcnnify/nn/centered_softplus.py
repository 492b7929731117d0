"""Centered softplus: a smooth activation with trainable, penalizable curvature (paper §3.3, eq. 4).

    s0(x; beta) = (softplus(beta x) - log 2) / beta = log((1 + exp(beta x)) / 2) / beta

Numerics. The naive formula cancels catastrophically for small ``beta*x`` (``softplus(t) - log 2`` with
``t -> 0``) and overflows for large ``beta*x``. We use the algebraically equal, branch-free form

    s0(x; beta) = relu(x) + log1p(expm1(-beta |x|) / 2) / beta

(for t = beta x > 0: log((1 + e^t)/2) = t + log((1 + e^-t)/2)). ``expm1(-a) / 2`` lies in (-1/2, 0] for every
a >= 0, so nothing overflows, ``log1p`` / ``expm1`` keep full relative precision for small arguments, and the
correction term lies in [-log 2 / beta, 0], i.e. |s0 - relu| <= log 2 / beta holds by construction. s0(0) = 0
exactly; as beta -> 0 the correction tends to -|x|/2, so s0 -> x/2.

Derivatives are given in closed form by a custom ``torch.autograd.Function`` whose backward is itself built
from differentiable torch ops (so double backward / Hessian-vector products work):

    ds0/dx    = sigmoid(beta x)                       in [0, 1];  d2s0/dx2 = beta s(1-s) <= beta/4
    ds0/dbeta = q(beta |x|) / beta^2,   q(a) = u tanh(u) - logcosh(u),  u = a/2
              (= a sigmoid(-a)... rewritten without cancellation; q rises from 0 (~a^2/8) to log 2)

Low-precision inputs (float16 / bfloat16) are computed in float32 and cast back; float64 stays float64.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["CenteredSoftplus", "centered_softplus"]

_LOG2 = math.log(2.0)


def _logcosh_small(u: Tensor) -> Tensor:
    """log cosh(u) = log1p(2 sinh(u/2)^2); accurate for small |u|, only used for |u| <= 1."""
    s = torch.sinh(u * 0.5)
    return torch.log1p(2.0 * s * s)


def _q(a: Tensor) -> Tensor:
    """q(a) = beta^2 ds0/dbeta at a = beta |x| >= 0, without cancellation, finite everywhere.

    Small a: q = u tanh u - logcosh u with u = a/2 (the two terms are ~u^2 and ~u^2/2: no catastrophic loss).
    Large a: q = -(a sigmoid(-a) + log1p(expm1(-a)/2)) (tends to log 2, no loss).
    Each branch sees a clamped argument so the branch not taken never produces inf/NaN (also in gradients).
    """
    small = a <= 2.0
    u = a.clamp(max=2.0) * 0.5
    q_small = u * torch.tanh(u) - _logcosh_small(u)
    b = a.clamp(min=2.0)
    q_large = -(b * torch.sigmoid(-b) + torch.log1p(torch.expm1(-b) * 0.5))
    return torch.where(small, q_small, q_large)


def _q_fast(a: Tensor, t: Tensor) -> Tensor:
    """q(a) = beta^2 ds0/dbeta (float32 fast path), reusing t = log1p(expm1(-a)/2) from the forward.

    a >= 0.1: q = -(a sigmoid(-a) + t) (no cancellation worse than ~40 ulp there);
    a < 0.1: the series q = a^2/8 - a^4/64 + a^6/576 (truncation error < 2e-9 relative).
    """
    a2 = a * a
    series = a2 * (0.125 - a2 * (1.0 / 64.0 - a2 * (1.0 / 576.0)))
    large = (a * torch.sigmoid(-a)).add_(t).neg_()
    return torch.where(a < 0.1, series, large)


class _CenteredSoftplusFn(torch.autograd.Function):
    """s0(x; beta) with closed-form derivatives; backward is differentiable (double backward).

    The forward also returns t = log1p(expm1(-beta|x|)/2) (non-differentiable, discarded by the callers): a
    first-order backward in float32 reuses it for the beta gradient (about half the element-wise passes of
    the exact formula). Under create_graph (double backward: GradReg, CURE, Hessians) and in float64 the
    fully differentiable exact formula :func:`_q` is used instead.
    """

    @staticmethod
    def forward(x: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        t = (x.abs() * beta).neg_().expm1_().mul_(0.5).log1p_()
        return torch.relu(x).add_(t / beta), t

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, beta = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, beta, output[1])

    @staticmethod
    def backward(ctx, grad: Tensor, _grad_t: Tensor | None = None):  # type: ignore[override]
        x, beta, t = ctx.saved_tensors
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = grad * torch.sigmoid(x * beta)
        if ctx.needs_input_grad[1]:
            a = x.abs() * beta
            if torch.is_grad_enabled() or x.dtype == torch.float64:
                q = _q(a)  # differentiable and float64-exact
            else:
                q = _q_fast(a, t)
            gb = (grad * q).sum_to_size(beta.shape) / (beta * beta)
        return gx, gb


def centered_softplus(x: Tensor, beta: Tensor | float) -> Tensor:
    """Functional centered softplus ``log((1 + exp(beta x)) / 2) / beta`` (paper eq. 4).

    ``beta`` is a positive scalar or a tensor broadcastable against ``x``. float16/bfloat16 inputs are
    computed in float32 and the result is cast back to ``x.dtype``.
    """
    cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if not isinstance(beta, Tensor):
        beta = torch.tensor(float(beta), dtype=cdtype, device=x.device)
    xc = x if x.dtype == cdtype else x.to(cdtype)
    bc = beta if beta.dtype == cdtype else beta.to(cdtype)
    y = _CenteredSoftplusFn.apply(xc, bc)[0]
    return y if y.dtype == x.dtype else y.to(x.dtype)


class CenteredSoftplus(nn.Module):
    r"""Centered softplus activation (Srinivas et al. 2022, §3.3, eq. 4).

    .. math:: s_0(x;\beta) = \frac{1}{\beta}\log\frac{1 + e^{\beta x}}{2}
              = \mathrm{relu}(x) + \frac{1}{\beta}\log\Bigl(1 + \tfrac12\,\mathrm{expm1}(-\beta|x|)\Bigr)

    Properties (for every beta > 0): s0(0) = 0, s0' = sigmoid(beta x) in (0, 1), |s0''| <= beta/4,
    normalized curvature |s0''/s0'| <= beta, |s0 - relu| <= log(2)/beta, s0 -> x/2 as beta -> 0 and
    s0 -> relu as beta -> inf. Curvature is penalized through sum(beta) (paper eq. 5).

    Args:
        beta: initial beta (> 0); stored as the learnable parameter ``log_beta`` (``beta = exp(log_beta)``).
        num_channels: if given, one beta per channel (``log_beta`` has shape ``(num_channels,)``), broadcast
            along ``channel_dim`` of the input.
        channel_dim: the channel dimension of the input for per-channel beta (default 1, negative allowed).

    Numerically stable for beta in [1e-4, 1e4] and |x| up to 1e4 in float32/float64 (float16/bfloat16
    inputs are computed in float32), for values and for first and second derivatives w.r.t. x and beta.
    """

    def __init__(self, beta: float = 5.0, num_channels: int | None = None, channel_dim: int = 1) -> None:
        super().__init__()
        beta = float(beta)
        if not (beta > 0 and math.isfinite(beta)):
            raise ValueError(f"CenteredSoftplus: beta must be a finite number > 0, got {beta}")
        if num_channels is not None and int(num_channels) < 1:
            raise ValueError(f"CenteredSoftplus: num_channels must be >= 1 or None, got {num_channels}")
        self.num_channels = None if num_channels is None else int(num_channels)
        self.channel_dim = int(channel_dim)
        shape = () if self.num_channels is None else (self.num_channels,)
        self.log_beta = nn.Parameter(torch.full(shape, math.log(beta)))

    @property
    def beta(self) -> Tensor:
        """beta = exp(log_beta) (differentiable; shape () or (num_channels,))."""
        return self.log_beta.exp()

    def _beta_for(self, x: Tensor, cdtype: torch.dtype) -> Tensor:
        beta = self.log_beta.to(cdtype).exp()
        if self.num_channels is None:
            return beta
        d = self.channel_dim if self.channel_dim >= 0 else x.dim() + self.channel_dim
        if not 0 <= d < x.dim() or x.shape[d] != self.num_channels:
            raise ValueError(
                f"CenteredSoftplus: per-channel beta expects {self.num_channels} channels at dim "
                f"{self.channel_dim}, got input of shape {tuple(x.shape)}; fix: set num_channels/channel_dim "
                f"to match the input or use a scalar beta (num_channels=None)")
        shape = [1] * x.dim()
        shape[d] = self.num_channels
        return beta.view(shape)

    def forward(self, x: Tensor) -> Tensor:
        cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        xc = x if x.dtype == cdtype else x.to(cdtype)
        y = _CenteredSoftplusFn.apply(xc, self._beta_for(x, cdtype))[0]
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        with torch.no_grad():
            b = self.beta.detach().float().cpu()
        if self.num_channels is None:
            return f"beta={b.item():.4g}"
        return (f"num_channels={self.num_channels}, channel_dim={self.channel_dim}, "
                f"beta=[min {b.min().item():.4g}, max {b.max().item():.4g}]")
