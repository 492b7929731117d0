"""Spectral normalization by the *real* operator norm (paper §3.4.1; Miyato et al. 2018; Ryu et al. 2019).

A layer whose weight W defines a linear operator ``A_W`` (linear in W: a convolution on inputs of a fixed shape,
or a matrix) is reparametrized as

    W  ->  W / max(sigma, min_sigma),     sigma = ||A_W||_2,

with sigma estimated on persistent batch-1 vectors ``u`` (output-shaped) and ``v`` (input-shaped), always
kept unit-norm:

    v <- A^T u / ||A^T u||,     u <- A v / ||A v||,     sigma = <u, A v> = ||A v||.

Modes.

* **training**: ``n_power_iterations`` (default 1) iterations per evaluation of the weight, under no_grad.
  The gradient is Miyato's: u, v held fixed, sigma = <u, A_W v> = <W, G> is linear in W with
  ``G = d<u, A_W v>/dW`` (the conv weight-gradient at input v and output-gradient u), so sigma is computed
  without a graph and a small autograd Function gives ``d(W/sigma)/dW``: ``grad_W = (g - <g, W/sigma> G) / sigma``
  (G recomputed in backward: one batch-1 weight-gradient, accumulated straight into ``g / sigma``; no conv
  graph is kept). On the CPU the two weight-sized outputs (W / sigma and grad_W) reuse the previous step's memory
  whenever nothing references it any more (see :class:`_Scratch`), which spares fresh, page-faulting allocations;
  that memory (twice the normalized weights) stays with the layer while it is in training mode.
* **eval** (and ``lcnnify.freeze``): converged. Whenever the weight differs from the one last converged on
  (compared by value with ``torch.equal`` against a stored copy, so ``p.data.mul_()`` / ``copy_()`` /
  ``load_state_dict`` cannot leave it stale), a Lanczos iteration (at least 15 steps) started from the stored
  ``v`` plus an equal part of a fixed pseudo-random vector (a stale v can lack the new top direction almost
  entirely) runs until the Ritz residual of the top pair is <= ``eval_rtol`` (1e-4) times its Ritz value; the
  result is cached until the weight changes. The converged vectors are kept in that cache, NOT written to ``u``/``v``: evaluating a model
  never changes how it trains afterwards, nor its state_dict. The estimate still approaches ||A|| from below;
  the tolerance puts it within ~1e-5 relative in practice, so eval operator norms are 1 + O(1e-5).
* **a new input shape** (convolutions; learned by a forward pre-hook or given at registration) re-initialises v
  randomly and runs a Lanczos warm-up of at least ``warmup_iterations`` steps (up to 4x, until the same
  residual test passes), in any mode; a ``ShapeChangeWarning`` is emitted once per layer.

Zero and degenerate weights. The map ``W -> W / sigma(W)`` is scale-invariant and undefined at W = 0; its
gradient grows like 1/sigma near 0. We use ``W / max(sigma, min_sigma)``: below ``min_sigma`` the layer is
the plain linear map W / min_sigma (operator norm sigma / min_sigma < 1, so the Lipschitz guarantee still holds,
output exactly 0 at W = 0), with gradient ``1 / min_sigma`` there, and it is exactly normalized again as soon as
sigma >= min_sigma. ``min_sigma`` is far below the operator norm of any initialised or trained weight (those
are O(0.1-10)), so it only acts on weights that are (near) zero: zero-initialised heads (timm
``head_init_scale=0``) and the zero-initialised gains of NF-nets / SkipInit. Its default trades the
continuity of the switch-on against the size of the first step: see ``DEFAULT_MIN_SIGMA``. A
zero weight also makes ``A^T u`` and ``A v`` zero; the iteration then keeps the previous (unit) vector instead
of normalizing a zero vector, so u and v never collapse and the estimate recovers as soon as W is non-zero.

``inference_mode``: a first forward at a new shape inside ``torch.inference_mode()`` creates u, v as normal
tensors (computed under ``inference_mode(False)``), so training afterwards works.

Computations run in (at least) float32 with autocast disabled.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .._utils import normal_tensors as _normal_tensors
from .._utils import profiler_range as _profiler_range
from ..errors import ConversionError, ShapeChangeWarning
from .conv_operator import ConvGeometry, ConvOperator, tf_same_padding

__all__ = ["SpectralNormBase", "ConvSpectralNorm", "conv_spectral_norm", "conv_operator_norm",
           "find_conv_spectral_norm", "find_spectral_norm", "DEFAULT_MIN_SIGMA"]

#: Floor of sigma (see the module docstring). At W = 0 the gradient of W / max(sigma, min_sigma) is
#: 1 / min_sigma times the output gradient; once sigma >= min_sigma the layer is exactly normalized.
DEFAULT_MIN_SIGMA = 1e-4

_LANCZOS_MEMORY_CAP = 1 << 28  # bytes of Krylov basis; above it the iteration falls back to power iteration
_WARMUP_MAX_FACTOR = 4  # a warm-up may extend to this many times warmup_iterations until converged
_WARMUP_RTOL = 1e-3  # convergence: Ritz residual of the top pair <= rtol * Ritz value
_EVAL_RTOL = 1e-4  # eval convergence: Ritz residual <= this * Ritz value (sigma within ~5e-5 when it is the top)
_EVAL_MIN_STEPS = 15  # eval convergence: at least this many Lanczos steps (as many as a fresh warm-up)
_EVAL_MAX_STEPS = 64  # steps per Lanczos cycle; restarted from the Ritz vector up to _EVAL_CYCLES times
_EVAL_CYCLES = 6
_SEED = 0x5EED  # seed of the deterministic re-seed vectors

# former private names (kept importable)
_ConvOperator = ConvOperator
_tf_same_rpad = tf_same_padding


def _conv_geometry(conv: nn.Module) -> ConvGeometry:
    """Former name of :meth:`ConvGeometry.from_conv`."""
    return ConvGeometry.from_conv(conv)


# ---------------------------------------------------------------------------------------------- helpers
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 (power iteration never runs in half precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _no_autocast(device_type: str):
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # pragma: no cover - unusual device types
        enabled = False
    return torch.autocast(device_type, enabled=False) if enabled else contextlib.nullcontext()


def _normalize(t: Tensor, eps: float) -> Tensor:
    return t / torch.linalg.vector_norm(t).clamp_min(eps)


def _unit_or(x: Tensor, fallback: Tensor, eps: float, norm: Tensor | None = None) -> Tensor:
    """x / ||x||, or ``fallback`` (a unit vector) where ||x|| <= eps: never a zero vector (no host sync)."""
    n = torch.linalg.vector_norm(x) if norm is None else norm
    return torch.where(n > eps, x / n.clamp_min(eps), fallback)


def _seed_vector(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A fixed pseudo-random unit vector (same for every call): the re-seed of a collapsed iteration."""
    g = torch.Generator().manual_seed(_SEED)
    return _normalize(torch.randn(tuple(shape), generator=g, dtype=torch.float64), 1e-300).to(dtype=dtype,
                                                                                              device=device)


def _prepare(op: "LinearOperator", w: Tensor) -> Tensor:
    prepare = getattr(op, "prepare_weight", None)
    return w if prepare is None else prepare(w)


class LinearOperator(Protocol):
    """What the spectral normalization needs of ``A_W`` (see :class:`~lcnnify.nn.ConvOperator`)."""

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]

    def forward(self, x: Tensor, w: Tensor) -> Tensor: ...

    def adjoint(self, y: Tensor, w: Tensor) -> Tensor: ...

    def weight_grad(self, x: Tensor, y: Tensor, w: Tensor | None = None) -> Tensor: ...


def _lanczos_cycle(matvec: Callable[[Tensor], Tensor], v: Tensor, min_steps: int, max_steps: int, rtol: float,
                   eps: float) -> tuple[Tensor, bool]:
    """One Lanczos run on the symmetric PSD map ``matvec`` (= A^T A) from the unit vector v, with full
    re-orthogonalization; stops after >= min_steps steps once the Ritz residual ``beta_k |s_k|`` of the top
    Ritz pair is <= rtol * theta (or at max_steps). Returns the top Ritz vector and whether it converged."""
    n = v.numel()
    basis = torch.empty((max_steps, n), dtype=v.dtype, device=v.device)
    basis[0] = v.reshape(-1)
    alphas: list[float] = []
    betas: list[float] = []
    converged = False
    for j in range(max_steps):
        z = matvec(basis[j].view_as(v)).reshape(-1)
        alphas.append(float(torch.dot(basis[j], z)))
        q = basis[: j + 1]
        for _ in range(2):  # classical Gram-Schmidt, twice (full re-orthogonalization)
            z = z - q.t().mv(q.mv(z))
        b = float(torch.linalg.vector_norm(z))
        if not b > 1e-6 * max(abs(alphas[0]), max(alphas), eps):  # invariant subspace: the Ritz pairs are exact
            converged = True
            break
        if j + 1 >= min_steps:
            theta, evecs = torch.linalg.eigh(_tridiagonal(alphas, betas))
            if b * abs(float(evecs[-1, -1])) <= rtol * max(float(theta[-1]), eps):
                converged = True
                break
        if j + 1 == max_steps:
            break
        betas.append(b)
        basis[j + 1] = z / b
    m = len(alphas)
    _, evecs = torch.linalg.eigh(_tridiagonal(alphas, betas[: m - 1]))
    y = evecs[:, -1].to(device=v.device, dtype=v.dtype)
    return _normalize(y.matmul(basis[:m]).view_as(v), eps), converged


def _tridiagonal(alphas: list[float], betas: list[float]) -> Tensor:
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if betas:
        off = torch.tensor(betas, dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return t


def _top_right_singular_vector(op: LinearOperator, w: Tensor, v0: Tensor, *, min_steps: int, max_steps: int,
                               rtol: float, eps: float, cycles: int = 1) -> Tensor:
    """Estimate (no grad) of the top right singular vector of A_W: Lanczos on A^T A from v0, at least
    ``min_steps`` products, then until the Ritz residual is <= rtol * theta, at most ``max_steps`` per cycle and
    ``cycles`` cycles (each restarted from the last Ritz vector). Lanczos has the cost of power iteration per
    step but is far more accurate when the top of the spectrum is a near-continuum, as it is for convolutions
    on large inputs. Falls back to power iteration (same stopping test) when the Krylov basis would exceed
    _LANCZOS_MEMORY_CAP bytes; ``min_steps <= 1 == max_steps`` is plain power iteration."""
    def matvec(x: Tensor) -> Tensor:
        return op.adjoint(op.forward(x, w), w)

    v = _normalize(v0, eps)
    if max_steps <= 1 or max_steps * v.numel() * v.element_size() > _LANCZOS_MEMORY_CAP:
        for k in range(max(min_steps, max_steps) * cycles):
            z = matvec(v)
            theta = torch.dot(v.reshape(-1), z.reshape(-1))
            if k + 1 >= min_steps and max_steps > 1 and \
                    float(torch.linalg.vector_norm(z - theta * v)) <= rtol * max(float(theta), eps):
                break
            v = _unit_or(z, v, eps)
        return v
    for _ in range(cycles):
        v, converged = _lanczos_cycle(matvec, v, min_steps, max_steps, rtol, eps)
        if converged:
            break
        min_steps = 1
    return v


def _grouped_top_right_singular_vector(op: LinearOperator, w: Tensor, v0: Tensor, groups: int, *, steps: int,
                                       eps: float) -> Tensor:
    """Top right singular vector of a grouped conv, group by group.

    A conv with G groups is block diagonal: A^T A maps the input channels of each group to themselves, so
    ||A||_2 = max_g ||A_g||_2. One Lanczos run on the whole operator proves (by its Ritz residual) that it found
    *an* eigenpair, which can be the top of another group when two groups' norms are close. Here the G Lanczos
    recurrences run side by side (one conv + one transposed conv per step for all groups; dot products,
    re-orthogonalization and tridiagonals per group), and the group with the largest top Ritz value wins.
    Returns that group's Ritz vector (zero on the other groups)."""
    shape = v0.shape
    n_g = v0.numel() // groups
    q = v0.reshape(groups, n_g)
    q = q / torch.linalg.vector_norm(q, dim=1, keepdim=True).clamp_min(eps)
    basis = torch.zeros((steps + 1, groups, n_g), dtype=v0.dtype, device=v0.device)
    basis[0] = q
    alphas, betas = [], []
    for j in range(steps):
        z = op.adjoint(op.forward(basis[j].reshape(shape), w), w).reshape(groups, n_g)
        alphas.append((basis[j] * z).sum(1))
        for _ in range(2):  # full re-orthogonalization, per group
            z = z - torch.einsum("kg,kgn->gn", torch.einsum("kgn,gn->kg", basis[: j + 1], z), basis[: j + 1])
        b = torch.linalg.vector_norm(z, dim=1)
        live = b > 1e-6 * alphas[0].abs().clamp_min(eps)  # a group whose Krylov space is exhausted stops growing
        b = torch.where(live, b, torch.zeros_like(b))
        betas.append(b)
        basis[j + 1] = torch.where(live[:, None], z / b.clamp_min(eps)[:, None], torch.zeros_like(z))
    m = len(alphas)
    t = torch.diag_embed(torch.stack(alphas, 1).to(torch.float64))
    if m > 1:
        off = torch.stack(betas[: m - 1], 1).to(torch.float64)
        t = t + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
    theta, evecs = torch.linalg.eigh(t)  # (G, m), (G, m, m)
    g = int(theta[:, -1].argmax())
    y = evecs[g, :, -1].to(dtype=v0.dtype, device=v0.device)
    v = torch.zeros_like(q)
    v[g] = y @ basis[:m, g]
    return _normalize(v.reshape(shape), eps)


class _Scratch:
    """Reusable memory for the weight-sized outputs of one layer's :class:`_SpectralNormalize` (CPU only).

    Every training step produces two weight-sized tensors per layer (``W / sigma`` and the raw weight's gradient)
    that the step frees again; with the C library's allocator, fresh large allocations are served by newly
    mapped, zero-filled pages, whose first touch costs a page fault per 4 KiB. :meth:`take` hands out a tensor
    over memory kept from the previous step *only if nothing else references that memory any more* (the storage's
    reference count is back to what it was when it was allocated: no autograd graph, ``.grad``, view or detached
    alias of it is alive); otherwise it allocates a fresh tensor, which becomes the kept one. Not copied or
    pickled with the layer (a copy starts empty).
    """

    __slots__ = ("_bufs",)

    def __init__(self) -> None:
        self._bufs: dict[str, tuple[Tensor, int]] = {}

    def __reduce__(self):
        return (_Scratch, ())

    def __deepcopy__(self, memo) -> "_Scratch":
        return _Scratch()

    @staticmethod
    def _use_count(t: Tensor) -> int:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)

    def take(self, key: str, like: Tensor) -> Tensor:
        """An uninitialized tensor with ``like``'s shape, dtype, device and strides."""
        kept = self._bufs.get(key)
        if kept is not None:
            buf, free = kept
            if buf.shape == like.shape and buf.dtype == like.dtype and buf.stride() == like.stride() \
                    and buf.device == like.device and self._use_count(buf) == free:
                return buf.detach()  # a new handle on the same memory (not a view: no reference back to buf)
        buf = torch.empty_like(like, memory_format=torch.preserve_format)
        self._bufs[key] = (buf, self._use_count(buf))
        return buf.detach()

    def clear(self) -> None:
        self._bufs.clear()


_REUSE_MEMORY = hasattr(torch._C, "_storage_Use_Count")
_REUSE_MIN_BYTES = 1 << 18  # smaller weights: the allocator's free lists serve them without page faults


class _SpectralNormalize(torch.autograd.Function):
    """``W / max(sigma, min_sigma)`` with sigma = <u, A_W v> = <W, G> for fixed unit vectors u, v (Miyato).

    Backward (sigma >= min_sigma): ``grad_W = (g - <g, W/sigma> G) / sigma``, G = ``op.weight_grad(v, u)``
    recomputed (one batch-1 weight-gradient, accumulated straight into ``g / sigma`` where the operator can:
    ``op.axpby_weight_grad``, with the im2col matrix of v kept from the power iteration); below the floor:
    ``g / min_sigma``. Under create_graph the same formula is built from differentiable ops with
    sigma = <W, G>, so double backward is exact.
    """

    @staticmethod
    def forward(ctx, w: Tensor, sigma: Tensor, v: Tensor, u: Tensor, op: LinearOperator,  # type: ignore[override]
                min_sigma: float, cols: Tensor | None = None, scratch: _Scratch | None = None) -> Tensor:
        ctx.save_for_backward(w, sigma, v, u)
        ctx.op = op
        ctx.min_sigma = min_sigma
        ctx.cols = cols  # a no-grad function of v (not an autograd input): kept as a plain attribute
        ctx.scratch = scratch
        if scratch is None:
            return w / sigma.clamp_min(min_sigma)
        return torch.div(w, sigma.clamp_min(min_sigma), out=scratch.take("weight", w))

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        w, sigma, v, u = ctx.saved_tensors
        floor = ctx.min_sigma
        active = sigma >= floor
        with _profiler_range("lcnnify.spectral_norm.sigma_backward"):
            if torch.is_grad_enabled():  # double backward: the derivative of W / <W, G> itself
                with torch.no_grad():
                    G = ctx.op.weight_grad(v, u, w.detach())
                s = torch.where(active, (w * G).sum(), torch.full_like(sigma, floor))
                c = torch.where(active, (g * w).sum() / s, torch.zeros_like(sigma))
                return (g - c * G) / s, None, None, None, None, None, None, None
            inv = sigma.clamp_min(floor).reciprocal()
            if g.is_contiguous() and w.is_contiguous():
                gw = torch.dot(g.view(-1), w.view(-1))
            else:
                gw = (g * w).sum()
            c = torch.where(active, gw * inv, torch.zeros_like(sigma))
            axpby = getattr(ctx.op, "axpby_weight_grad", None)
            if axpby is None:  # a LinearOperator with weight_grad only
                out = ctx.op.weight_grad(v, u, w).mul_(-c * inv).addcmul_(g, inv)
            else:
                scratch = ctx.scratch
                out = axpby(g, inv, v, u, -c * inv, ctx.cols,
                            None if scratch is None else (lambda: scratch.take("grad", g)))
            return out, None, None, None, None, None, None, None


@dataclass
class _Converged:
    """Eval-mode cache: the weight converged on (a copy), and sigma, v, u for it."""

    op: object
    weight: Tensor
    sigma: Tensor
    v: Tensor
    u: Tensor


# ---------------------------------------------------------------------------------------------- the layer
class SpectralNormBase(nn.Module):
    """Parametrization ``W -> W / max(sigma, min_sigma)``, sigma = ||A_W||_2 for a linear operator ``A_W``
    given by the subclass (:meth:`_make_op`). Modes, zero weights and inference_mode: see the module docstring.

    Buffers ``u`` (shape ``(1, *output_shape)``) and ``v`` (``(1, *input_shape)``) hold the training-mode power
    iteration (empty while the input shape is unknown). ``sigma`` is the last estimate of ||A_W|| used.
    """

    def __init__(self, weight: Tensor, *, n_power_iterations: int = 1, warmup_iterations: int = 15,
                 eps: float = 1e-12, min_sigma: float = DEFAULT_MIN_SIGMA, eval_rtol: float = _EVAL_RTOL) -> None:
        super().__init__()
        if n_power_iterations < 0 or warmup_iterations < 0:
            raise ValueError(f"{type(self).__name__}: n_power_iterations and warmup_iterations must be >= 0")
        if not (min_sigma > 0 and math.isfinite(min_sigma)) or not eps > 0 or not eval_rtol > 0:
            raise ValueError(f"{type(self).__name__}: min_sigma, eps and eval_rtol must be > 0")
        self.n_power_iterations = int(n_power_iterations)
        self.warmup_iterations = int(warmup_iterations)
        self.eps = float(eps)
        self.min_sigma = float(min_sigma)
        self.eval_rtol = float(eval_rtol)
        kw = dict(dtype=_compute_dtype(weight.dtype), device=weight.device)
        self.register_buffer("u", torch.empty(0, **kw))
        self.register_buffer("v", torch.empty(0, **kw))
        self.__dict__["_last_sigma"] = torch.tensor(math.nan, **kw)  # plain attribute: cheap to update
        self._op: LinearOperator | None = None
        self.__dict__["_scratch"] = _Scratch()  # plain attribute (not a buffer: never saved)

    def train(self, mode: bool = True) -> "SpectralNormBase":
        if not mode:  # the reused training-step memory is only used in training mode: give it back
            scratch = self.__dict__.get("_scratch")
            if scratch is not None:
                scratch.clear()
        return super().train(mode)

    # ------------------------------------------------------------------ subclass API
    def _make_op(self, input_shape: tuple[int, ...]) -> LinearOperator:
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """Shape (without batch) of the input the operator norm refers to; None until known."""
        return None if self._op is None else self._op.input_shape

    @property
    def output_shape(self) -> tuple[int, ...] | None:
        return None if self._op is None else self._op.output_shape

    @property
    def operator(self) -> LinearOperator | None:
        """The operator ``A_W`` (forward / adjoint / weight_grad) for the current input shape, or None."""
        return self._op

    @property
    def sigma(self) -> Tensor:
        """Last estimate of ||A_W||_2 of the raw weight (detached scalar; NaN while the shape is unknown)."""
        return self._last_sigma

    @torch.compiler.disable
    def reset(self, input_shape: Sequence[int], weight: Tensor) -> None:
        """Set the input shape, re-initialise v randomly and warm up u, v (at least ``warmup_iterations``
        Lanczos steps, no grad). Safe inside ``torch.inference_mode()``."""
        op = self._make_op(tuple(int(s) for s in input_shape))
        cd = _compute_dtype(weight.dtype)
        with _normal_tensors(), torch.no_grad(), _no_autocast(weight.device.type):
            w = _prepare(op, weight.detach().to(cd))
            v0 = torch.randn((1, *op.input_shape), dtype=cd, device=w.device)
            k = self.warmup_iterations
            v = _top_right_singular_vector(op, w, v0, min_steps=k, max_steps=_WARMUP_MAX_FACTOR * k,
                                           rtol=_WARMUP_RTOL, eps=self.eps)
            av = op.forward(v, w)
            sigma = torch.linalg.vector_norm(av)
            u = _unit_or(av, _seed_vector(av.shape, cd, w.device), self.eps, sigma)
            bd = self.v.dtype if self.v.is_floating_point() else cd
            self._op = op
            self.u = u.to(bd)
            self.v = v.to(bd)
        self.__dict__["_last_sigma"] = sigma
        self.__dict__.pop("_converged", None)

    def _reseed_collapsed(self) -> None:
        """Replace a zero u or v (e.g. from a checkpoint of a collapsed iteration) by the fixed seed vector."""
        with _normal_tensors(), torch.no_grad():
            for name in ("u", "v"):
                t = getattr(self, name)
                if t.numel() and not bool(torch.linalg.vector_norm(t.float()) > self.eps):
                    t.copy_(_seed_vector(t.shape, t.dtype, t.device))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        # Like torch's lazy modules: adopt the checkpoint's buffer shapes (u, v are shaped lazily).
        for name in ("u", "v"):
            key = prefix + name
            if key in state_dict:
                src, cur = state_dict[key], getattr(self, name)
                if tuple(src.shape) != tuple(cur.shape):
                    setattr(self, name, torch.empty(src.shape, dtype=cur.dtype, device=cur.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self.__dict__.pop("_converged", None)
        try:
            self._op = None if self.v.numel() == 0 else self._make_op(tuple(self.v.shape[1:]))
        except ValueError as e:
            error_msgs.append(f"{prefix}v: {e}")
            return
        if self._op is not None and tuple(self.u.shape[1:]) != tuple(self._op.output_shape):
            error_msgs.append(f"{prefix}u has shape {tuple(self.u.shape)} but the operator maps "
                              f"{self._op.input_shape} to {self._op.output_shape}")
            return
        self._reseed_collapsed()

    # ------------------------------------------------------------------ estimates
    def _power_step(self, op: LinearOperator, w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Training: ``n_power_iterations`` iterations from the buffers (no grad), written back to them.
        Returns sigma, v, u and the operator's im2col matrix of v (or None) for the backward."""
        with torch.no_grad():
            cd = w.dtype
            u_buf, v_buf = self.u, self.v
            u = u_buf if u_buf.dtype == cd else u_buf.to(cd)
            v = v_buf if v_buf.dtype == cd else v_buf.to(cd)
            w = _prepare(op, w)
            fwd = getattr(op, "forward_and_cols", None)
            if fwd is None:
                def fwd(x: Tensor, w: Tensor) -> tuple[Tensor, None]:
                    return op.forward(x, w), None
            if self.n_power_iterations == 0:  # fixed v: sigma = ||A v||, nothing stored
                av, cols = fwd(v, w)
                sigma = torch.linalg.vector_norm(av)
                return sigma, v, _unit_or(av, u, self.eps, sigma), cols
            for _ in range(self.n_power_iterations):
                v = _unit_or(op.adjoint(u, w), v, self.eps)
                av, cols = fwd(v, w)
                sigma = torch.linalg.vector_norm(av)
                u = _unit_or(av, u, self.eps, sigma)
            u_buf.copy_(u)
            v_buf.copy_(v)
        return sigma, v, u, cols

    @torch.compiler.disable  # data-dependent (cache test, Lanczos stopping rule): runs eagerly under compile
    def _converged_state(self, op: LinearOperator, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Eval: sigma, v, u converged for this weight (cached until the weight's value changes)."""
        c: _Converged | None = self.__dict__.get("_converged")
        if c is not None and c.op is op and c.weight.shape == w.shape and c.weight.dtype == w.dtype \
                and c.weight.device == w.device and torch.equal(c.weight, w):
            return c.sigma, c.v, c.u
        with torch.no_grad():
            cd = w.dtype
            v0 = self.v if self.v.dtype == cd else self.v.to(cd)
            # half a fixed pseudo-random vector: a stale v can miss the new top direction almost entirely (e.g. a
            # grouped or circular conv, whose operator is block diagonal), and the Ritz residual test cannot
            # tell a converged lower eigenvalue from the top one; the random half makes this as unlikely as in a
            # fresh warm-up, the stale half keeps the warm start
            v0 = _normalize(v0, self.eps)
            v0 = _unit_or(v0 + _seed_vector(v0.shape, cd, w.device), v0, self.eps)
            v = _top_right_singular_vector(op, _prepare(op, w), v0, min_steps=_EVAL_MIN_STEPS,
                                           max_steps=_EVAL_MAX_STEPS, rtol=self.eval_rtol, eps=self.eps,
                                           cycles=_EVAL_CYCLES)
            av = op.forward(v, w)
            sigma = torch.linalg.vector_norm(av)
            groups = int(getattr(getattr(op, "geometry", None), "groups", 1))
            if groups > 1 and _EVAL_MAX_STEPS * v.numel() * v.element_size() <= _LANCZOS_MEMORY_CAP:
                # the whole-operator Lanczos may have converged to another group's top eigenpair
                vg = _grouped_top_right_singular_vector(op, _prepare(op, w), v0, groups, steps=_EVAL_MAX_STEPS,
                                                        eps=self.eps)
                avg = op.forward(vg, w)
                sigma_g = torch.linalg.vector_norm(avg)
                if sigma_g > sigma:
                    v, av, sigma = vg, avg, sigma_g
            u = self.u if self.u.dtype == cd else self.u.to(cd)
            u = _unit_or(av, u, self.eps, sigma)
            self.__dict__["_converged"] = _Converged(op, w.clone(), sigma, v, u)
        return sigma, v, u

    @torch.no_grad()
    def converge(self, weight: Tensor) -> Tensor:
        """Converge the estimate for ``weight`` (the tensor entering this parametrization) as eval mode does, and
        return sigma. No-op (NaN) while the input shape is unknown."""
        if self._op is None:
            return self._last_sigma
        with _normal_tensors(), _no_autocast(weight.device.type):
            w = weight.detach().to(_compute_dtype(weight.dtype))
            sigma = self._converged_state(self._op, w)[0]
        self.__dict__["_last_sigma"] = sigma
        return sigma

    # ------------------------------------------------------------------ forward
    def forward(self, weight: Tensor) -> Tensor:
        op = self._op
        if op is None:
            return weight
        needs_graph = torch.is_grad_enabled() and weight.requires_grad
        with _normal_tensors(), _no_autocast(weight.device.type):
            cd = _compute_dtype(weight.dtype)
            w = weight if weight.dtype == cd else weight.to(cd)
            cols = None
            if self.training:
                self.__dict__.pop("_converged", None)  # the weight is about to change: free the copy
                with _profiler_range("lcnnify.spectral_norm.power_iteration"):
                    sigma, v, u, cols = self._power_step(op, w.detach())
            else:
                sigma, v, u = self._converged_state(op, w.detach())
            with _profiler_range("lcnnify.spectral_norm.sigma"):
                if needs_graph:
                    scratch = None
                    if self.training and _REUSE_MEMORY and w.device.type == "cpu" \
                            and w.numel() * w.element_size() >= _REUSE_MIN_BYTES \
                            and not torch.compiler.is_compiling():
                        scratch = self.__dict__.get("_scratch")
                        if scratch is None:  # a layer pickled before the scratch existed
                            scratch = self.__dict__["_scratch"] = _Scratch()
                    out = _SpectralNormalize.apply(w, sigma, v, u, op, self.min_sigma, cols, scratch)
                else:
                    with torch.no_grad():
                        out = w / sigma.clamp_min(self.min_sigma)
        self.__dict__["_last_sigma"] = sigma
        return out if out.dtype == weight.dtype else out.to(weight.dtype)

    def extra_repr(self) -> str:
        return (f"input_shape={self.input_shape}, n_power_iterations={self.n_power_iterations}, "
                f"warmup_iterations={self.warmup_iterations}, min_sigma={self.min_sigma:g}")


class ConvSpectralNorm(SpectralNormBase):
    r"""Parametrization ``W -> W / max(||A_W||_2, min_sigma)`` for convolutions ("real" spectral norm; §3.4.1).

    ``A_W`` is the convolution (without bias, with the layer's stride, padding, padding_mode, dilation and
    groups; see :class:`~lcnnify.nn.ConvGeometry`) acting on one input of shape ``input_shape = (C, *spatial)``,
    learned by a forward pre-hook at the first forward (or given at registration); while it is unknown the
    weight is returned unnormalized and ``sigma`` is NaN. ``u`` has shape ``(1, C_out, *out_spatial)``, ``v``
    ``(1, C, *spatial)``. Modes, zero weights, inference_mode: see :mod:`lcnnify.nn.spectral_norm`.
    Register it with :func:`conv_spectral_norm`.
    """

    def __init__(self, conv: nn.Module, input_shape: Sequence[int] | None = None, n_power_iterations: int = 1,
                 warmup_iterations: int = 15, eps: float = 1e-12, min_sigma: float = DEFAULT_MIN_SIGMA,
                 eval_rtol: float = _EVAL_RTOL) -> None:
        geometry = ConvGeometry.from_conv(conv)
        super().__init__(conv.weight, n_power_iterations=n_power_iterations, warmup_iterations=warmup_iterations,
                         eps=eps, min_sigma=min_sigma, eval_rtol=eval_rtol)
        self.geometry = geometry
        self._warned = False
        if input_shape is not None:
            self.reset(tuple(input_shape), conv.weight)

    @property
    def _geometry(self) -> ConvGeometry:  # former name
        return self.geometry

    def _make_op(self, input_shape: tuple[int, ...]) -> ConvOperator:
        return ConvOperator(self.geometry, input_shape)


def find_spectral_norm(module: nn.Module) -> SpectralNormBase | None:
    """The lcnnify spectral normalization (conv or linear) registered on ``module.weight``, or None."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations["weight"]:
        if isinstance(p, SpectralNormBase):
            return p
    return None


def find_conv_spectral_norm(module: nn.Module) -> ConvSpectralNorm | None:
    """The ConvSpectralNorm registered on ``module.weight``, or None."""
    sn = find_spectral_norm(module)
    return sn if isinstance(sn, ConvSpectralNorm) else None


def _conv_sn_pre_hook(module: nn.Module, args) -> None:
    """Learn the input shape at forward time; re-initialise (+ warm up) on a new shape."""
    sn = find_conv_spectral_norm(module)
    if sn is None or not args:
        return
    x = args[0]
    if not isinstance(x, Tensor):
        return
    nd = sn.geometry.ndim
    if x.dim() == nd + 2:
        shape = tuple(x.shape[1:])
    elif x.dim() == nd + 1:
        shape = tuple(x.shape)
    else:
        return  # let the conv raise its own error
    op = sn._op
    if op is not None and shape == op.input_shape:
        return
    if op is not None and not sn._warned:
        sn._warned = True
        warnings.warn(
            f"spectrally normalized {type(module).__name__} saw input shape {shape} instead of "
            f"{op.input_shape}: power iteration re-initialised ({sn.warmup_iterations} warm-up iterations); "
            f"sigma now refers to the new shape (warned once per layer)", ShapeChangeWarning, stacklevel=3)
    sn.reset(shape, weight_before(module, sn))


def weight_before(module: nn.Module, sn: nn.Module) -> Tensor:
    """The tensor that enters ``sn`` in the weight's parametrization chain (e.g. after a weight
    standardization)."""
    plist = module.parametrizations["weight"]
    w = plist.original
    for p in plist:
        if p is sn:
            break
        w = p(w)
    return w


_weight_before = weight_before  # former name


def _has_torch_spectral_norm(module: nn.Module) -> bool:
    from torch.nn.utils.parametrizations import _SpectralNorm
    if parametrize.is_parametrized(module, "weight"):
        if any(isinstance(p, _SpectralNorm) for p in module.parametrizations["weight"]):
            return True
    from torch.nn.utils.spectral_norm import SpectralNorm as _OldSN
    return any(isinstance(h, _OldSN) for h in module._forward_pre_hooks.values())


def _refuse_double(module: nn.Module, fn: str) -> None:
    if find_spectral_norm(module) is not None or _has_torch_spectral_norm(module):
        raise ConversionError(
            f"{fn}: this {type(module).__name__} already has a spectral normalization on its weight; "
            f"fix: do not convert twice (check lcnnify.nn.is_lcnn_layer first)")


def conv_spectral_norm(conv: nn.Module, *, input_shape: Sequence[int] | None = None, n_power_iterations: int = 1,
                       warmup_iterations: int = 15, eps: float = 1e-12,
                       min_sigma: float = DEFAULT_MIN_SIGMA) -> nn.Module:
    """Register :class:`ConvSpectralNorm` on ``conv.weight`` (in place) and return ``conv``.

    Afterwards ``conv.weight`` is ``W / ||A_W||_2``; the raw weight is
    ``conv.parametrizations.weight.original`` and ``parametrize.remove_parametrizations(conv, "weight")``
    bakes the normalized weight. ``input_shape = (C, *spatial)`` (no batch); if None it is learned at the first
    forward. Raises ConversionError for non-conv modules and for an already normalized conv.
    """
    ConvGeometry.from_conv(conv)  # validates the module type first
    _refuse_double(conv, "conv_spectral_norm")
    sn = ConvSpectralNorm(conv, input_shape=input_shape, n_power_iterations=n_power_iterations,
                          warmup_iterations=warmup_iterations, eps=eps, min_sigma=min_sigma)
    parametrize.register_parametrization(conv, "weight", sn)
    if not any(h is _conv_sn_pre_hook for h in conv._forward_pre_hooks.values()):
        conv.register_forward_pre_hook(_conv_sn_pre_hook)
    return conv


@torch.no_grad()
def conv_operator_norm(conv: nn.Module, input_shape: Sequence[int] | None = None, *, n_iterations: int = 50,
                       eps: float = 1e-12, generator: torch.Generator | None = None) -> Tensor:
    """Lanczos estimate (from below) of the operator norm of ``conv`` (its current, possibly normalized,
    weight; no bias) on inputs of shape ``input_shape`` (default: the shape its ConvSpectralNorm knows).
    Computed in float64 from a fresh random start, independent of the layer's buffers."""
    sn = find_conv_spectral_norm(conv)
    if input_shape is None:
        if sn is None or sn.input_shape is None:
            raise ValueError("conv_operator_norm: input_shape unknown; pass input_shape=(C, *spatial)")
        input_shape = sn.input_shape
    geometry = sn.geometry if sn is not None else ConvGeometry.from_conv(conv)
    op = ConvOperator(geometry, tuple(input_shape))
    w = conv.weight.detach().to(torch.float64)
    v = torch.randn((1, *op.input_shape), dtype=torch.float64, device=w.device, generator=generator)
    v0 = v
    v = _top_right_singular_vector(op, w, v0, min_steps=min(n_iterations, 15), max_steps=n_iterations, rtol=1e-6,
                                   eps=eps)
    sigma = torch.linalg.vector_norm(op.forward(v, w))
    if geometry.groups > 1:  # block diagonal: the largest over the groups' own Lanczos runs
        vg = _grouped_top_right_singular_vector(op, w, v0, geometry.groups, steps=n_iterations, eps=eps)
        sigma = torch.maximum(sigma, torch.linalg.vector_norm(op.forward(vg, w)))
    return sigma
