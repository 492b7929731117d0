r"""The data-free Lipschitz / curvature bound of a (converted) model (DESIGN §5; paper §3.2, Theorem 1).

    b = lcnnify.bound(model, (3, 32, 32))
    b.lipschitz, b.logit_hessian, b.loss_hessian, b.theorem1, b.certified, b.reasons

What is bounded
---------------
For the map ``f: x -> logits`` of the model **in eval mode** (BatchNorm with running statistics, dropout off) on
inputs of shape ``input_shape`` (no batch dimension), over the whole input space (data-free):

* ``lipschitz``      L >= sup_x ||Df(x)||_2  (l2 -> l2 Lipschitz constant of the logits);
* ``logit_hessian``  K >= sup_x ||D^2 f(x)||, the spectral norm of the order-3 Hessian tensor,
  ||D^2 f(x)|| = sup_{|u|=|v|=|w|=1} sum_k w_k u^T H_k(x) v = sup_{|w|=1} ||sum_k w_k H_k(x)||_2 (H_k: Hessian
  of logit k). Where f is only C^{1,1} (e.g. ELU), K bounds the Lipschitz constant of x -> Df(x), which is
  the same number for C^2 maps;
* ``loss_hessian``   sup_x ||Hess_x CE(f(x), y)||_2 <= 0.5 L^2 + sqrt(2) K for every label y (see below);
* ``theorem1``       the paper's Theorem 1 value, for comparison (see below).

How: propagation over the fx graph
----------------------------------
Every node n gets (L_n, K_n), bounds for the map input -> value of n. The input is (1, 0). A node computing
a map h of ONE input node g with ||Dh|| <= a and ||D^2 h|| <= k gets, by the chain rule
D^2(h o g)[u, v] = D^2h[Dg u, Dg v] + Dh D^2g[u, v]:

    L' = a L,   K' = a K + k L^2.

* linear maps (k = 0) with operator norm a: conv (the weight it uses now, W / sigma_estimate for a
  ConvSpectralNorm conv, for the input shape the node sees), linear, BatchNorm in eval (a = max gain;
  ``LipschitzBatchNorm.lipschitz_constant()`` = min(L, gamma)), average pools, reshapes, slicing, padding,
  mean/sum, upsampling... Conv/BN biases are constants and do not matter.
* elementwise phi with |phi'| <= s, |phi''| <= c: a = s, k = c (for |phi''(g) (Dg u)(Dg v)| <= c |Dg u|_2
  |Dg v|_inf). CenteredSoftplus: s = 1, c = max(beta)/4; tanh: 1, 4/(3 sqrt 3); sigmoid: 1/4, 1/(6 sqrt 3);
  SiLU: 1.0999, 1/2; GELU: 1.1290, 0.7979; Mish: 1.0885, 0.6443; ELU(alpha=1): 1, 1; ... (the numeric
  suprema are rounded up; ``tests/test_bounds.py`` checks them on a fine grid; torch's Softplus is taken as
  smooth although it switches to the identity above ``threshold``, a derivative jump of sigmoid(-threshold),
  2e-9 at the default 20). Kept smooth activations
  (SiLU, GELU, ...) therefore keep the bound finite and certified: their slope may exceed 1, which is
  accounted for. Kinks (ReLU, ReLU6, LeakyReLU, Hardswish, Hardsigmoid, SELU, clamp, abs, max-pool...)
  keep a finite L but make K infinite.
* max-pool is Lipschitz with a = sqrt(m), m the largest number of pooling windows an input element lies in
  (|max_w x - max_w y| <= max_{i in w} |x_i - y_i|, so ||.||^2 sums each |x_i - y_i|^2 at most m times; a
  3x3/stride-2 max-pool has m = 4, a = 2, not 1), and not differentiable: K = inf, not certified.
* add / sub of branches (L_i, K_i) with coefficients c_i: (sum |c_i| L_i, sum |c_i| K_i) (triangle
  inequality; an operand broadcast to a larger shape is a duplication, norm sqrt(numel_out / numel_in)).
* concatenation / stack: the map x -> (f(x), g(x)) has ||D(f,g)u||^2 = ||Df u||^2 + ||Dg u||^2 and
  ||D^2(f,g)[u,v]||^2 = ||D^2f[u,v]||^2 + ||D^2g[u,v]||^2, so (sqrt(sum L_i^2), sqrt(sum K_i^2)).
* products of two input-dependent tensors (gating, attention), LayerNorm / GroupNorm / InstanceNorm
  (data-dependent division), batch-statistics BN, opaque modules (not traced), and any op not in the tables:
  L = K = inf, not certified. An op whose inputs do not depend on the input (parameters, shapes) is a
  constant; a submodule that is itself traceable is analysed recursively.

The cross-entropy: l(z) = logsumexp(z) - z_y has gradient p - e_y, ||p - e_y||^2 = (1 - p_y)^2 + sum_{k!=y}
p_k^2 <= 2 (1 - p_y)^2 <= 2, and Hessian diag(p) - p p^T, whose quadratic form u^T (.) u = Var_p(u) is at most
(max u - min u)^2 / 4 <= 1/2 for a unit u. With Hess_x l(f(x)) = Df^T Hess_z l Df + sum_k (dl/dz_k) H_k:
||Hess_x l|| <= 0.5 L^2 + sqrt(2) K.

Certified vs estimated
----------------------
With ``certify=True`` (default) every factor is a certified upper bound (exact arithmetic, plus a 1e-9
relative margin for the floating-point eigen / singular value solvers):

* conv operator norms, two certified routes. (1) Exact: the top eigenvalue of the dense Gram matrix A^T A
  or A A^T (smaller side), built by pushing a basis through the conv and its exact adjoint. (2) The
  circulant-embedding bound: after removing kernel taps that never meet the input and a polyphase split of
  the stride (which turns the strided conv into a stride-1 conv with stride^d times more input channels),
  the zero-padded conv is a restriction of a circular convolution on a grid of N = out + taps - 1 points per
  dimension (no wrap-around), whose norm is max_w ||K_hat(w)||_2 over the N^d DFT frequencies
  (Sedghi et al. 2019; the zero-padding argument of Delattre et al. 2024); non-zero padding modes use
  ||pad|| * ||valid conv|| (||pad|| = sqrt(max copies of an element), looser). Small operators
  (min(in, out) <= 256) go dense; otherwise (2) is accepted when within ``rtol`` of a power-iteration lower
  estimate (it is about 1-3 % above the norm on 8x8 maps, < 1 % on 16x16, but 10-50 % on 2x2-4x4 maps),
  else (1) when min(in, out) <= ``dense_limit``, else (2) with a note saying how loose it may be;
* linear layers: the exact ||W||_2 (singular values / Gram eigenvalues in float64);
* BatchNorm: the closed-form gain; pooling / reshaping / slicing / padding / upsampling (non-negative
  linear maps): Schur's test sqrt(||A||_1 ||A||_inf), exact for reshapes, means, non-overlapping pools and
  duplications, or the exact dense norm when the map is small;
* activation constants: closed forms, or numeric suprema rounded up.

With ``certify=False`` the conv norms are power-iteration estimates, which approach the norm from below:
``certified`` is then False and ``reasons`` says so (the values are estimates, not bounds). Not covered in
either mode: floating-point rounding of the model's own float32 forward, and train-mode behaviour.

A ConvSpectralNorm conv normalizes W by the power-iteration estimate for the shape it last saw, so its
normalized operator norm is >= 1 (slightly): the bound uses the norm that the current weight has for the
shape it sees under ``input_shape``. If that shape differs from the one its sigma refers to (or the conv has
not run yet), an actual forward would re-normalize the weight: the bound is then for the current weights,
flagged uncertified.

Theorem 1 (paper eq. 2)
-----------------------
``theorem1 = sum_i n_i C_i prod_{j<=i} a_j`` over the nodes in topological order treated as a chain
(f_i = one op, a_j its Lipschitz factor, C_i the bound on its normalized curvature |phi''/phi'| -- beta for a
(centered) softplus, 0 for linear maps -- and n_i its output width, per sample). For a DAG this multiplies
the factors of parallel branches as if they were in series, and adds/concats count as factor 1: it is the
naive application of the chain theorem the paper states, reported for comparison. It is NOT a bound on
``logit_hessian``: it bounds the paper's normalized curvature ||Hess f|| / ||grad f|| of a scalar f, carries the
widths n_i (large for wide layers) but only the first power of the Lipschitz products (so it is smaller than K
where those products are large): compare with care.
"""
from __future__ import annotations

import math
import operator
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import MeasurementError
from .nn.centered_softplus import CenteredSoftplus, centered_softplus
from .nn.lipschitz_batchnorm import LipschitzBatchNorm
from .nn.spectral_norm import _ConvOperator, _conv_geometry, _conv_sn_pre_hook, find_conv_spectral_norm

__all__ = ["Bound", "bound", "conv_norm_bound", "activation_constants"]

_INF = math.inf
_MARGIN = 1e-9                  # relative margin on floating-point eigen / singular value solvers
_SQRT2 = math.sqrt(2.0)


# ==========================================================================================================
# result


@dataclass(frozen=True)
class Bound:
    """Data-free bounds of a model's logits map in eval mode (see :mod:`lcnnify.bounds`).

    Attributes:
        lipschitz: L >= sup ||D logits||_2 (l2 Lipschitz constant of the logits map).
        logit_hessian: K >= sup ||D^2 logits|| (spectral norm of the Hessian tensor).
        loss_hessian: 0.5 L^2 + sqrt(2) K >= sup ||Hess_x cross_entropy||_2, for any label.
        theorem1: the paper's Theorem 1 value over the graph as a chain (for comparison only: it bounds a
            different quantity, see the module docstring).
        certified: True when every factor is a certified upper bound and nothing voids the bound.
        reasons: why not certified: ``"node [module path: Type]: why"`` per offending node.
        per_node: node name -> (L, K) of the map input -> that node (input-dependent nodes only).
        notes: informational remarks (loose factors, multiple outputs...), not affecting ``certified``.
        input_shape: the input shape (no batch dimension) the bound is for.
        seconds: wall time of the computation.
    """

    lipschitz: float
    logit_hessian: float
    loss_hessian: float
    theorem1: float
    certified: bool
    reasons: tuple[str, ...] = ()
    per_node: dict[str, tuple[float, float]] = field(default_factory=dict, compare=False)
    notes: tuple[str, ...] = ()
    input_shape: tuple[int, ...] = ()
    seconds: float = field(default=0.0, compare=False)

    def __str__(self) -> str:
        status = "certified" if self.certified else "NOT certified"
        lines = [f"lcnnify bound for inputs of shape {self.input_shape} (eval mode) [{status}]",
                 f"  Lipschitz of the logits (l2)         L = {self.lipschitz:.6g}",
                 f"  sup ||Hessian tensor|| of the logits K = {self.logit_hessian:.6g}",
                 f"  sup ||Hessian|| of the CE loss       0.5 L^2 + sqrt(2) K = {self.loss_hessian:.6g}",
                 f"  paper Theorem 1 (graph as a chain)   {self.theorem1:.6g}"]
        if self.reasons:
            lines.append(f"  not certified ({len(self.reasons)}):")
            lines += [f"    - {r}" for r in self.reasons[:20]]
            if len(self.reasons) > 20:
                lines.append(f"    ... and {len(self.reasons) - 20} more")
        if self.notes:
            lines.append("  notes:")
            lines += [f"    - {n}" for n in self.notes[:10]]
            if len(self.notes) > 10:
                lines.append(f"    ... and {len(self.notes) - 10} more")
        lines.append(f"  ({len(self.per_node)} nodes, {self.seconds:.2f} s)")
        return "\n".join(lines)


# ==========================================================================================================
# small arithmetic helpers (0 * inf = 0: an exact zero factor kills an unknown one)


def _mul(a: float, b: float) -> float:
    return 0.0 if a == 0.0 or b == 0.0 else a * b


def _inv(x: float) -> float:
    return _INF if x == 0.0 else 1.0 / x


def _compose(a: float, k: float, state: tuple[float, float]) -> tuple[float, float]:
    L, K = state
    return _mul(a, L), _mul(a, K) + _mul(k, _mul(L, L))


def _fmt(x: float) -> str:
    return f"{x:.4g}"


# ==========================================================================================================
# activations: (sup |phi'|, sup |phi''| (inf: kink), sup |phi''/phi'| for Theorem 1, reason if not C^1,1)


@dataclass(frozen=True)
class _Act:
    slope: float
    curv: float
    ncurv: float
    name: str
    kink: str | None = None


_SIG_C = 1.0 / (6.0 * math.sqrt(3.0))      # max |sigmoid''| = 0.0962250...
_TANH_C = 4.0 / (3.0 * math.sqrt(3.0))     # max |tanh''| = 0.7698003...
_SELU_SLOPE = 1.0507009873554805 * 1.6732632423543772
_KINK = "not differentiable at its kink: curvature unbounded"


def _act_silu() -> _Act:
    return _Act(1.0999, 0.5, _INF, "SiLU")


def _act_gelu(approximate: str = "none") -> _Act:
    return _Act(1.1290, 0.797885, _INF, "GELU" if approximate == "none" else "GELU(tanh)")


def _act_mish() -> _Act:
    return _Act(1.0885, 0.6443, _INF, "Mish")


def _act_softplus(beta: float, name: str = "Softplus") -> _Act:
    return _Act(1.0, beta / 4.0, beta, name)


def _act_elu(alpha: float) -> _Act:
    if alpha == 1.0:
        return _Act(1.0, 1.0, 1.0, "ELU")
    return _Act(max(1.0, abs(alpha)), _INF, _INF, "ELU", "derivative jumps at 0 (alpha != 1): curvature unbounded")


def _act_kink(slope: float, name: str) -> _Act:
    return _Act(slope, _INF, _INF, name, _KINK)


def _act_module(m: nn.Module) -> _Act | None:
    """Constants of an elementwise activation module, or None if ``m`` is not one we know."""
    if isinstance(m, CenteredSoftplus):
        # the forward computes beta = exp(log_beta) in float32 or float64: take the larger of the two
        lb = m.log_beta.detach()
        b = max(float(lb.exp().max()), float(lb.to(torch.float64).exp().max()))
        return _act_softplus(b, "CenteredSoftplus")
    if isinstance(m, nn.Identity):
        return _Act(1.0, 0.0, 0.0, "Identity")
    if isinstance(m, nn.Softplus):
        return _act_softplus(float(m.beta), "Softplus")
    if isinstance(m, (nn.ReLU, nn.ReLU6, nn.Hardtanh)):
        return _act_kink(1.0, type(m).__name__)
    if isinstance(m, nn.LeakyReLU):
        return _act_kink(max(1.0, abs(float(m.negative_slope))), "LeakyReLU")
    if isinstance(m, nn.PReLU):
        return _act_kink(max(1.0, float(m.weight.detach().abs().max())), "PReLU")
    if isinstance(m, nn.SELU):
        return _act_kink(_SELU_SLOPE, "SELU")
    if isinstance(m, nn.CELU):
        a = float(m.alpha)
        return _Act(1.0, 1.0 / a, 1.0 / a, "CELU")
    if isinstance(m, nn.ELU):
        return _act_elu(float(m.alpha))
    if isinstance(m, nn.SiLU):
        return _act_silu()
    if isinstance(m, nn.GELU):
        return _act_gelu(getattr(m, "approximate", "none"))
    if isinstance(m, nn.Mish):
        return _act_mish()
    if isinstance(m, nn.Hardswish):
        return _act_kink(1.5, "Hardswish")
    if isinstance(m, nn.Hardsigmoid):
        return _act_kink(1.0 / 6.0, "Hardsigmoid")
    if isinstance(m, nn.Sigmoid):
        return _Act(0.25, _SIG_C, 1.0, "Sigmoid")
    if isinstance(m, nn.Tanh):
        return _Act(1.0, _TANH_C, 2.0, "Tanh")
    if isinstance(m, nn.Softsign):
        return _Act(1.0, 2.0, 2.0, "Softsign")
    if isinstance(m, nn.LogSigmoid):
        return _Act(1.0, 0.25, 1.0, "LogSigmoid")
    if isinstance(m, nn.Tanhshrink):
        return _Act(1.0, _TANH_C, _INF, "Tanhshrink")
    # timm's own activation modules (same functions, their own classes)
    if type(m).__module__.startswith("timm."):
        name = type(m).__name__
        table: dict[str, Callable[[], _Act]] = {
            "Swish": _act_silu, "SiLU": _act_silu, "Mish": _act_mish,
            "GELU": _act_gelu, "GELUTanh": lambda: _act_gelu("tanh"),
            "Sigmoid": lambda: _Act(0.25, _SIG_C, 1.0, "Sigmoid"), "Tanh": lambda: _Act(1.0, _TANH_C, 2.0, "Tanh"),
            "HardSwish": lambda: _act_kink(1.5, "HardSwish"),
            "HardSigmoid": lambda: _act_kink(1.0 / 6.0, "HardSigmoid"),
            "HardMish": lambda: _act_kink(1.5, "HardMish"),
        }
        if name in table:
            return table[name]()
    return None


def _arg(node_args: Sequence[Any], kwargs: dict, i: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return node_args[i] if len(node_args) > i else default


def _act_call(target: Any, op: str, args: Sequence[Any], kwargs: dict) -> _Act | None:
    """Constants of a functional / method activation call (args are concrete values), or None."""
    if op == "call_method":
        t = str(target).rstrip("_")
        table_m: dict[str, Callable[[], _Act]] = {
            "relu": lambda: _act_kink(1.0, "relu"), "sigmoid": lambda: _Act(0.25, _SIG_C, 1.0, "sigmoid"),
            "tanh": lambda: _Act(1.0, _TANH_C, 2.0, "tanh"), "abs": lambda: _act_kink(1.0, "abs"),
            "clamp": lambda: _act_kink(1.0, "clamp"), "clip": lambda: _act_kink(1.0, "clip"),
            "clamp_min": lambda: _act_kink(1.0, "clamp_min"), "clamp_max": lambda: _act_kink(1.0, "clamp_max"),
        }
        return table_m[t]() if t in table_m else None
    if op != "call_function":
        return None
    if target is centered_softplus:
        beta = _arg(args, kwargs, 1, "beta", None)
        b = float(beta.detach().max()) if isinstance(beta, Tensor) else float(beta)
        return _act_softplus(b, "centered_softplus")
    if target in (F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.hardtanh, F.hardtanh_, torch.abs,
                  torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max):
        return _act_kink(1.0, getattr(target, "__name__", "relu"))
    if target in (F.leaky_relu, F.leaky_relu_):
        return _act_kink(max(1.0, abs(float(_arg(args, kwargs, 1, "negative_slope", 0.01)))), "leaky_relu")
    if target in (F.elu, F.elu_):
        return _act_elu(float(_arg(args, kwargs, 1, "alpha", 1.0)))
    if target is F.celu:
        a = float(_arg(args, kwargs, 1, "alpha", 1.0))
        return _Act(1.0, 1.0 / a, 1.0 / a, "celu")
    if target in (F.selu, torch.selu):
        return _act_kink(_SELU_SLOPE, "selu")
    if target is F.silu:
        return _act_silu()
    if target is F.gelu:
        return _act_gelu(str(_arg(args, kwargs, 1, "approximate", "none")))
    if target is F.mish:
        return _act_mish()
    if target is F.hardswish:
        return _act_kink(1.5, "hardswish")
    if target is F.hardsigmoid:
        return _act_kink(1.0 / 6.0, "hardsigmoid")
    if target in (torch.sigmoid, F.sigmoid):
        return _Act(0.25, _SIG_C, 1.0, "sigmoid")
    if target in (torch.tanh, F.tanh):
        return _Act(1.0, _TANH_C, 2.0, "tanh")
    if target is F.softplus:
        return _act_softplus(float(_arg(args, kwargs, 1, "beta", 1.0)), "softplus")
    if target is F.softsign:
        return _Act(1.0, 2.0, 2.0, "softsign")
    if target is F.logsigmoid:
        return _Act(1.0, 0.25, 1.0, "logsigmoid")
    return None


def activation_constants(activation: nn.Module) -> tuple[float, float]:
    """(sup |phi'|, sup |phi''|) used by the bound for an activation module (inf: kink); KeyError if unknown."""
    a = _act_module(activation)
    if a is None:
        raise KeyError(f"no bound constants for {type(activation).__name__}")
    return a.slope, a.curv


# ==========================================================================================================
# operator norms of convolutions


def _svd_max(mats: Tensor, chunk_entries: int = 1 << 22) -> float:
    """max over a batch of (complex) matrices of their spectral norms: top eigenvalue of the Hermitian Gram
    matrix on the smaller side (much faster than an SVD), in chunks."""
    if mats.numel() == 0:
        return 0.0
    b, r, c = mats.shape
    per = max(1, chunk_entries // max(1, r * c + min(r, c) ** 2))
    out = 0.0
    for i in range(0, b, per):
        m = mats[i:i + per]
        g = m @ m.mH if r <= c else m.mH @ m
        lam = torch.linalg.eigvalsh(0.5 * (g + g.mH))[..., -1]
        out = max(out, math.sqrt(max(float(lam.max()), 0.0)))
    return out * (1.0 + min(r, c) * 1e-15)


def _conv_pads(geometry: dict) -> list[tuple[int, int]]:
    nd, rpad = geometry["ndim"], geometry["rpad"]
    return [(int(rpad[2 * (nd - 1 - i)]), int(rpad[2 * (nd - 1 - i) + 1])) for i in range(nd)]


def _conv_fft_bound(w: Tensor, geometry: dict, input_shape: Sequence[int], pads: Sequence[tuple[int, int]],
                    chunk_entries: int = 1 << 22) -> float:
    """Certified upper bound of the norm of the ZERO-padded conv (pads per spatial dim) on ``input_shape``:
    trim the taps that never meet the input, polyphase-split the stride, embed in a circular conv on a grid of
    N = out + taps - 1 points per dimension (no wrap-around), max over the DFT frequencies of ||K_hat||_2."""
    nd = geometry["ndim"]
    stride, dil, groups = geometry["stride"], geometry["dilation"], geometry["groups"]
    co, cig = w.shape[0], w.shape[1]
    spatial = list(input_shape[1:])
    ke = [dil[i] * (w.shape[2 + i] - 1) + 1 for i in range(nd)]
    wd = w.new_zeros((co, cig, *ke))
    wd[(slice(None), slice(None)) + tuple(slice(None, None, dil[i]) for i in range(nd))] = w
    crop, Qs, Ns = [], [], []
    for i in range(nd):
        n, (l, r), s, k = spatial[i], pads[i], stride[i], ke[i]
        o = (n + l + r - k) // s + 1
        if o < 1:
            return 0.0
        t_lo, t_hi = max(0, l - s * (o - 1)), min(k - 1, l + n - 1)
        if t_hi < t_lo:
            return 0.0  # no tap ever meets the input: the operator is zero
        crop.append(slice(t_lo, t_hi + 1))
        q = -(-(t_hi - t_lo + 1) // s)
        Qs.append(q)
        Ns.append(o + q - 1)
    wd = wd[(slice(None), slice(None)) + tuple(crop)]
    padspec: list[int] = []
    for i in reversed(range(nd)):
        padspec += [0, Qs[i] * stride[i] - wd.shape[2 + i]]
    wq = F.pad(wd, padspec)
    view = [co, cig]
    for i in range(nd):
        view += [Qs[i], stride[i]]
    wq = wq.reshape(view)
    perm = [0, 1] + [3 + 2 * i for i in range(nd)] + [2 + 2 * i for i in range(nd)]
    S = math.prod(stride)
    wq = wq.permute(perm).reshape(groups, co // groups, cig * S, *Qs)   # (g, co/g, ci/g * S, *Q)
    # explicit DFT over a half spectrum (conjugate symmetry of a real kernel), in chunks of frequencies
    taps = torch.cartesian_prod(*[torch.arange(q, dtype=torch.float64) for q in Qs]).reshape(-1, nd)
    wflat = wq.reshape(groups * (co // groups) * cig * S, -1).to(torch.complex128)      # (rows, taps)
    freq_axes = [torch.arange(N, dtype=torch.float64) / N for N in Ns]
    freq_axes[0] = freq_axes[0][: Ns[0] // 2 + 1]
    freqs = torch.cartesian_prod(*freq_axes).reshape(-1, nd)                              # (F, nd)
    per = max(1, chunk_entries // max(1, wflat.shape[0]))
    best = 0.0
    for i in range(0, freqs.shape[0], per):
        phase = torch.exp(-2j * math.pi * (freqs[i:i + per] @ taps.T))                   # (f, taps)
        kh = (phase @ wflat.T).reshape(-1, groups, co // groups, cig * S)
        best = max(best, _svd_max(kh.reshape(-1, co // groups, cig * S), chunk_entries))
    return best


def _pad_norm(geometry: dict, input_shape: Sequence[int]) -> float:
    """||F.pad(., mode)|| = sqrt(max number of copies of an input element) (exact: a 0/1 selection map)."""
    x = torch.ones((1, 1, *input_shape[1:]), dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        y = F.pad(x, geometry["rpad"], mode=geometry["padding_mode"])
        (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    return math.sqrt(float(g.max()))


def _adjoint(op: _ConvOperator, w: Tensor, y: Tensor) -> Tensor:
    """Exact batched adjoint of the conv operator: the transposed conv (zero padding), or the vector-Jacobian
    product of the linear map (other padding modes)."""
    if op.kind in (0, 1):
        return op.adjoint(y, w)
    with torch.enable_grad():
        x = torch.zeros((y.shape[0], *op.input_shape), dtype=y.dtype, device=y.device, requires_grad=True)
        (g,) = torch.autograd.grad(op.forward(x, w), x, grad_outputs=y)
    return g


def _conv_dense_norm(op: _ConvOperator, w: Tensor, chunk: int = 256) -> float:
    """Exact ||A||_2: top eigenvalue of the Gram matrix on the smaller side (built column by column)."""
    n_in, n_out = math.prod(op.input_shape), math.prod(op.output_shape)
    n = min(n_in, n_out)
    G = torch.empty((n, n), dtype=torch.float64)
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        E = torch.zeros((m, n), dtype=torch.float64)
        E[torch.arange(m), torch.arange(i, i + m)] = 1.0
        if n_in <= n_out:
            col = _adjoint(op, w, op.forward(E.view(m, *op.input_shape), w))
        else:
            col = op.forward(_adjoint(op, w, E.view(m, *op.output_shape)), w)
        G[:, i:i + m] = col.reshape(m, n).T
    G = 0.5 * (G + G.T)
    lam = float(torch.linalg.eigvalsh(G)[-1])
    return math.sqrt(max(lam, 0.0)) * (1.0 + _MARGIN + n * 1e-15)


def _conv_power(op: _ConvOperator, w: Tensor, v0: Tensor | None, iters: int) -> float:
    """Power-iteration estimate (from below) of ||A||_2."""
    if v0 is not None and tuple(v0.shape[1:]) == op.input_shape:
        v = v0.detach().to(torch.float64).clone()
    else:
        g = torch.Generator().manual_seed(0)
        v = torch.randn((1, *op.input_shape), dtype=torch.float64, generator=g)
    v = v / v.norm().clamp_min(1e-300)
    for _ in range(iters):
        u = op.forward(v, w)
        u = u / u.norm().clamp_min(1e-300)
        v = op.adjoint(u, w)
        v = v / v.norm().clamp_min(1e-300)
    return float(op.forward(v, w).norm())


@torch.no_grad()
def conv_norm_bound(weight: Tensor, geometry: dict, input_shape: Sequence[int], *, certify: bool = True,
                    dense_limit: int = 2048, rtol: float = 1e-2, power_iterations: int = 30,
                    v0: Tensor | None = None, method: str = "auto") -> tuple[float, str]:
    """Operator norm of the convolution (no bias) with ``weight`` and ``geometry`` (as
    ``lcnnify.nn.spectral_norm._conv_geometry``) on inputs of shape ``input_shape = (C, *spatial)``.

    Returns ``(value, how)``. ``certify=False``: the power-iteration estimate (from below). Otherwise an upper
    bound: ``method="dense"`` exact (Gram eigenvalue), ``"fft"`` the circulant-embedding bound, ``"auto"``:
    exact for small operators, else the FFT bound when within ``rtol`` of the power estimate, else exact when
    min(in, out) <= ``dense_limit``, else the FFT bound (``how`` then says how loose it may be).
    """
    w = weight.detach().to(torch.float64).cpu()
    op = _ConvOperator(geometry, tuple(int(s) for s in input_shape))
    if not certify:
        return _conv_power(op, w, v0, power_iterations), "power iteration (estimate from below)"
    n = min(math.prod(op.input_shape), math.prod(op.output_shape))
    if method == "dense" or (method == "auto" and n <= min(256, dense_limit)):
        return _conv_dense_norm(op, w), "exact (dense Gram)"

    def fft() -> float:
        if geometry["padding_mode"] == "zeros":
            return _conv_fft_bound(w, geometry, op.input_shape, _conv_pads(geometry))
        padded = [s + l + r for s, (l, r) in zip(op.input_shape[1:], _conv_pads(geometry))]
        valid = _conv_fft_bound(w, geometry, (op.input_shape[0], *padded), [(0, 0)] * geometry["ndim"])
        return _pad_norm(geometry, op.input_shape) * valid

    if method == "fft":
        return fft() * (1.0 + _MARGIN), "circulant-embedding bound"
    hi = fft() * (1.0 + _MARGIN)
    lo = _conv_power(op, w, v0, power_iterations)
    if hi <= lo * (1.0 + rtol):
        return hi, "circulant-embedding bound"
    if n <= dense_limit:
        return min(hi, _conv_dense_norm(op, w)), "exact (dense Gram)"
    return hi, f"circulant-embedding bound (up to {100 * (hi / max(lo, 1e-300) - 1):.1f}% above the estimate)"


def _matrix_norm(w: Tensor) -> float:
    """Exact ||W||_2 (float64 singular values / Gram eigenvalues) with a tiny margin."""
    w = w.detach().to(torch.float64).cpu()
    if w.dim() != 2:
        w = w.reshape(w.shape[0], -1)
    if min(w.shape) > 512:
        g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        val = math.sqrt(max(float(torch.linalg.eigvalsh(0.5 * (g + g.T))[-1]), 0.0))
    else:
        val = float(torch.linalg.matrix_norm(w, 2)) if w.numel() else 0.0
    return val * (1.0 + _MARGIN + min(w.shape) * 1e-15)


def _matrix_power(w: Tensor, iters: int) -> float:
    w = w.detach().to(torch.float64).cpu().reshape(w.shape[0], -1)
    v = torch.randn(w.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for _ in range(iters):
        v = w.T @ (w @ v)
        v = v / v.norm().clamp_min(1e-300)
    return float((w @ v).norm())


# ==========================================================================================================
# non-negative linear maps (pools, reshapes, slicing, padding, upsampling...): Schur's test or dense


def _flat_tensors(val: Any) -> list[Tensor]:
    out: list[Tensor] = []
    if isinstance(val, Tensor):
        out.append(val)
    elif isinstance(val, (list, tuple)):
        for v in val:
            out += _flat_tensors(v)
    elif isinstance(val, dict):
        for v in val.values():
            out += _flat_tensors(v)
    return out


def _nonneg_linear_norm(fn: Callable[[Tensor], Any], example: Tensor, dense_entries: int = 1 << 16) -> float:
    """Certified norm bound of an affine map x -> fn(x) whose linear part has non-negative entries:
    Schur's test ||A||_2 <= sqrt(max(A 1) * max(A^T 1)) (A 1 = fn(1) - fn(0), A^T 1 by a vector-Jacobian
    product), or the exact norm of the dense Jacobian when it is small."""
    shape, dev = tuple(example.shape), example.device

    def run(dtype: torch.dtype) -> float:
        zeros = torch.zeros(shape, dtype=dtype, device=dev, requires_grad=True)
        with torch.enable_grad():
            y0 = _flat_tensors(fn(zeros))
            y1 = _flat_tensors(fn(torch.ones(shape, dtype=dtype, device=dev)))
            diff = [a.detach() - b.detach() for a, b in zip(y1, y0)]
            grads = torch.autograd.grad([t for t in y0 if t.requires_grad],
                                        zeros, [torch.ones_like(t) for t in y0 if t.requires_grad],
                                        allow_unused=True) if any(t.requires_grad for t in y0) else (None,)
        rows = max((float(d.max()) for d in diff if d.numel()), default=0.0)
        g = grads[0]
        cols = float(g.max()) if g is not None and g.numel() else 0.0
        best = math.sqrt(max(rows, 0.0) * max(cols, 0.0))
        n_out = sum(t.numel() for t in y0)
        n_in = math.prod(shape)
        # lower bounds ||A 1|| / ||1|| and ||A^T 1|| / ||1||: when one meets Schur's bound, it is exact
        a1 = math.sqrt(sum(float((d.to(torch.float64) ** 2).sum()) for d in diff))
        at1 = float(g.to(torch.float64).norm()) if g is not None else 0.0
        lower = max(a1 / math.sqrt(max(n_in, 1)), at1 / math.sqrt(max(n_out, 1)))
        if 0 < n_in * n_out <= dense_entries and best > lower * (1.0 + 1e-12):
            try:
                def flat(x: Tensor) -> Tensor:
                    ts = _flat_tensors(fn(x))
                    return torch.cat([t.reshape(-1) for t in ts])
                J = torch.autograd.functional.jacobian(flat, torch.zeros(shape, dtype=dtype, device=dev))
                exact = float(torch.linalg.matrix_norm(J.reshape(n_out, n_in).to(torch.float64), 2))
                best = min(best, exact * (1.0 + _MARGIN))
            except Exception:  # noqa: BLE001 - the Schur bound stands
                pass
        return best * (1.0 + _MARGIN)

    try:
        return run(torch.float64)
    except (RuntimeError, TypeError):
        return run(example.dtype if example.is_floating_point() else torch.float32)


# ==========================================================================================================
# op tables


_PASS_MODULES: tuple[type, ...] = (nn.Identity, nn.Flatten, nn.Unflatten)
_NONNEG_MODULES: tuple[type, ...] = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
    nn.ReplicationPad3d, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle, nn.Flatten, nn.Unflatten,
) + tuple(t for t in (getattr(nn, "CircularPad1d", None), getattr(nn, "CircularPad2d", None),
                      getattr(nn, "CircularPad3d", None)) if t is not None)
_MAXPOOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_ADAPTIVE_MAXPOOL_MODULES = (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_NORM_VOID: tuple[tuple[type, str], ...] = (
    (nn.LayerNorm, "LayerNorm divides by a data-dependent std: Lipschitz constant unbounded"),
    (nn.GroupNorm, "GroupNorm divides by a data-dependent std: Lipschitz constant unbounded"),
    (nn.modules.instancenorm._InstanceNorm, "InstanceNorm divides by a data-dependent std"),
    (nn.LocalResponseNorm, "LocalResponseNorm is a data-dependent division"),
    (nn.MultiheadAttention, "attention (products of input-dependent tensors)"),
    (nn.Softmax, "softmax inside the network is not analysed"),
)
_PLAIN_CONV_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)
_CONV_FUNCTIONS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}

_NONNEG_FUNCTIONS = {
    operator.getitem, torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.swapaxes,
    torch.squeeze, torch.unsqueeze, torch.narrow, torch.select, torch.roll, torch.flip, torch.mean, torch.sum,
    torch.t, torch.movedim, torch.moveaxis, torch.chunk, torch.split, torch.unbind, torch.tile,
    torch.repeat_interleave, torch.clone, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.pad, F.pixel_shuffle,
    F.pixel_unshuffle, getattr(F, "channel_shuffle", torch.clone), torch.broadcast_to, torch.ravel,
}
_NONNEG_METHODS = {
    "view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "contiguous", "expand",
    "expand_as", "view_as", "reshape_as", "repeat", "mean", "sum", "narrow", "select", "roll", "flip", "chunk",
    "split", "unbind", "t", "movedim", "moveaxis", "swapaxes", "clone", "to", "float", "double", "half",
    "bfloat16", "type", "type_as", "__getitem__", "unflatten", "ravel", "tile", "repeat_interleave",
    "broadcast_to", "cpu", "cuda",
}
_SHAPE_ONLY_SECOND = {"expand_as", "view_as", "reshape_as", "type_as", "to"}
_INTERP_NONNEG_MODES = {"nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area"}
_CONSTANT_LIKE_FUNCTIONS = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
                            torch.rand_like, torch.randn_like, torch.randint_like}
_CONSTANT_LIKE_METHODS = {"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "size", "dim",
                          "numel", "ndimension", "nelement", "element_size", "get_device", "is_contiguous",
                          "zero_"}
_ADD = {operator.add, operator.iadd, torch.add}
_SUB = {operator.sub, operator.isub, torch.sub, torch.subtract}
_MUL = {operator.mul, operator.imul, torch.mul, torch.multiply}
_DIV = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, torch.divide}
_NEG = {operator.neg, torch.neg, torch.negative}
_CAT = {torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack, torch.vstack}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}
_INPLACE_FUNCTIONS = {F.relu_, torch.relu_, F.leaky_relu_, F.elu_, F.hardtanh_}
_VOID_FUNCTIONS: dict[Any, str] = {
    F.layer_norm: "LayerNorm divides by a data-dependent std", F.group_norm: "GroupNorm divides by a "
    "data-dependent std", F.instance_norm: "InstanceNorm divides by a data-dependent std",
    F.softmax: "softmax inside the network is not analysed", torch.softmax: "softmax inside the network",
    F.scaled_dot_product_attention: "attention (products of input-dependent tensors)",
    torch.max: "max is not differentiable", torch.amax: "max is not differentiable",
    torch.matmul: "product of two input-dependent tensors (attention / gating)",
    operator.matmul: "product of two input-dependent tensors (attention / gating)",
    torch.bmm: "product of two input-dependent tensors", torch.einsum: "einsum of input-dependent tensors",
}


def _dropout_like() -> tuple[type, ...]:
    types: list[type] = [nn.modules.dropout._DropoutNd]
    try:
        from timm.layers import DropBlock2d, DropPath
        types += [DropPath, DropBlock2d]
    except Exception:  # noqa: BLE001 - timm optional
        pass
    try:
        from torchvision.ops import StochasticDepth
        types.append(StochasticDepth)
    except Exception:  # noqa: BLE001
        pass
    return tuple(types)


# ==========================================================================================================
# the propagation


class _Ctx:
    def __init__(self, certify: bool, dense_limit: int, rtol: float, power_iterations: int) -> None:
        self.certify = certify
        self.dense_limit = dense_limit
        self.rtol = rtol
        self.power_iterations = power_iterations
        self.reasons: list[str] = []
        self.notes: list[str] = []
        self.per_node: dict[str, tuple[float, float]] = {}
        self.chain: list[tuple[float, float, int]] = []   # (Lipschitz factor, normalized curvature, width)
        self.dropout_types = _dropout_like()
        self.estimated = False


class _Unknown(Exception):
    """An op the bound cannot analyse: its value is (inf, inf) and the bound is not certified."""


class _ForwardFailed(Exception):
    """The graph could not be run on the example input (wrong input shape...)."""


class _Recorder(fx.Interpreter):
    """Runs the graph once (eval, no grad) and keeps every node's value (batch of one)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        val = super().run_node(n)
        self.values[n] = val
        return val


def _describe(node: fx.Node, modules: dict[str, nn.Module], prefix: str) -> str:
    name = f"{prefix}{node.name}"
    if node.op == "call_module":
        m = modules.get(str(node.target))
        return f"{name} [{node.target}: {type(m).__name__}]"
    if node.op == "call_method":
        return f"{name} [Tensor.{node.target}]"
    if node.op == "call_function":
        return f"{name} [{getattr(node.target, '__name__', str(node.target))}]"
    return name


class _Graph:
    """Bound propagation over one GraphModule (recursive for traceable submodules)."""

    def __init__(self, gm: fx.GraphModule, ctx: _Ctx, prefix: str = "", depth: int = 0) -> None:
        self.gm = gm
        self.ctx = ctx
        self.prefix = prefix
        self.depth = depth
        self.modules = dict(gm.named_modules())

    # ---------------------------------------------------------------- driver
    def run(self, inputs: Sequence[Any], in_states: Sequence[tuple[float, float] | None]) -> Any:
        rec = _Recorder(self.gm)
        try:
            with torch.no_grad():
                rec.run(*inputs)
        except Exception as e:  # noqa: BLE001
            raise _ForwardFailed(f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}") from e
        self.vals = rec.values
        self.state: dict[fx.Node, Any] = {}   # node -> (L, K) if input-dependent (absent: constant)
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        for i, n in enumerate(placeholders):
            st = in_states[i] if i < len(in_states) else None
            if st is not None:
                self.state[n] = st
                self.ctx.per_node[self.prefix + n.name] = st
        out_state = None
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                continue
            if node.op == "output":
                out_state = self._output(node)
                continue
            deps = [a for a in node.all_input_nodes if a in self.state]
            if not deps or not _flat_tensors(self.vals.get(node)):
                continue  # a constant (parameters, shapes, sizes...)
            try:
                st = self._node(node, deps)
            except _Unknown as e:
                self._void(node, str(e))
                self.ctx.chain.append((_INF, _INF, 1))
                st = (_INF, _INF)
            except Exception as e:  # noqa: BLE001 - an analysis failure must not pass as a bound
                msg = (str(e).strip().splitlines() or [""])[0][:200]
                self._void(node, f"not analysed (analysis failed: {type(e).__name__}: {msg})")
                self.ctx.chain.append((_INF, _INF, 1))
                st = (_INF, _INF)
            if st is None:
                continue
            self.state[node] = st
            self.ctx.per_node[self.prefix + node.name] = st
            src = self._inplace_source(node)
            if src is not None and src in self.state:
                self.state[src] = st   # later readers of the mutated tensor see the new value
        return out_state

    def _output(self, node: fx.Node) -> tuple[float, float] | None:
        outs = [a for a in _flat_nodes(node.args[0]) if a in self.state]
        if not outs:
            return None
        if len(outs) == 1:
            return self.state[outs[0]]
        self.ctx.notes.append(f"{self.prefix or 'model'}: several outputs; the bound is for all of them "
                              f"concatenated")
        return (math.sqrt(sum(self.state[o][0] ** 2 for o in outs)),
                math.sqrt(sum(self.state[o][1] ** 2 for o in outs)))

    def _void(self, node: fx.Node, why: str) -> None:
        self.ctx.reasons.append(f"{_describe(node, self.modules, self.prefix)}: {why}")

    def _width(self, node: fx.Node) -> int:
        ts = _flat_tensors(self.vals.get(node))
        return int(sum(t.numel() for t in ts)) if ts else 1

    def _apply(self, node: fx.Node, src: tuple[float, float], locals_: Iterable[tuple[float, float, float]]
               ) -> tuple[float, float]:
        """Compose single-input local maps (a, k, normalized curvature) in order."""
        st = src
        width = self._width(node)
        for a, k, nc in locals_:
            st = _compose(a, k, st)
            self.ctx.chain.append((a, nc, width))
        return st

    def _inplace_source(self, node: fx.Node) -> fx.Node | None:
        first = node.args[0] if node.args else None
        if not isinstance(first, fx.Node):
            return None
        if node.op == "call_method" and str(node.target).endswith("_") and not str(node.target).startswith("__"):
            return first
        if node.op == "call_function" and (node.target in _INPLACE_FUNCTIONS or node.kwargs.get("inplace") is True
                                           or (node.target in (F.relu, F.leaky_relu, F.hardtanh, F.elu, F.dropout)
                                               and any(a is True for a in node.args[1:]))):
            return first
        if node.op == "call_module" and getattr(self.modules.get(str(node.target)), "inplace", False) is True:
            return first
        return None

    # ---------------------------------------------------------------- dispatch
    def _node(self, node: fx.Node, deps: list[fx.Node]) -> tuple[float, float] | None:
        if node.op == "call_module":
            return self._module(node, deps)
        if node.op == "call_function" and node.target in _CONSTANT_LIKE_FUNCTIONS:
            return None
        if node.op == "call_method" and node.target in _CONSTANT_LIKE_METHODS:
            return None
        if node.op == "call_method" and node.target in ("detach", "detach_", "requires_grad_"):
            return self.state[node.args[0]] if node.args[0] in self.state else None
        multi = self._multi_input(node, deps)
        if multi is not None:
            return multi
        src = self._single_dep(node, deps)
        args = _map_vals(node.args, self.vals)
        kwargs = _map_vals(node.kwargs, self.vals)
        act = _act_call(node.target, node.op, args, kwargs)
        if act is not None:
            return self._activation(node, src, act)
        if node.op == "call_function":
            return self._function(node, src, args, kwargs)
        if node.op == "call_method":
            return self._method(node, src, args, kwargs)
        raise _Unknown(f"op {node.op} not analysed")

    def _single_dep(self, node: fx.Node, deps: list[fx.Node]) -> fx.Node:
        if len(deps) == 1:
            return deps[0]
        if node.op == "call_method" and node.target in _SHAPE_ONLY_SECOND and node.args and node.args[0] in deps:
            return node.args[0]
        raise _Unknown("several input-dependent operands (product or unknown combination): not analysed")

    def _activation(self, node: fx.Node, src: fx.Node, act: _Act) -> tuple[float, float]:
        if act.kink is not None:
            self._void(node, f"{act.name}: {act.kink}")
        return self._apply(node, self.state[src], [(act.slope, act.curv, act.ncurv)])

    # ---------------------------------------------------------------- multi-input ops
    def _multi_input(self, node: fx.Node, deps: list[fx.Node]) -> tuple[float, float] | None:
        t = node.target
        out_numel = self._width(node)
        if node.op == "call_function" and t in _CAT:
            items = node.args[0] if node.args else node.kwargs.get("tensors")
            items = list(items) if isinstance(items, (list, tuple)) else [items]
            Ls = [self.state[i][0] for i in items if isinstance(i, fx.Node) and i in self.state]
            Ks = [self.state[i][1] for i in items if isinstance(i, fx.Node) and i in self.state]
            return math.sqrt(sum(x * x for x in Ls)), math.sqrt(sum(x * x for x in Ks))
        add = (node.op == "call_function" and t in _ADD) or (node.op == "call_method" and t in ("add", "add_"))
        sub = (node.op == "call_function" and t in _SUB) or (node.op == "call_method" and t in ("sub", "sub_"))
        if node.op == "call_function" and t is operator.sub and not isinstance(node.args[0], fx.Node):
            sub = True
        if add or sub:
            alpha = node.kwargs.get("alpha", 1.0)
            coefs = [1.0, abs(float(alpha))]
            L = K = 0.0
            for i, a in enumerate(node.args[:2]):
                if isinstance(a, fx.Node) and a in self.state:
                    f = coefs[i] * math.sqrt(out_numel / max(1, self._width(a)))
                    L += _mul(f, self.state[a][0])
                    K += _mul(f, self.state[a][1])
            return L, K
        mul = (node.op == "call_function" and t in _MUL) or (node.op == "call_method" and t in ("mul", "mul_"))
        div = (node.op == "call_function" and t in _DIV) or (node.op == "call_method" and t in ("div", "div_"))
        if mul or div:
            a0, a1 = (list(node.args) + [None, None])[:2]
            if len(deps) > 1 or (isinstance(a0, fx.Node) and a0 in self.state
                                 and isinstance(a1, fx.Node) and a1 in self.state):
                raise _Unknown("product of two input-dependent tensors (gating / attention): curvature "
                               "and Lipschitz constant depend on unbounded activations")
            if div and not (isinstance(a0, fx.Node) and a0 in self.state):
                raise _Unknown("division by an input-dependent tensor")
            if div and node.kwargs.get("rounding_mode") is not None:
                raise _Unknown("rounding division is piecewise constant")
            x, c = (a0, a1) if isinstance(a0, fx.Node) and a0 in self.state else (a1, a0)
            cval = self.vals[c] if isinstance(c, fx.Node) else c
            if isinstance(cval, Tensor):
                cabs = cval.detach().abs()
                mag = float(cabs.max()) if not div else _inv(float(cabs.min()) if cabs.numel() else 1.0)
            else:
                mag = abs(float(cval)) if not div else _inv(abs(float(cval)))
            a = mag * math.sqrt(out_numel / max(1, self._width(x)))
            return self._apply(node, self.state[x], [(a, 0.0, 0.0)])
        if (node.op == "call_function" and t in _NEG) or (node.op == "call_method" and t in ("neg", "neg_")):
            return self._apply(node, self.state[deps[0]], [(1.0, 0.0, 0.0)])
        if node.op == "call_function" and t is operator.pos:
            return self.state[deps[0]]
        return None

    # ---------------------------------------------------------------- functions / methods
    def _function(self, node: fx.Node, src: fx.Node, args: tuple, kwargs: dict) -> tuple[float, float] | None:
        t = node.target
        if t in _VOID_FUNCTIONS:
            raise _Unknown(_VOID_FUNCTIONS[t])
        if t in (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.max_pool1d_with_indices, F.max_pool2d_with_indices,
                 F.max_pool3d_with_indices):
            nd = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}.get(t, len(self.vals[src].shape) - 2)
            ks = _arg(args, kwargs, 1, "kernel_size", 1)
            st = _arg(args, kwargs, 2, "stride", None) or ks
            pd = _arg(args, kwargs, 3, "padding", 0)
            dl = _arg(args, kwargs, 4, "dilation", 1)
            return self._maxpool(node, src, nd, ks, st, pd, dl)
        if t in (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d):
            return self._adaptive_maxpool(node, src)
        if t in _DROPOUT_FUNCTIONS:
            training = _arg(args, kwargs, 2, "training", True)
            p = float(_arg(args, kwargs, 1, "p", 0.5))
            if not training:
                return self.state[src]
            self.ctx.notes.append(f"{self.prefix}{node.name}: functional dropout with training=True baked in "
                                  f"the graph: bounded by its largest scale 1/(1-p)")
            return self._apply(node, self.state[src], [(1.0 / (1.0 - p) if p < 1 else 0.0, 0.0, 0.0)])
        if t is F.linear and node.args and node.args[0] is src:
            return self._apply(node, self.state[src], [(self._matrix(args[1]), 0.0, 0.0)])
        if t in _CONV_FUNCTIONS and node.args and node.args[0] is src:
            return self._functional_conv(node, src, args, kwargs, _CONV_FUNCTIONS[t])
        if t is F.batch_norm and node.args and node.args[0] is src:
            return self._functional_bn(node, src, args, kwargs)
        if t in (F.interpolate, getattr(F, "upsample", None)):
            mode = _arg(args, kwargs, 3, "mode", "nearest")
            if mode not in _INTERP_NONNEG_MODES:
                raise _Unknown(f"interpolation mode {mode!r} has negative weights: not analysed")
            return self._probe(node, src, args, kwargs)
        if t in _NONNEG_FUNCTIONS:
            return self._probe(node, src, args, kwargs)
        raise _Unknown(f"function {getattr(t, '__name__', t)} not analysed")

    def _method(self, node: fx.Node, src: fx.Node, args: tuple, kwargs: dict) -> tuple[float, float] | None:
        t = str(node.target)
        if t in _NONNEG_METHODS:
            if node.args[0] is not src:
                raise _Unknown(f"Tensor.{t} with an input-dependent argument")
            return self._probe(node, src, args, kwargs)
        if t in ("max", "amax", "min", "amin"):
            raise _Unknown(f"{t} is not differentiable")
        if t in ("softmax", "log_softmax"):
            raise _Unknown("softmax inside the network is not analysed")
        raise _Unknown(f"method Tensor.{t} not analysed")

    def _probe(self, node: fx.Node, src: fx.Node, args: tuple, kwargs: dict) -> tuple[float, float]:
        """A non-negative linear map of ``src``: norm by Schur's test / dense Jacobian."""
        val = self.vals[src]
        if not isinstance(val, Tensor):   # getitem / indexing of a tuple of tensors: a projection
            if node.op == "call_function" and node.target is operator.getitem:
                return self._apply(node, self.state[src], [(1.0, 0.0, 0.0)])
            raise _Unknown("op on a container of tensors not analysed")
        pos_args, pos_kwargs = _positions(node, src)

        if node.op == "call_method":
            name = str(node.target)

            def fn(x: Tensor) -> Any:
                a = _replace(args, pos_args, x)
                return getattr(a[0], name)(*a[1:], **_replace(kwargs, pos_kwargs, x))
        elif node.op == "call_function":
            target = node.target

            def fn(x: Tensor) -> Any:
                return target(*_replace(args, pos_args, x), **_replace(kwargs, pos_kwargs, x))
        else:
            mod = self.modules[str(node.target)]

            def fn(x: Tensor) -> Any:
                return mod(x)
        a = _nonneg_linear_norm(fn, val)
        return self._apply(node, self.state[src], [(a, 0.0, 0.0)])

    def _matrix(self, w: Any) -> float:
        if not isinstance(w, Tensor):
            raise _Unknown("linear map with a non-tensor weight")
        if not self.ctx.certify and min(w.shape) > 512:
            self.ctx.estimated = True
            return _matrix_power(w, self.ctx.power_iterations)
        return _matrix_norm(w)

    # ---------------------------------------------------------------- modules
    def _module(self, node: fx.Node, deps: list[fx.Node]) -> tuple[float, float] | None:
        m = self.modules[str(node.target)]
        src = self._single_dep(node, deps)
        if node.args and node.args[0] is not src:
            raise _Unknown("module called with an input-dependent non-first argument")
        if isinstance(m, fx.GraphModule):
            return self._submodule(node, m, src)
        act = _act_module(m)
        if act is not None:
            return self._activation(node, src, act)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not getattr(m, "transposed", False):
            if type(m).forward not in _PLAIN_CONV_FORWARDS:
                raise _Unknown("conv subclass with its own forward: not the plain convolution operator")
            return self._apply(node, self.state[src], [(self._conv(node, m, src), 0.0, 0.0)])
        if isinstance(m, nn.Linear):
            return self._apply(node, self.state[src], [(self._matrix(m.weight), 0.0, 0.0)])
        if isinstance(m, (LipschitzBatchNorm, nn.modules.batchnorm._BatchNorm)) or \
                type(m).__name__ == "FrozenBatchNorm2d":
            return self._batchnorm(node, m, src)
        if isinstance(m, self.ctx.dropout_types):
            if m.training:
                raise _Unknown("dropout in training mode")
            return self.state[src]
        if isinstance(m, _PASS_MODULES):
            return self.state[src]
        if isinstance(m, _MAXPOOL_MODULES):
            return self._maxpool(node, src, len(self.vals[src].shape) - 2, m.kernel_size, m.stride, m.padding,
                                 m.dilation)
        if isinstance(m, _ADAPTIVE_MAXPOOL_MODULES):
            return self._adaptive_maxpool(node, src)
        if isinstance(m, nn.Upsample):
            if m.mode not in _INTERP_NONNEG_MODES:
                raise _Unknown(f"upsampling mode {m.mode!r} has negative weights: not analysed")
            return self._probe(node, src, (), {})
        if isinstance(m, _NONNEG_MODULES):
            return self._probe(node, src, (), {})
        for typ, why in _NORM_VOID:
            if isinstance(m, typ):
                raise _Unknown(why)
        return self._try_trace(node, m, src)

    def _conv(self, node: fx.Node, m: nn.Module, src: fx.Node) -> float:
        shape = tuple(self.vals[src].shape[1:])
        sn = find_conv_spectral_norm(m)
        if sn is not None:
            if sn.input_shape is None:
                self._void(node, "spectrally normalized conv that has not run yet: its weight is not normalized "
                                 "(the first forward will normalize it); the bound is for the current weight")
            elif tuple(sn.input_shape) != shape:
                self._void(node, f"sigma refers to input shape {tuple(sn.input_shape)} but the conv sees {shape}: "
                                 f"a forward at this shape re-normalizes it; the bound is for the current weight")
        v0 = sn.v if sn is not None and sn.v.numel() else None
        val, how = conv_norm_bound(m.weight, _conv_geometry(m), shape, certify=self.ctx.certify,
                                   dense_limit=self.ctx.dense_limit, rtol=self.ctx.rtol,
                                   power_iterations=self.ctx.power_iterations, v0=v0)
        if not self.ctx.certify:
            self.ctx.estimated = True
        elif "above the estimate" in how:
            self.ctx.notes.append(f"{self.prefix}{node.name}: {how}")
        return val

    def _functional_conv(self, node: fx.Node, src: fx.Node, args: tuple, kwargs: dict, nd: int) -> tuple[float, float]:
        w = _arg(args, kwargs, 1, "weight", None)
        if not isinstance(w, Tensor) or (isinstance(node.args[1], fx.Node) and node.args[1] in self.state):
            raise _Unknown("convolution with an input-dependent weight")

        def tup(v: Any) -> tuple[int, ...]:
            return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v),) * nd
        stride = tup(_arg(args, kwargs, 3, "stride", 1))
        padding = _arg(args, kwargs, 4, "padding", 0)
        dilation = tup(_arg(args, kwargs, 5, "dilation", 1))
        groups = int(_arg(args, kwargs, 6, "groups", 1))
        k = tuple(w.shape[2:])
        if isinstance(padding, str):
            pairs = ([(0, 0)] * nd if padding == "valid" else
                     [(d * (kk - 1) // 2, d * (kk - 1) - d * (kk - 1) // 2) for d, kk in zip(dilation, k)])
        else:
            pairs = [(p, p) for p in tup(padding)]
        rpad: list[int] = []
        for lft, rgt in reversed(pairs):
            rpad += [lft, rgt]
        geometry = dict(ndim=nd, stride=stride, dilation=dilation, groups=groups, padding_mode="zeros",
                        rpad=tuple(rpad), kernel_size=k, in_channels=int(w.shape[1]) * groups,
                        out_channels=int(w.shape[0]))
        val, _ = conv_norm_bound(w, geometry, tuple(self.vals[src].shape[1:]), certify=self.ctx.certify,
                                 dense_limit=self.ctx.dense_limit, rtol=self.ctx.rtol,
                                 power_iterations=self.ctx.power_iterations)
        if not self.ctx.certify:
            self.ctx.estimated = True
        return self._apply(node, self.state[src], [(val, 0.0, 0.0)])

    def _functional_bn(self, node: fx.Node, src: fx.Node, args: tuple, kwargs: dict) -> tuple[float, float]:
        rv = _arg(args, kwargs, 2, "running_var", None)
        w = _arg(args, kwargs, 3, "weight", None)
        training = _arg(args, kwargs, 5, "training", False)
        eps = float(_arg(args, kwargs, 7, "eps", 1e-5))
        if training or rv is None:
            raise _Unknown("batch norm with batch statistics: data-dependent normalization")
        gain = _bn_gain(w, rv, eps)
        return self._apply(node, self.state[src], [(gain, 0.0, 0.0)])

    def _batchnorm(self, node: fx.Node, m: nn.Module, src: fx.Node) -> tuple[float, float]:
        if isinstance(m, LipschitzBatchNorm):
            rv = m.running_var
            if rv is None or (m.training and not m.frozen):
                raise _Unknown("batch statistics (no running statistics or training mode): data-dependent "
                               "normalization")
            L = _bn_gain(m.weight, rv, m.eps)
            gain = min(L, float(m.gamma.detach().to(torch.float64)))
        elif type(m).__name__ == "FrozenBatchNorm2d":
            gain = _bn_gain(m.weight, m.running_var, float(m.eps))
        else:
            if m.running_var is None or m.training:
                raise _Unknown("BatchNorm with batch statistics: data-dependent normalization")
            gain = _bn_gain(m.weight, m.running_var, m.eps)
        locals_ = [(gain * (1.0 + _MARGIN), 0.0, 0.0)]
        drop = getattr(m, "drop", None)
        if drop is not None and not isinstance(drop, (nn.Identity,) + self.ctx.dropout_types):
            raise _Unknown(f"fused BN drop {type(drop).__name__} not analysed")
        act = getattr(m, "act", None)
        if act is not None:
            a = _act_module(act)
            if a is None:
                raise _Unknown(f"fused BN activation {type(act).__name__} not analysed")
            if a.kink is not None:
                self._void(node, f"act ({a.name}): {a.kink}")
            locals_.append((a.slope, a.curv, a.ncurv))
        return self._apply(node, self.state[src], locals_)

    def _maxpool(self, node: fx.Node, src: fx.Node, nd: int, ks: Any, st: Any, pd: Any, dl: Any
                 ) -> tuple[float, float]:
        def tup(v: Any) -> tuple[int, ...]:
            return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v),) * nd
        ks, st, pd, dl = tup(ks), tup(st if st is not None else ks), tup(pd), tup(dl)
        inp, out = self.vals[src].shape[-nd:], _flat_tensors(self.vals[node])[0].shape[-nd:]
        mult = 1
        for i in range(nd):
            cover = [0] * int(inp[i])
            for o in range(int(out[i])):
                for t in range(ks[i]):
                    p = o * st[i] - pd[i] + t * dl[i]
                    if 0 <= p < inp[i]:
                        cover[p] += 1
            mult *= max(cover) if cover else 1
        a = math.sqrt(mult)
        self._void(node, f"max-pool is not differentiable: curvature unbounded (Lipschitz factor sqrt({mult}) "
                         f"= {_fmt(a)}: an input element lies in up to {mult} window(s))")
        return self._apply(node, self.state[src], [(a, _INF, _INF)])

    def _adaptive_maxpool(self, node: fx.Node, src: fx.Node) -> tuple[float, float]:
        out_t = _flat_tensors(self.vals[node])[0]
        nd = out_t.dim() - 2
        inp, out = self.vals[src].shape[-nd:], out_t.shape[-nd:]
        mult = 1
        for i in range(nd):
            n, o = int(inp[i]), int(out[i])
            cover = [0] * n
            for j in range(o):
                for p in range((j * n) // o, -((-(j + 1) * n) // o)):
                    cover[p] += 1
            mult *= max(cover) if cover else 1
        a = math.sqrt(mult)
        self._void(node, f"adaptive max-pool is not differentiable: curvature unbounded (Lipschitz factor "
                         f"{_fmt(a)})")
        return self._apply(node, self.state[src], [(a, _INF, _INF)])

    # ---------------------------------------------------------------- submodules
    def _submodule(self, node: fx.Node, gm: fx.GraphModule, src: fx.Node) -> tuple[float, float]:
        if self.depth >= 8:
            raise _Unknown("submodule nesting too deep")
        sub = _Graph(gm, self.ctx, prefix=f"{self.prefix}{node.name}/", depth=self.depth + 1)
        inputs = _map_vals(node.args, self.vals)
        states = [self.state.get(a) if isinstance(a, fx.Node) else None for a in node.args]
        out = sub.run(inputs, states)
        if out is None:
            raise _Unknown("submodule output does not depend on its input")
        return out

    def _try_trace(self, node: fx.Node, m: nn.Module, src: fx.Node) -> tuple[float, float]:
        if node.kwargs or any(isinstance(a, fx.Node) and a is not src for a in node.args[1:]):
            raise _Unknown("opaque module (torch.fx does not trace into it): not analysed")
        try:
            from .convert.trace import trace as _lcnn_trace
            graph = _lcnn_trace(m, training=False)
            gm = fx.GraphModule(m, graph, class_name=type(m).__name__)
        except Exception as e:  # noqa: BLE001 - untraceable: opaque
            raise _Unknown(f"opaque module (cannot be traced: {type(e).__name__}): not analysed") from None
        if any(n.op == "call_module" and gm.get_submodule(str(n.target)) is m for n in gm.graph.nodes):
            raise _Unknown("opaque module: not analysed")
        return self._submodule(node, gm, src)


def _bn_gain(weight: Tensor | None, running_var: Tensor, eps: float) -> float:
    inv = torch.rsqrt(running_var.detach().to(torch.float64) + float(eps))
    if weight is not None:
        inv = weight.detach().to(torch.float64).abs() * inv
    return float(inv.max()) if inv.numel() else 0.0


def _flat_nodes(a: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(a, lambda n: out.append(n) or n)
    return out


def _map_vals(a: Any, vals: dict[fx.Node, Any]) -> Any:
    return fx.node.map_arg(a, lambda n: vals[n])


def _positions(node: fx.Node, src: fx.Node) -> tuple[list[int], list[str]]:
    return ([i for i, a in enumerate(node.args) if a is src],
            [k for k, a in node.kwargs.items() if a is src])


def _replace(container: Any, positions: Sequence[Any], x: Tensor) -> Any:
    if isinstance(container, dict):
        out = dict(container)
        for k in positions:
            out[k] = x
        return out
    out_l = list(container)
    for i in positions:
        out_l[i] = x
    return tuple(out_l)


# ==========================================================================================================
# entry point


class _SNHooksOff:
    """Temporarily detach the ConvSpectralNorm shape pre-hooks so that analysing a shape never re-initialises
    a layer's power iteration (the analysis must not change the model)."""

    def __init__(self, model: nn.Module) -> None:
        self.saved: list[tuple[nn.Module, dict]] = []
        self.model = model

    def __enter__(self) -> "_SNHooksOff":
        for m in self.model.modules():
            hooks = m._forward_pre_hooks
            if any(h is _conv_sn_pre_hook for h in hooks.values()):
                self.saved.append((m, hooks.copy()))
                for k in [k for k, h in hooks.items() if h is _conv_sn_pre_hook]:
                    del hooks[k]
        return self

    def __exit__(self, *exc: Any) -> None:
        for m, saved in self.saved:
            m._forward_pre_hooks.clear()
            m._forward_pre_hooks.update(saved)


def _normalize_shape(input_shape: Any) -> tuple[int, ...]:
    if isinstance(input_shape, Tensor):
        return tuple(int(s) for s in input_shape.shape[1:])
    try:
        shape = tuple(int(s) for s in input_shape)
    except TypeError:
        raise MeasurementError(f"bound(): input_shape must be a sequence of ints (C, *spatial), without the "
                               f"batch dimension, got {input_shape!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise MeasurementError(f"bound(): input_shape must be non-empty positive ints, got {shape}")
    return shape


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def bound(model: nn.Module, input_shape: Any, *, certify: bool = True, dense_limit: int = 2048,
          rtol: float = 1e-2, power_iterations: int = 30) -> Bound:
    """The data-free bound of DESIGN §5 for ``model`` (eval mode) on inputs of shape ``input_shape``.

    Args:
        model: a converted model (the fx GraphModule ``lcnnify`` returns) or any ``nn.Module``: one that is
            not a GraphModule is traced with lcnnify's tracer; if that fails the bound is infinite, not
            certified, with the reason.
        input_shape: the shape of ONE input without the batch dimension, e.g. ``(3, 32, 32)`` (a batched
            example tensor is accepted too).
        certify: True: certified conv operator norms (dense Gram eigenvalue or circulant-embedding bound);
            False: power-iteration estimates (faster; ``certified`` is then False).
        dense_limit: largest min(in, out) dimension for which a conv's exact norm is computed densely.
        rtol: a circulant-embedding bound within ``rtol`` of the power-iteration estimate is accepted without
            the dense computation.
        power_iterations: iterations of the power estimates.

    Returns:
        :class:`Bound`. The model is not changed (mode, buffers and power-iteration state are restored).

    Raises:
        MeasurementError: the model does not run on inputs of ``input_shape``.
    """
    t0 = time.perf_counter()
    shape = _normalize_shape(input_shape)
    ctx = _Ctx(bool(certify), int(dense_limit), float(rtol), int(power_iterations))

    def infinite(why: str) -> Bound:
        reasons = [why]
        report = getattr(model, "lcnn_report", None)
        for fb in getattr(report, "fallbacks", ()) or ():
            reasons.append(f"{getattr(fb, 'path', '') or '<root>'}: converted module by module "
                           f"({getattr(fb, 'reason', '')})")
        return Bound(_INF, _INF, _INF, _INF, False, tuple(reasons), {}, (), shape, time.perf_counter() - t0)

    if isinstance(model, fx.GraphModule):
        gm = model
    else:
        try:
            from .convert.trace import trace as _lcnn_trace
            graph = _lcnn_trace(model, training=False)
            gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
        except Exception as e:  # noqa: BLE001 - untraceable model: no bound
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            return infinite(f"<root> [{type(model).__name__}]: torch.fx cannot trace the model's forward "
                            f"({type(e).__name__}: {msg}); its ops are not analysed")

    modes = {m: m.training for m in model.modules()}
    example = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    example = example.to(dtype=_model_dtype(model), device=_model_device(model))
    try:
        model.eval()
        with _SNHooksOff(model):
            try:
                out = _Graph(gm, ctx).run([example], [(1.0, 0.0)])
            except _ForwardFailed as e:
                raise MeasurementError(
                    f"bound(): the model failed on an input of shape (1, {', '.join(map(str, shape))}): {e}. "
                    f"Fix: pass input_shape = the shape of one input without the batch dimension, e.g. "
                    f"(3, 32, 32)") from e
    finally:
        for m, tr in modes.items():
            m.training = tr

    if out is None:
        L, K = 0.0, 0.0
        ctx.notes.append("the output does not depend on the input")
    else:
        L, K = out
    if ctx.estimated:
        ctx.reasons.append("conv operator norms are power-iteration estimates (certify=False), which approach "
                           "the norm from below: the values are estimates, not bounds")
    theorem1, prod = 0.0, 1.0
    for a, nc, n in ctx.chain:
        prod = _mul(prod, a)
        theorem1 += _mul(_mul(float(n), nc), prod)
    loss = 0.5 * _mul(L, L) + _mul(_SQRT2, K)
    finite = all(math.isfinite(x) for x in (L, K))
    certified = finite and not ctx.reasons
    if not finite and not ctx.reasons:
        ctx.reasons.append("the bound is infinite")
    return Bound(float(L), float(K), float(loss), float(theorem1), certified, tuple(ctx.reasons),
                 dict(ctx.per_node), tuple(dict.fromkeys(ctx.notes)), shape, time.perf_counter() - t0)
