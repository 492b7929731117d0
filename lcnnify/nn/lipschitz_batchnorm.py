r"""gamma-Lipschitz batch normalization (paper §3.4.2).

With per-channel statistics (mu, var) held fixed, BN is the affine map
BN(x) = w * (x - mu) / sqrt(var + eps) + b with per-channel gains |w_i| / sqrt(var_i + eps), so its operator
norm is  L(var) = max_i |w_i| / sqrt(var_i + eps)  (w = 1 without affine). The gamma-Lipschitz BN scales the
linear part by the gain clip

    s(var) = min(1, gamma / L(var)),   i.e.  gLBN(x) = s * w * (x - mu) / sqrt(var + eps) + b,

whose Lipschitz constant is s * L = min(L, gamma) <= gamma. gamma >= 1 is learnable and penalized through
log(gamma) (paper eq. 5); it is stored as ``log_gamma_minus_1`` with gamma = 1 + exp(log_gamma_minus_1), which
makes gamma >= 1 hold by construction (in floating point too: 1 + a non-negative number).

Which statistics the clip uses
------------------------------
The clip is computed from **the statistics the layer normalizes with**: the batch statistics in training mode,
the running statistics in eval mode. Then the map applied in either mode, with its statistics held fixed, has
Lipschitz constant exactly min(L(var), gamma) <= gamma, and the eval-mode (certified) constant is
min(L(running_var), gamma), as before.

The reference implementation computes L from the *running* statistics also in training, while normalizing
with the *batch* statistics. Its clip then bounds a map the layer does not apply: after a spectrally normalized
convolution the activations' variance is often orders of magnitude below the placeholder ``running_var = 1``,
so until the running statistics catch up the clip reads a small L (inactive) while the gain applied to the
batch exceeds gamma many times. The network learns to rely on gains that the eval-mode clip (with accurate
statistics) cuts away: eval accuracy stays near chance while train accuracy is high, and recalibrating the
running statistics does not help, because it activates the clip that training never saw.

In training the clip factor is a function of w and gamma (it carries their gradients) evaluated at the batch
variance, which is treated as a constant (no gradient through var into s), exactly as the reference treats the
running statistics; the normalization itself has the exact gradient of training-mode BatchNorm (first and
second order).

Running statistics
------------------
``num_batches_tracked = t`` counts the training batches; the running statistics are updated with the factor
max(momentum, 1/t) (``stats_warmup=True``, default): the first batch replaces the placeholder initial values
(mean 0, var 1), the first 1/momentum batches are averaged cumulatively (as ``momentum=None`` does throughout),
then the usual exponential average follows. Without it, the placeholder carries weight (1 - momentum)^t, which
dominates the eval-mode statistics for several times 1/momentum steps when the true variance is orders of
magnitude smaller (as after a normalized convolution).
``stats_warmup=False`` gives ``nn.BatchNorm``'s update exactly. A layer converted from a BatchNorm that has
tracked at least 1/momentum batches (e.g. a trained model) keeps the plain exponential average.

Synchronized statistics
-----------------------
``synchronized=True`` (what an ``nn.SyncBatchNorm`` converts to) reduces the batch statistics over
``process_group`` in training mode, as ``nn.SyncBatchNorm`` does: mean and variance of the concatenation of all
ranks' batches (ranks may hold different batch sizes, also empty ones), with gradients that flow across ranks;
the clip uses these global statistics. Outside ``torch.distributed`` (not initialized, world size 1) and in eval
mode the layer uses local statistics, like ``nn.SyncBatchNorm``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from .._utils import normal_tensors as _normal_tensors
from .._utils import profiler_range as _profiler_range

__all__ = ["LipschitzBatchNorm"]

_VALID_DIMS = {None: (2, 3, 4, 5), 1: (2, 3), 2: (4,), 3: (5,)}


def _gamma_to_raw(gamma: float) -> float:
    gamma = float(gamma)
    if not (gamma >= 1.0 and math.isfinite(gamma)):
        raise ValueError(f"LipschitzBatchNorm: gamma must be a finite number >= 1 (paper §3.4.2), got {gamma}")
    return math.log(max(gamma - 1.0, 1e-8))


def _reduce_dims(input: Tensor) -> list[int]:
    return [0] + list(range(2, input.dim()))


def _batch_stats(input: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``input`` (no gradient), in ``dtype``.

    ``torch.batch_norm_update_stats`` is the statistics kernel of BatchNorm itself (one pass, faster than the
    generic ``torch.var_mean`` reduction over dims (0, 2, 3), which is the fallback where a backend lacks it).
    Reduced-precision inputs are reduced in ``dtype``."""
    x = input if input.dtype in (torch.float32, torch.float64) else input.to(dtype)
    with torch.no_grad():
        try:
            mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        except (RuntimeError, NotImplementedError):
            var, mean = torch.var_mean(x, dim=_reduce_dims(x), unbiased=False)
    return mean.to(dtype), var.to(dtype)


class _BatchNormWithBatchStats(torch.autograd.Function):
    """y = weight * (x - mean) / sqrt(var + eps) + bias where (mean, var) are the biased batch statistics of x,
    computed by the caller (who needed var before normalizing): the eval-mode kernel in the forward, the
    training-mode BatchNorm gradient (statistics as functions of x) in the backward. Together with the one
    statistics pass this is exactly the work of a training-mode ``F.batch_norm``. Differentiable twice (the
    backward is ``native_batch_norm_backward``, which has its own derivative)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, mean: Tensor, var: Tensor,
                invstd: Tensor, eps: float) -> Tensor:
        y = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.eps = eps
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2] and ctx.has_bias]
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            grad.contiguous(memory_format=_memory_format(x)), x, weight, None, None, mean, invstd, True, ctx.eps,
            need)
        return gx, gw, gb, None, None, None, None


def _clip_scale(weight: Tensor | None, raw: Tensor, invstd: Tensor) -> Tensor:
    """s = gamma / max(L, gamma) = min(1, gamma / L), L = max_i |w_i| invstd_i (w = 1 without affine),
    gamma = 1 + exp(raw); differentiable w.r.t. weight and raw. Written with ``max(L, gamma)``: identical values
    to min(1, gamma / L), but finite gradients when L = 0 (zero-initialised BN weights, e.g. timm's
    zero_init_last), where gamma / L would be inf."""
    gains = invstd if weight is None else weight.abs() * invstd
    L = gains.max()
    gamma = (1.0 + raw.exp()).to(L.dtype)
    return gamma / torch.maximum(L, gamma)


def _folded_weight(weight: Tensor | None, raw: Tensor, invstd: Tensor) -> Tensor:
    """s * w, the weight the clipped layer normalizes with (s per channel without affine)."""
    s = _clip_scale(weight, raw, invstd)
    # contiguous: F.batch_norm's CPU backward reads a stride-0 (expanded) weight wrongly for 2d inputs
    return s.expand(invstd.shape[0]).contiguous() if weight is None else weight * s


class _BatchNormWithBatchStatsAndClip(torch.autograd.Function):
    r"""Training-mode gamma-Lipschitz BN on the CPU, clip included, in one autograd node:

        y = s w (x - mean) / sqrt(var + eps) + b,   s = min(1, gamma / L),   L = max_i |w_i| / sqrt(var_i + eps),

    gamma = 1 + exp(raw), (mean, var) the biased batch statistics of x computed by the caller (var a constant in
    s; the normalization has the exact training-mode BatchNorm gradient). The same function as
    :func:`_folded_weight` followed by :class:`_BatchNormWithBatchStats`, with the clip's few scalars read on the
    host (free on the CPU) and its vector-Jacobian product in closed form: with G = dLoss/d(s w) and
    g_s = <G, w>,

        dLoss/dw   = s G + g_s ds/dL dL/dw,       dLoss/draw = g_s ds/dgamma exp(raw),
        ds/dL      = -(s / M) t,  ds/dgamma = (1 - s (1 - t)) / M,   M = max(L, gamma),
        dL/dw_i    = [gain_i = L] sgn(w_i) / sqrt(var_i + eps) / #{j : gain_j = L},

    t = 1, 1/2, 0 for L >, =, < gamma: the subgradients autograd takes through ``max`` (ties share evenly) and
    ``maximum`` (a tie splits in halves). Under ``create_graph`` (double backward: GradReg, CURE, Hessians) the
    backward recomputes s w with differentiable ops instead, so second derivatives are exact."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, raw: Tensor, mean: Tensor,
                var: Tensor, eps: float) -> Tensor:
        invstd = torch.rsqrt(var + eps)
        gains = invstd if weight is None else (weight * invstd).abs_()
        L_t = gains.max()
        L, e = float(L_t), _exp(float(raw))
        gamma = 1.0 + e
        M = max(L, gamma)
        s = gamma / M if L > gamma else 1.0
        if weight is None:
            w_eff = torch.full_like(invstd, s)
        else:  # s = 1 exactly while the clip is inactive
            w_eff = weight if s == 1.0 else weight * s
        y = torch.batch_norm(x, w_eff, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)
        ctx.save_for_backward(x, weight, raw)
        # intermediates of this call only (never seen outside it): kept on ctx, no saved-tensor bookkeeping
        ctx.stats = (mean, invstd, w_eff, gains, L_t)
        ctx.scalars = (L, e, gamma, M, s)
        ctx.eps = eps
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, raw = ctx.saved_tensors
        mean, invstd, w_eff, gains, L_t = ctx.stats
        need_x, need_w, need_b, need_raw = ctx.needs_input_grad[:4]
        need_w = need_w and weight is not None
        graph = (need_w or need_raw) and torch.is_grad_enabled()  # create_graph: differentiable recomputation
        if graph:
            w_eff = _folded_weight(weight, raw, invstd)
        if grad.stride() != x.stride():  # the kernel is fastest with x's layout
            grad = grad.contiguous(memory_format=_memory_format(x))
        gx, g_eff, gb = torch.ops.aten.native_batch_norm_backward(
            grad, x, w_eff, None, None, mean, invstd, True, ctx.eps,
            [need_x, need_w or need_raw, need_b and ctx.has_bias])
        g_w = g_raw = None
        if graph:
            wrt = [t for t, n in ((weight, need_w), (raw, need_raw)) if n]
            grads = list(torch.autograd.grad(w_eff, wrt, g_eff, create_graph=True))
            g_w = grads.pop(0) if need_w else None
            g_raw = grads.pop(0) if need_raw else None
        elif need_w or need_raw:
            g_w, g_raw = _clip_vjp(g_eff, weight, raw, invstd, gains, L_t, *ctx.scalars, need_w, need_raw)
        return gx, g_w, gb, g_raw, None, None, None


def _exp(raw: float) -> float:
    """exp(raw) as a Python float (inf where it overflows)."""
    return math.exp(raw) if raw < 709.0 else math.inf


def _clip_vjp(g_eff: Tensor, weight: Tensor | None, raw: Tensor, invstd: Tensor, gains: Tensor, L_t: Tensor,
              L: float, e: float, gamma: float, M: float, s: float, need_w: bool,
              need_raw: bool) -> tuple[Tensor | None, Tensor | None]:
    """(dLoss/dw, dLoss/draw) from G = dLoss/d(s w): the closed form of :class:`_BatchNormWithBatchStatsAndClip`."""
    if not L >= gamma:  # clip inactive (s = 1): w_eff = w, no gradient into gamma
        return (g_eff if need_w else None), (torch.zeros_like(raw) if need_raw else None)
    t = 1.0 if L > gamma else 0.5
    g_s = g_eff.sum() if weight is None else torch.dot(g_eff, weight)
    g_raw = (g_s * ((1.0 - s * (1.0 - t)) / M * e)).view_as(raw) if need_raw else None
    g_w = None
    if need_w:
        mask = gains == L_t
        count = int(mask.sum())
        # dL/dw on the maximizing channels: sgn(w_i) invstd_i, shared evenly among ties
        direction = weight.sgn().mul_(invstd).mul_(mask)
        g_w = torch.addcmul(g_eff * s, direction, g_s, value=-(s / M) * t / max(count, 1))
    return g_w, g_raw


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _channel_view(t: Tensor, ndim: int) -> Tensor:
    return t.view(1, -1, *([1] * (ndim - 2)))


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over the ranks of a process group: the gradient of each rank's input is the sum over
    ranks of the gradients of the (identical) outputs."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.group), None


def _global_batch_stats(input: Tensor, group: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel mean and biased variance of the concatenation of every rank's ``input`` (differentiable
    across ranks), and the total count per channel. Two reductions (sum, then centred sum of squares), so the
    variance does not cancel catastrophically when the mean is large."""
    dims = _reduce_dims(input)
    local_n = input.numel() // input.shape[1]
    packed = torch.cat([input.sum(dims), input.new_full((1,), float(local_n))])
    packed = _AllReduceSum.apply(packed, group)
    total, count = packed[:-1], packed[-1].detach()
    if float(count) <= 1.0:
        raise ValueError(f"LipschitzBatchNorm: expected more than 1 value per channel when training, got "
                         f"{int(count)} over all ranks (input of shape {tuple(input.shape)} on this rank)")
    mean = total / count
    centred = input - _channel_view(mean, input.dim())
    var = _AllReduceSum.apply(centred.square().sum(dims), group) / count
    return mean, var, count


def _reads_host_scalars(input: Tensor) -> bool:
    """Whether the training forward reads its scalars (the clip's L and gamma, the running-statistics factor)
    as Python numbers: on the CPU, where that is free, and not while ``torch.compile`` traces. Elsewhere they
    stay tensors (no device synchronization)."""
    return input.is_cpu and not torch.compiler.is_compiling()


@dataclass
class _FoldedWeightCache:
    """The running-statistics folded weight s w and copies of what it was computed from."""

    weight: Tensor | None
    raw: Tensor
    running_var: Tensor
    eps: float
    folded: Tensor

    def matches(self, weight: Tensor | None, raw: Tensor, running_var: Tensor, eps: float) -> bool:
        return (eps == self.eps and _same(raw, self.raw) and _same(running_var, self.running_var)
                and (_same(weight, self.weight) if weight is not None else self.weight is None))


def _same(a: Tensor, b: Tensor | None) -> bool:
    return (b is not None and a.dtype == b.dtype and a.device == b.device and a.shape == b.shape
            and torch.equal(a, b))


class LipschitzBatchNorm(_NormBase):
    r"""gamma-Lipschitz BatchNorm for (N, C), (N, C, L), (N, C, H, W) and (N, C, D, H, W) inputs (paper §3.4.2).

    .. math:: \mathrm{BN}_\gamma(x) = \min\Bigl(1, \frac{\gamma}{L}\Bigr)\,
              \frac{w\,(x-\mu)}{\sqrt{\sigma^2+\epsilon}} + b,\qquad
              L = \max_i \frac{|w_i|}{\sqrt{\sigma_i^2+\epsilon}}

    with (mu, sigma^2) the statistics the layer normalizes with (see the module docstring for why):

    * training mode: the (biased) batch statistics, as ``nn.BatchNorm``; L from the same batch variance, treated
      as a constant (no gradient through it into the clip). The map applied to the batch, with its statistics
      held fixed, is min(L, gamma)-Lipschitz. Running statistics updated with the factor max(momentum, 1/t)
      (``stats_warmup``; t = ``num_batches_tracked``), or the cumulative average with ``momentum=None``.
    * eval mode: the running statistics; the gain is exactly :meth:`lipschitz_constant` = min(L, gamma) with
      L from ``running_var`` (the certified value).
    * The clip factor is folded into the BN weight: in eval mode the layer is one ``F.batch_norm`` call (the
      folded weight s w is cached while the weight, gamma, ``running_var`` and ``eps`` keep their values, when
      no gradient is wanted); in training one pass of BatchNorm's statistics kernel (which also updates the
      running statistics), the clip from its variance, one normalization pass: the work of a training-mode
      ``F.batch_norm``. On the CPU the clip's scalars are read on the host and the clip, normalization and their
      gradients are one autograd node (closed-form gradient of the clip; exact double backward).
    * ``track_running_stats=False`` (no running statistics; BN always normalizes with the batch statistics):
      L uses the biased variance of the current batch in both modes.
    * gamma = 1 + exp(log_gamma_minus_1) >= 1 by construction (initial value ``gamma``, default 10); it gets a
      gradient only while clipping is active (gamma < L).
    * ``frozen=True`` (used for torchvision's FrozenBatchNorm2d): always the running statistics, never updated,
      weight and bias not trainable.
    * ``synchronized=True``: training-mode statistics reduced over ``process_group`` (default: the world), as
      ``nn.SyncBatchNorm``; local statistics when ``torch.distributed`` is not initialized, the group has one
      rank, or in eval mode. :meth:`convert_sync_batchnorm` switches it on for every layer of a model.

    state_dict keys: those of ``nn.BatchNorm`` (weight, bias, running_mean, running_var, num_batches_tracked)
    plus ``log_gamma_minus_1``.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as ``nn.BatchNorm2d``.
        gamma: initial gamma (>= 1).
        dim: 1, 2 or 3 to check inputs like BatchNorm1d/2d/3d; None accepts any 2d-5d input.
        bias: as ``nn.BatchNorm`` (``bias=False`` keeps only the weight).
        frozen: behave like a frozen BN (see above).
        stats_warmup: update the running statistics with max(momentum, 1/t) instead of momentum.
        synchronized: reduce the training-mode statistics over ``process_group`` (see above).
        process_group: the group for ``synchronized`` (None: the default group).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, gamma: float = 10.0,
                 dim: int | None = None, bias: bool = True, frozen: bool = False, stats_warmup: bool = True,
                 synchronized: bool = False, process_group: Any = None) -> None:
        if dim not in _VALID_DIMS:
            raise ValueError(f"LipschitzBatchNorm: dim must be 1, 2, 3 or None, got {dim}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         bias=bias)
        self.dim = dim
        self.frozen = bool(frozen)
        if self.frozen and not track_running_stats:
            raise ValueError("LipschitzBatchNorm: frozen=True needs track_running_stats=True")
        self.stats_warmup = bool(stats_warmup)
        self.synchronized = bool(synchronized)
        self.process_group = process_group
        self.log_gamma_minus_1 = nn.Parameter(
            torch.tensor(_gamma_to_raw(gamma), device=device, dtype=dtype if dtype is not None else None))

    # ------------------------------------------------------------------ gamma / L
    @property
    def gamma(self) -> Tensor:
        """gamma = 1 + exp(log_gamma_minus_1) >= 1 (differentiable scalar)."""
        return 1.0 + self.log_gamma_minus_1.exp()

    def log_gamma(self) -> Tensor:
        """log(gamma) = softplus(log_gamma_minus_1), computed stably (the penalty term of paper eq. 5)."""
        return F.softplus(self.log_gamma_minus_1)

    def _gain_terms(self, var: Tensor) -> Tensor:
        """|w_i| / sqrt(var_i + eps) per channel (1 / sqrt(var_i + eps) without affine)."""
        inv_std = torch.rsqrt(var + self.eps)
        return inv_std if self.weight is None else self.weight.abs() * inv_std

    def lipschitz_bound_unclipped(self) -> Tensor | None:
        """L = max_i |w_i| / sqrt(running_var_i + eps) (None without running statistics)."""
        if self.running_var is None:
            return None
        return self._gain_terms(self.running_var).max()

    def lipschitz_constant(self) -> Tensor:
        """The eval-mode Lipschitz constant min(L, gamma) <= gamma (with running statistics).

        Without running statistics (track_running_stats=False) the gain depends on the batch, and the
        certified bound ``gamma`` is returned."""
        L = self.lipschitz_bound_unclipped()
        if L is None:
            return self.gamma
        return torch.minimum(L, self.gamma.to(L.dtype))

    def clip_factor(self, var: Tensor) -> Tensor:
        """s = min(1, gamma / L(var)) for the per-channel variance ``var`` (differentiable w.r.t. gamma, w)."""
        return _clip_scale(self.weight, self.log_gamma_minus_1, torch.rsqrt(var + self.eps))

    def _scale(self, input: Tensor, use_batch_var: bool) -> Tensor:
        """The clip factor from the batch variance of ``input`` (detached) or from ``running_var``."""
        if use_batch_var:
            var = _batch_stats(input, self._param_dtype())[1]
        else:
            var = self.running_var
        return self.clip_factor(var)

    def _param_dtype(self) -> torch.dtype:
        ref = self.weight if self.weight is not None else self.running_var
        return ref.dtype if ref is not None else torch.float32

    def _scaled_weight(self, s: Tensor) -> Tensor:
        # contiguous: F.batch_norm's CPU backward reads a stride-0 (expanded) weight wrongly for 2d inputs
        return s.expand(self.num_features).contiguous() if self.weight is None else self.weight * s

    # ------------------------------------------------------------------ forward
    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in _VALID_DIMS[self.dim]:
            want = "/".join(f"{d}D" for d in _VALID_DIMS[self.dim])
            raise ValueError(f"LipschitzBatchNorm(dim={self.dim}): expected {want} input, got {input.dim()}D "
                             f"input of shape {tuple(input.shape)}")
        if input.shape[1] != self.num_features:
            raise ValueError(f"LipschitzBatchNorm: expected {self.num_features} channels at dim 1, got input "
                             f"of shape {tuple(input.shape)}")

    def _average_factor(self, host: bool) -> float | Tensor | None:
        """Count this training batch; the running-statistics update factor (None: no update).

        ``host``: a Python float read from ``num_batches_tracked`` (on the CPU, where reading it is free).
        Otherwise a tensor computed from it while it changes (warm-up, ``momentum=None``): no device
        synchronization, and nothing for ``torch.compile`` to specialize on step by step."""
        t, momentum = self.num_batches_tracked, self.momentum
        if not (self.training and self.track_running_stats and t is not None):
            return None
        t.add_(1)
        if momentum is not None and not self.stats_warmup:
            return momentum
        if host:
            inv_t = 1.0 / max(int(t), 1)
            return inv_t if momentum is None else max(momentum, inv_t)
        inv_t = t.to(self.running_mean.dtype).reciprocal()
        return inv_t if momentum is None else inv_t.clamp_min(momentum)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: float | Tensor,
                              factor: float | Tensor) -> None:
        """running <- (1 - factor) running + factor batch, with the unbiased variance (as ``nn.BatchNorm``).

        Written through ``.data`` so that, like ``F.batch_norm``'s own update, it does not bump the buffers'
        version counters: an eval-mode graph that saved them (e.g. CURE's reference pass) stays usable."""
        rm, rv = self.running_mean.data, self.running_var.data
        rm.lerp_(mean.detach().to(rm.dtype), factor)
        rv.lerp_((var.detach() * (count / (count - 1.0))).to(rv.dtype), factor)

    def _sync_group(self) -> Any:
        """The process group to reduce over in this call, or None for local statistics."""
        if not (self.synchronized and self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input: Tensor) -> Tensor:
        with _profiler_range("lcnnify.lipschitz_batchnorm"):
            self._check_input_dim(input)
            if self.frozen or not (self.training or self.running_var is None):  # the running statistics
                return F.batch_norm(input, self.running_mean, self.running_var, self._running_folded_weight(),
                                    self.bias, False, 0.0, self.eps)
            host = _reads_host_scalars(input)
            factor = self._average_factor(host)
            group = self._sync_group() if self.synchronized else None
            if group is not None:
                return self._synchronized_forward(input, group, factor)
            return self._batch_forward(input, factor, host)

    def _running_folded_weight(self) -> Tensor:
        """s w with s from ``running_var``: what the running-statistics forward normalizes with.

        Cached while nothing it depends on changes, when no gradient is wanted (e.g. eval under ``no_grad``):
        the cache holds copies of the weight, ``log_gamma_minus_1`` and ``running_var`` it was computed from and
        is used only while all three are equal to them (``torch.equal``; catches optimizer steps,
        ``load_state_dict``, ``.data`` edits, running-statistics updates, ``.to()``) and ``eps`` is unchanged."""
        w, raw, rv = self.weight, self.log_gamma_minus_1, self.running_var
        if torch.is_grad_enabled() and (raw.requires_grad or (w is not None and w.requires_grad)):
            return _folded_weight(w, raw, torch.rsqrt(rv + self.eps))
        if torch.compiler.is_compiling():
            return _folded_weight(w, raw, torch.rsqrt(rv + self.eps)).detach()
        cache: _FoldedWeightCache | None = self.__dict__.get("_folded_cache")
        if cache is not None and cache.matches(w, raw, rv, self.eps):
            return cache.folded
        with _normal_tensors():
            with torch.no_grad():
                folded = _folded_weight(w, raw, torch.rsqrt(rv + self.eps))
                self.__dict__["_folded_cache"] = _FoldedWeightCache(
                    None if w is None else w.clone(), raw.clone(), rv.clone(), self.eps, folded)
        return folded

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state.pop("_folded_cache", None)  # derived; recomputed on first use
        return state

    def _batch_forward(self, input: Tensor, factor: float | Tensor | None, host: bool) -> Tensor:
        """Batch statistics, one statistics pass: the clip needs the variance before the normalization."""
        count = input.numel() // input.shape[1]
        if count <= 1:
            raise ValueError(f"LipschitzBatchNorm: expected more than 1 value per channel when training, got "
                             f"input of shape {tuple(input.shape)}")
        weight = self.weight
        pdt = weight.dtype if weight is not None else self._param_dtype()
        fused = input.dtype == pdt and pdt in (torch.float32, torch.float64)
        rm, rv = (None, None) if factor is None else (self.running_mean, self.running_var)
        if fused and host and not isinstance(factor, Tensor) and (rv is None or rv.dtype == pdt):
            # BatchNorm's statistics kernel also updates the running statistics (unbiased variance) in place
            # without bumping their version counters, as F.batch_norm does
            mean, var = torch.batch_norm_update_stats(input.detach(), rm, rv, 0.0 if factor is None else factor)
            return _BatchNormWithBatchStatsAndClip.apply(input, weight, self.bias, self.log_gamma_minus_1, mean,
                                                         var, self.eps)
        mean, var = _batch_stats(input, pdt)
        if factor is not None:
            self._update_running_stats(mean, var, count, factor)
        invstd = torch.rsqrt(var + self.eps)
        w = _folded_weight(self.weight, self.log_gamma_minus_1, invstd)
        if fused:
            return _BatchNormWithBatchStats.apply(input, w, self.bias, mean, var, invstd, self.eps)
        # reduced precision (e.g. autocast): F.batch_norm computes its own statistics in its accumulation type
        return F.batch_norm(input, None, None, w, self.bias, True, 0.0, self.eps)

    def _synchronized_forward(self, input: Tensor, group: Any, factor: float | Tensor | None) -> Tensor:
        """Training mode under a process group: normalize with the statistics of all ranks' batches."""
        cd = torch.promote_types(input.dtype, self._param_dtype())
        x = input.to(cd)
        mean, var, count = _global_batch_stats(x, group)
        if factor is not None:  # nn.SyncBatchNorm's update: unbiased variance of the global batch
            self._update_running_stats(mean, var, count, factor)
        s = self.clip_factor(var.detach())
        a = torch.rsqrt(var + self.eps) * self._scaled_weight(s).to(cd)  # y = a * (x - mean) + b
        c = -mean * a if self.bias is None else self.bias.to(cd) - mean * a
        y = torch.addcmul(_channel_view(c, x.dim()), x, _channel_view(a, x.dim()))
        return y.to(input.dtype)

    def extra_repr(self) -> str:
        g = self.gamma.detach().float().item()
        extra = f", gamma={g:.4g}"
        if self.dim is not None:
            extra += f", dim={self.dim}"
        if self.frozen:
            extra += ", frozen=True"
        if not self.stats_warmup:
            extra += ", stats_warmup=False"
        if self.synchronized:
            extra += ", synchronized=True"
        return super().extra_repr() + extra

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_batchnorm(cls, bn: nn.Module, gamma: float = 10.0) -> "LipschitzBatchNorm":
        """A LipschitzBatchNorm with ``bn``'s hyper-parameters, weight, bias and running statistics (copies,
        same device and dtype, same train/eval mode). Accepts nn.BatchNorm1d/2d/3d, nn.SyncBatchNorm (the
        result is ``synchronized`` over the same ``process_group``) and torchvision's FrozenBatchNorm2d (the
        result is ``frozen``)."""
        from torch.nn.modules.batchnorm import _BatchNorm
        frozen = False
        if isinstance(bn, _BatchNorm):
            dim = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(type(bn))
            if dim is None:
                for base, d in ((nn.BatchNorm1d, 1), (nn.BatchNorm2d, 2), (nn.BatchNorm3d, 3)):
                    if isinstance(bn, base):
                        dim = d
            affine, trs, momentum = bn.affine, bn.track_running_stats, bn.momentum
            has_bias = bn.bias is not None if affine else True
        elif type(bn).__name__ == "FrozenBatchNorm2d" and hasattr(bn, "running_var"):
            dim, affine, trs, momentum, has_bias, frozen = 2, True, True, 0.0, True, True
        else:
            raise TypeError(f"LipschitzBatchNorm.from_batchnorm: unsupported module {type(bn).__name__}; "
                            f"expected nn.BatchNorm1d/2d/3d, nn.SyncBatchNorm or FrozenBatchNorm2d")
        sync = isinstance(bn, nn.SyncBatchNorm)
        ref = bn.running_mean if getattr(bn, "running_mean", None) is not None else bn.weight
        num_features = int(ref.shape[0])
        new = cls(num_features, eps=float(bn.eps), momentum=momentum, affine=affine, track_running_stats=trs,
                  device=ref.device, dtype=ref.dtype, gamma=gamma, dim=dim, bias=has_bias, frozen=frozen,
                  synchronized=sync, process_group=bn.process_group if sync else None)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                src, dst = getattr(bn, name, None), getattr(new, name, None)
                if src is not None and dst is not None:
                    dst.copy_(src)
            if new.num_batches_tracked is not None and getattr(bn, "num_batches_tracked", None) is not None:
                new.num_batches_tracked.copy_(bn.num_batches_tracked)
        if frozen:
            new.weight.requires_grad_(False)
            new.bias.requires_grad_(False)
        elif affine:
            new.weight.requires_grad_(bn.weight.requires_grad)
            if new.bias is not None:
                new.bias.requires_grad_(bn.bias.requires_grad)
        new.train(bn.training)
        return new

    @staticmethod
    def convert_sync_batchnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
        """Make every non-frozen LipschitzBatchNorm in ``module`` ``synchronized`` over ``process_group``, in
        place (the counterpart of ``nn.SyncBatchNorm.convert_sync_batchnorm``, which does not see these layers
        because they are not ``nn.BatchNorm`` subclasses). Returns ``module``."""
        for m in module.modules():
            if isinstance(m, LipschitzBatchNorm) and not m.frozen:
                m.synchronized = True
                m.process_group = process_group
        return module
