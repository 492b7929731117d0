"""Centered softplus: a smooth activation with trainable, penalizable curvature (paper §3.3, eq. 4).

    s0(x; beta) = (softplus(beta x) - log 2) / beta = log((1 + exp(beta x)) / 2) / beta

Everything is element-wise exp2/exp, log, multiply/add and polynomials: the functions that are vectorized
on CPU (``expm1``, ``log1p``, ``softplus`` and ``tanh`` are several times slower per element in common torch
builds). With a = beta |x| and f(a) = log((1 + e^-a) / 2) in [-log 2, 0]:

    s0(x; beta) = relu(x) + f(a) / beta,        |s0 - relu| <= log 2 / beta

Forward, float32: f = log(e/2 + 1/2), e = 2^(-a log2 e), for a > 0.75 (no cancellation there), and
f = -a/2 + logcosh(a/2) by its Taylor series (5 terms, error below one ulp) for a <= 0.75, where the log form
would lose relative precision. float64: with w = tanh(a / 2), f = -log1p(w) by Goldberg's log1p
(w log(u) / (u - 1), u = fl(1 + w): ``u - 1`` is exact, so the ratio is accurate to a few ulp).
In both, s0(0) = 0 exactly, s0 -> x/2 as beta -> 0, and nothing overflows (e underflows to 0 for any
beta |x| up to inf).

Backward from the output alone (like ReLU: the input is not saved, in-place updates of the input after the
call are harmless). With z = beta y >= -log 2, e = exp(-z), t = beta x:

    ds0/dx    = sigmoid(t) = 1 - e / 2
    ds0/dbeta = q / beta^2,   q = t sigmoid(t) - z = [(1 + w) log1p(w) + (1 - w) log1p(-w)] / 2,
                w = 1 - e = tanh(t / 2) in [-1, 1)

q ~ w^2 / 2 near 0, so it is computed without cancellation: w = (e - 1)/log(e) * z (Kahan's expm1, exact
for the rounded e), then, float32: 2q = sum_k w^2k / (k (2k - 1)) (8 terms) for w^2 <= 0.16 and
2q = (1 + w) log(1 + w) - e z above (no cancellation there); float64: 2q = w (z + w (G1 - G2)) for small
|w| (G1 = log1p(w)/w, G2 = log1p(-w^2)/(-w^2), both Goldberg ratios), (1 + w) log1p(w) - e z for large
|w|, blended linearly over 0.5 <= |w| <= 0.7. Branches are selected by a 0/1 (or linear) lerp weight,
not a masked select (several times slower on CPU).

Accuracy limits that come from saving only the output: y holds sigmoid(t) only to absolute precision (about
one ulp of log 2), so ds0/dx is relative-accurate for t >~ -6 and absolute-accurate (~1e-7 in float32) below,
and ds0/dbeta is accurate to ~1e-6 relative for t <~ -14 (the part of q that depends on t is rounded away).

Double backward (GradReg, CURE, Hessians): under ``create_graph`` the backward evaluates the same formulas
with out-of-place torch ops on (y, beta), which autograd differentiates; y is this function's output, so
the chain rule runs back through it.

Speed. Large CPU tensors are processed in cache-sized chunks (fresh tensor-sized temporaries cost a page
fault per 4 KiB; chunk-sized scratch buffers are reused by the allocator and stay in cache). ``inplace=True``
writes the output over the input (like ``relu_``), so the activation then keeps no tensor of its own.
Optional compiled (fused) kernels for the common case: :mod:`lcnnify.nn.fused_softplus`.

Low-precision inputs (float16 / bfloat16) are computed in float32 and cast back; float64 stays float64.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._utils import normal_tensors

__all__ = ["CenteredSoftplus", "centered_softplus"]

_LOG2 = math.log(2.0)


class _Consts:
    """Per-dtype constants of the element-wise formulas."""

    def __init__(self, dtype: torch.dtype) -> None:
        fi = torch.finfo(dtype)
        self.w_min = fi.eps  # forward: w >= one ulp of 1, so fl(1 + w) > 1
        self.guard = fi.tiny * 2.0 ** 40  # 0/0 guard of the Goldberg/Kahan ratios (far below any |u - 1|)
        self.p_min = fi.tiny ** 0.5  # 1 + w >= this > 0 (w = -1 exactly when y is saturated at -log2/beta)
        self.z_max = 80.0  # exp(-80) is a normal number in float32; beyond, every term is saturated
        self.p2_min = 0.25  # 1 - w^2 is only needed for |w| <= 0.7, i.e. 1 - w^2 >= 0.51
        self.v_lo, self.v_hi = 0.25, 0.49  # blend A -> D over w^2 in [0.5^2, 0.7^2]


_CONSTS = {torch.float32: _Consts(torch.float32), torch.float64: _Consts(torch.float64)}


# ---- float32 formulas (exp2 / log / polynomials: the fastest vectorized CPU functions; see module docstring)
_LOG2E = 1.0 / _LOG2
_TAU = 0.75  # forward: below a = beta |x| = 0.75 the series of logcosh, above it log((1 + e^-a) / 2)
_LOGCOSH = (1.0 / 2, -1.0 / 12, 1.0 / 45, -17.0 / 2520, 31.0 / 14175)  # logcosh(h) = sum c_k h^2k, k >= 1
_W0_SQ = 0.16  # backward: below w^2 = 0.16 the series of 2q in w^2, above it (1 + w) log(1 + w) - e z
_Q2 = tuple(1.0 / (k * (2 * k - 1)) for k in range(1, 9))  # 2q = sum_k w^2k / (k (2k - 1))


def _forward_value(x: Tensor, beta: Tensor, out: Tensor) -> Tensor:
    """out = s0(x; beta), in-place passes on chunk-sized scratch buffers; no autograd.

    float32: :func:`_forward_value_f32`; float64: the tanh form (module docstring).
    """
    if x.dtype == torch.float32:
        return _forward_value_f32(x, beta, out)
    c = _CONSTS[x.dtype]
    w = x.abs().mul_(beta * 0.5).tanh_()  # w = tanh(a/2), a = beta |x|
    u = w.clamp(min=c.w_min).add_(1.0)
    torch.clamp(x, min=0.0, out=out)  # relu(x)
    r = torch.sub(u, 1.0)  # u - 1, exact
    r = u.log_().div_(r).div_(beta)  # log(u) / ((u - 1) beta) = log1p(w) / (w beta)
    return out.addcmul_(r, w, value=-1.0)


def _forward_value_f32(x: Tensor, beta: Tensor, out: Tensor) -> Tensor:
    """out = relu(x) + f(a) / beta, a = beta |x|, f(a) = log((1 + e^-a) / 2) (float32).

    f = log(e/2 + 1/2) with e = 2^(-a log2 e) for a > 0.75; f = -a/2 + logcosh(a/2) by its Taylor series
    (5 terms) for a <= 0.75, where the log form would lose relative precision. The two are selected by a
    0/1 weight (a lerp: a masked select is far slower on CPU).
    """
    a = torch.mul(x.abs(), beta)
    f_log = torch.mul(a, -_LOG2E).sub_(1.0).exp2_().add_(0.5).log_()  # log(e/2 + 1/2)
    a_s = torch.clamp(a, max=_TAU)
    v = torch.mul(a_s, a_s).mul_(0.25)  # h^2, h = a/2
    f = _horner_(v, _LOGCOSH).mul_(v).add_(a_s, alpha=-0.5)  # -a/2 + logcosh(a/2)
    f.lerp_(f_log, a.sub_(_TAU).mul_(1e30).clamp_(0.0, 1.0))  # weight 1 exactly where a > 0.75
    torch.clamp(x, min=0.0, out=out)  # relu(x) (x may be out itself: read above, written last)
    return out.addcmul_(f, beta.reciprocal())


def _forward_graph(x: Tensor, beta: Tensor) -> Tensor:
    """:func:`_forward_value` as out-of-place ops (the same formulas; the form a compiler fuses)."""
    if x.dtype == torch.float32:
        a = x.abs() * beta
        f_log = torch.log(torch.exp2(a * -_LOG2E - 1.0) + 0.5)
        a_s = a.clamp(max=_TAU)
        v = a_s * a_s * 0.25
        f = _horner(v, _LOGCOSH) * v - 0.5 * a_s
        return torch.relu(x) + torch.where(a > _TAU, f_log, f) / beta
    c = _CONSTS[x.dtype]
    w = torch.tanh(x.abs() * (beta * 0.5))
    u = w.clamp(min=c.w_min) + 1.0
    return torch.relu(x) - w * (torch.log(u) / (u - 1.0) / beta)


def _horner_(v: Tensor, coeffs: tuple[float, ...]) -> Tensor:
    """sum_k coeffs[k] v^k into a new tensor, one fused multiply-add pass per degree (no autograd)."""
    c = _coeff_tensors(coeffs, v)
    p = torch.addcmul(c[-2], v, c[-1])
    for ck in c[-3::-1]:
        torch.addcmul(ck, p, v, out=p)
    return p


_COEFF_TENSORS: dict[tuple, tuple[Tensor, ...]] = {}


def _coeff_tensors(coeffs: tuple[float, ...], like: Tensor) -> tuple[Tensor, ...]:
    """The coefficients as 0-dim tensors on like's device and dtype (cached: made once per device)."""
    key = (coeffs, like.dtype, like.device)
    c = _COEFF_TENSORS.get(key)
    if c is None:
        with normal_tensors():  # usable in every mode
            c = tuple(torch.tensor(ck, dtype=like.dtype, device=like.device) for ck in coeffs)
        _COEFF_TENSORS[key] = c
    return c


def _horner(v: Tensor, coeffs: tuple[float, ...]) -> Tensor:
    """sum_k coeffs[k] v^k (out-of-place ops)."""
    p = v * coeffs[-1] + coeffs[-2]
    for ck in coeffs[-3::-1]:
        p = p * v + ck
    return p


class _Chunks:
    """Views of x-shaped tensors in pieces of about ``_CHUNK_PER_THREAD * threads`` elements (CPU only).

    The element-wise passes then run on cache-sized scratch buffers that the allocator reuses, instead of a
    dozen tensor-sized temporaries (each a fresh, page-faulting allocation). Pieces are flat ranges when beta
    is a single number, else ranges of dim 0 when beta does not vary along it; otherwise the whole tensor.
    """

    def __init__(self, x: Tensor, beta: Tensor) -> None:
        n = x.numel()
        target = _CHUNK_PER_THREAD * max(1, torch.get_num_threads())
        self.beta, self.flat, self.bounds = beta, False, [None]
        if x.device.type != "cpu" or n <= 2 * target or torch.compiler.is_compiling():
            return  # (a compiler fuses the passes itself)
        if beta.numel() == 1 and x.is_contiguous():
            self.beta, self.flat = beta.reshape(()), True
            self.bounds = [(i, min(i + target, n)) for i in range(0, n, target)]
        elif x.dim() > 1 and x.shape[0] > 1 and (beta.dim() < x.dim() or beta.shape[0] == 1):
            step = max(1, target * x.shape[0] // n)
            self.bounds = [(i, min(i + step, x.shape[0])) for i in range(0, x.shape[0], step)]

    def __len__(self) -> int:
        return len(self.bounds)

    def view(self, t: Tensor, k: int) -> Tensor:
        b = self.bounds[k]
        if b is None:
            return t
        return t.view(-1)[b[0]:b[1]] if self.flat else t[b[0]:b[1]]


_CHUNK_PER_THREAD = 1 << 17  # elements per thread and chunk: scratch buffers of 512 KiB

# Optional compiled kernels (set by lcnnify.nn.fused_softplus.enable_fused_kernels): an object with
# forward(x, beta, inplace) -> y | None and backward(y, beta, grad, need_x, need_b) -> (gx, gb) | None; None = not
# applicable here, use the eager path. Never used for double backward.
_FUSED = None


def _slope_terms(y: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """(z, e) with z = beta y clamped to [-log 2, z_max] and e = exp(-z) <= 2; differentiable ops.

    z >= -log 2 holds mathematically; the clamp removes the rounding of y below it, so that the slope
    1 - e/2 is never negative.
    """
    c = _CONSTS[y.dtype]
    z = (y * beta).clamp(min=-_LOG2, max=c.z_max)
    if y.dtype == torch.float32:
        return z, torch.exp2(z * -_LOG2E)  # as in the first-order backward
    return z, torch.exp(-z)


def _q2_graph(z: Tensor, e: Tensor) -> Tensor:
    """2q = 2 beta^2 ds0/dbeta from z = beta y and e = exp(-z), with out-of-place (differentiable) ops.

    Keep in step with :func:`_q2_fast` (same operations, in place); a test checks that both agree.
    """
    c = _CONSTS[z.dtype]
    if z.dtype == torch.float32:
        w = (e - 1.0 - c.guard) / (torch.log(e) - c.guard) * z  # 1 - e^-z (Kahan)
        v = w * w
        p = (2.0 - e).clamp(min=c.p_min)  # 1 + w
        return torch.where(v > _W0_SQ, torch.log(p) * p - e * z, _horner(v, (0.0,) + _Q2))
    w = (e - 1.0 - c.guard) / (torch.log(e) - c.guard) * z  # 1 - e^-z (Kahan)
    p = (w + 1.0).clamp(min=c.p_min)
    g1 = (torch.log(p) + c.guard) / (p - 1.0 + c.guard)  # log1p(w) / w
    v = w * w
    p2 = (1.0 - v).clamp(min=c.p2_min)
    g2 = (torch.log(p2) + c.guard) / (p2 - 1.0 + c.guard)  # log1p(-v) / (-v)
    small = w * (z + w * (g1 - g2))
    large = p * (w * g1) - e * z
    lam = ((v - c.v_lo) * (1.0 / (c.v_hi - c.v_lo))).clamp(0.0, 1.0)
    return torch.lerp(small, large, lam)


def _q2_fast(z: Tensor, e: Tensor) -> Tensor:
    """:func:`_q2_graph` with in-place passes on reused buffers (first-order backward; z is consumed).

    The 0/0 of a ratio at its removable point (e = 1, u = 1) is set to its limit 1 by ``nan_to_num_``
    instead of the guard terms (one pass fewer each, same values); products and sums are fused where
    torch has a fused op (addcmul, lerp).
    """
    c = _CONSTS[z.dtype]
    if z.dtype == torch.float32:
        return _q2_fast_f32(z, e)
    k = 1.0 / (c.v_hi - c.v_lo)
    t = torch.log(e)
    w = torch.sub(e, 1.0).div_(t).nan_to_num_(nan=1.0).mul_(z)  # w = 1 - e^-z (Kahan)
    p = torch.add(w, 1.0).clamp_(min=c.p_min)
    g1 = torch.log(p).div_(torch.sub(p, 1.0, out=t)).nan_to_num_(nan=1.0)  # log1p(w) / w
    p2 = torch.addcmul(_one(z), w, w, value=-1.0).clamp_(min=c.p2_min)  # 1 - w^2
    lam = torch.addcmul(_one(z) * (-c.v_lo * k), w, w, value=k).clamp_(0.0, 1.0)
    g2 = torch.log(p2).div_(torch.sub(p2, 1.0, out=t)).nan_to_num_(nan=1.0)  # log1p(-v) / (-v)
    large = torch.mul(w, g1).mul_(p).addcmul_(z, e, value=-1.0)  # (1 + w) log1p(w) - e z
    small = torch.addcmul(z, w, g1.sub_(g2)).mul_(w)  # w (z + w (g1 - g2))
    return small.lerp_(large, lam)


def _q2_fast_f32(z: Tensor, e: Tensor) -> Tensor:
    """2q for float32: the series sum_k w^2k / (k (2k - 1)) (8 terms) where w^2 <= 0.16, else
    (1 + w) log(1 + w) - e z (no cancellation there); w = 1 - e by Kahan's expm1 from the rounded e.

    Two logs and a polynomial; the branches are selected by a 0/1 lerp weight. z is consumed.
    """
    c = _CONSTS[z.dtype]
    w = torch.sub(e, 1.0).div_(torch.log(e)).nan_to_num_(nan=1.0).mul_(z)  # w = 1 - e^-z (Kahan)
    v = w.mul_(w)
    q2 = _horner_(v, _Q2).mul_(v)
    p = torch.sub(2.0, e).clamp_(min=c.p_min)  # 1 + w
    large = torch.log(p).mul_(p).addcmul_(e, z, value=-1.0)  # (1 + w) log(1 + w) - e z
    return q2.lerp_(large, v.sub_(_W0_SQ).mul_(1e30).clamp_(0.0, 1.0))  # weight 1 where w^2 > 0.16


def _one(t: Tensor) -> Tensor:
    return torch.ones((), dtype=t.dtype, device=t.device)


class _CenteredSoftplusFn(torch.autograd.Function):
    """s0(x; beta) with closed-form derivatives from the output; saves only (y, beta).

    First-order backward: in-place element-wise passes. Under ``create_graph`` (double backward) the same
    formulas as out-of-place ops on the saved output, differentiated by autograd.
    """

    @staticmethod
    def forward(x: Tensor, beta: Tensor, inplace: bool = False) -> Tensor:  # type: ignore[override]
        if _FUSED is not None:
            y = _FUSED.forward(x, beta, inplace)
            if y is not None:
                return y
        out = x if inplace else torch.empty_like(x)
        ch = _Chunks(x, beta)
        for k in range(len(ch)):
            _forward_value(ch.view(x, k), ch.beta, ch.view(out, k))
        return out

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, beta, inplace = inputs
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(output, beta)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        y, beta = ctx.saved_tensors
        need_x, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = gb = None
        if torch.is_grad_enabled():  # create_graph: differentiable ops
            z, e = _slope_terms(y, beta)
            if need_x:
                gx = grad * (1.0 - 0.5 * e)
            if need_b:
                gb = (grad * _q2_graph(z, e)).sum_to_size(beta.shape) / (2.0 * beta * beta)
            return gx, gb, None
        if _FUSED is not None:
            res = _FUSED.backward(y, beta, grad, need_x, need_b)
            if res is not None:
                return res[0], res[1], None
        c = _CONSTS[y.dtype]
        f32 = y.dtype == torch.float32
        ch = _Chunks(y, beta)
        if ch.flat and not grad.is_contiguous():
            grad = grad.contiguous()
        if need_x:
            gx = torch.empty_like(y)
        parts = []
        for k in range(len(ch)):
            g = ch.view(grad, k)
            z = torch.mul(ch.view(y, k), ch.beta).clamp_(min=-_LOG2, max=c.z_max)  # as in _slope_terms
            e = torch.mul(z, -_LOG2E).exp2_() if f32 else torch.mul(z, -1.0).exp_()
            if need_x:
                torch.addcmul(g, g, e, value=-0.5, out=ch.view(gx, k))  # grad * (1 - e/2)
            if need_b:
                q2 = _q2_fast(z, e)
                parts.append(torch.dot(q2.view(-1), g.reshape(-1)) if ch.flat
                             else q2.mul_(g).sum_to_size(ch.beta.shape))
        if need_b:
            gb = (torch.stack(parts).sum(0) if len(parts) > 1 else parts[0]).reshape(beta.shape)
            gb = gb.div_(beta * beta * 2.0)
        return gx, gb, None


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def centered_softplus(x: Tensor, beta: Tensor | float, inplace: bool = False) -> Tensor:
    """Functional centered softplus ``log((1 + exp(beta x)) / 2) / beta`` (paper eq. 4).

    ``beta`` is a positive scalar or a tensor broadcastable against ``x``. float16/bfloat16 inputs are
    computed in float32 and the result is cast back to ``x.dtype``. Saves only the (float32/float64) output
    for backward.

    ``inplace=True`` overwrites ``x`` with the result (float32/float64 inputs; others are computed out of
    place), like ``relu_``: only valid where nothing else needs ``x`` afterwards (autograd raises an error
    if something saved it for backward). Then no new activation-sized tensor is kept at all.
    """
    cdtype = _compute_dtype(x)
    if not isinstance(beta, Tensor):
        beta = torch.tensor(float(beta), dtype=cdtype, device=x.device)
    bc = beta if beta.dtype == cdtype else beta.to(cdtype)
    return _apply(x, bc, inplace)


def _apply(x: Tensor, beta: Tensor, inplace: bool) -> Tensor:
    cdtype = beta.dtype
    if x.dtype == cdtype:
        return _CenteredSoftplusFn.apply(x, beta, inplace)
    return _CenteredSoftplusFn.apply(x.to(cdtype), beta, True).to(x.dtype)  # the float32 copy is ours


class CenteredSoftplus(nn.Module):
    r"""Centered softplus activation (Srinivas et al. 2022, §3.3, eq. 4).

    .. math:: s_0(x;\beta) = \frac{1}{\beta}\log\frac{1 + e^{\beta x}}{2}
              = \mathrm{relu}(x) - \frac{1}{\beta}\,\mathrm{log1p}\bigl(\tanh(\beta|x|/2)\bigr)

    Properties (for every beta > 0): s0(0) = 0, s0' = sigmoid(beta x) in (0, 1), |s0''| <= beta/4,
    normalized curvature |s0''/s0'| <= beta, |s0 - relu| <= log(2)/beta, s0 -> x/2 as beta -> 0 and
    s0 -> relu as beta -> inf. Curvature is penalized through sum(beta) (paper eq. 5).

    Only the output is saved for backward (the memory of a ReLU); derivatives are computed from it.

    Args:
        beta: initial beta (> 0); stored as the learnable parameter ``log_beta`` (``beta = exp(log_beta)``).
        num_channels: if given, one beta per channel (``log_beta`` has shape ``(num_channels,)``), broadcast
            along ``channel_dim`` of the input.
        channel_dim: the channel dimension of the input for per-channel beta (default 1, negative allowed).
        inplace: overwrite the input with the output (float32/float64 inputs), like ``nn.ReLU(inplace=True)``;
            only where nothing else uses the input afterwards.

    Numerically stable for beta in [1e-4, 1e4] and |x| up to 1e4 in float32/float64 (float16/bfloat16
    inputs are computed in float32), for values and for first and second derivatives w.r.t. x and beta.
    """

    inplace: bool = False  # class default: modules pickled before the option existed

    def __init__(self, beta: float = 5.0, num_channels: int | None = None, channel_dim: int = 1,
                 inplace: bool = False) -> None:
        super().__init__()
        self.inplace = bool(inplace)
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
        return _apply(x, self._beta_for(x, _compute_dtype(x)), self.inplace)

    def extra_repr(self) -> str:
        with torch.no_grad():
            b = self.beta.detach().float().cpu()
        extra = ", inplace=True" if self.inplace else ""
        if self.num_channels is None:
            return f"beta={b.item():.4g}{extra}"
        return (f"num_channels={self.num_channels}, channel_dim={self.channel_dim}, "
                f"beta=[min {b.min().item():.4g}, max {b.max().item():.4g}]{extra}")
