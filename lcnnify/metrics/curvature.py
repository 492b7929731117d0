"""Per-sample input geometry of a classifier's loss (paper §3.1).

For a classifier ``model`` (inputs -> logits) and a labelled input ``(x, y)`` let
``f(x) = cross_entropy(model(x), y)`` (post-softmax loss, as in the paper). This module measures, per sample,

* ``grad_norm``     = ||grad_x f(x)||_2 (exact, one backward pass),
* ``hessian_norm``  = ||Hess_x f(x)||_2, the spectral norm (largest |eigenvalue|) of the input Hessian,
* ``curvature``     = hessian_norm / (grad_norm + eps), the paper's normalized curvature C_f(x).

How the Hessian norm is estimated
---------------------------------
In eval mode the samples of a batch do not interact, so the input Hessian of the *summed* loss is block
diagonal with the per-sample Hessians ``H_i`` as blocks.  One Hessian-vector product of the summed loss with a
batch of per-sample vectors ``V = (v_1, ..., v_B)`` therefore returns ``(H_1 v_1, ..., H_B v_B)``: every
sample's product at the cost of one batched double backward.

The products are computed by double backward through a retained graph (``autograd.grad`` of ``<grad, v>``)
rather than with ``torch.func`` (forward-over-reverse ``jvp`` of ``grad``, or reverse-over-reverse): it reuses
one graph for all ``iters`` products, and it is the most widely supported path (custom autograd Functions need
only a differentiable backward).

The input Hessian of the cross-entropy is usually *indefinite*, often with eigenvalue pairs of almost equal
magnitude and opposite sign.  Plain power iteration then oscillates between the two eigenvectors and its
Rayleigh quotient ``|u'Hu|`` (what the paper's reference code reports) underestimates ``||H||`` badly.
The default estimator is **batched Lanczos with full reorthogonalisation**: ``iters`` Hessian-vector products
build, per sample, an orthonormal Krylov basis ``Q_k`` and the extended tridiagonal matrix ``T~`` with
``H Q_k = Q_{k+1} T~``; the estimate is the largest singular value of ``T~`` (= ||H Q_k||_2), which is at
least the largest |Ritz value| and never more than ||H||.  Lanczos converges to *both* ends of the spectrum
at once, so sign-symmetric spectra are no problem.  ``method="power"`` reproduces the paper's estimator
(power iteration + ``|u'Hu|``) with the same number of Hessian-vector products, for comparison.

The Lanczos/power start vectors are drawn per sample, from ``generator`` (default: a fresh generator seeded
with 0, so results are deterministic and the global RNG is untouched), for the whole call at once, so the
chunking does not change the result.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lcnnify._utils import model_device, modes_preserved
from lcnnify.errors import MeasurementError

__all__ = ["CurvatureStats", "curvature", "DEFAULT_CHUNK_SIZE"]

#: Samples per batched Hessian-vector product when ``chunk_size`` is None. Memory of one chunk is about
#: ``(iters + 3) * chunk_size * numel(one input)`` floats plus the retained double-backward graph.
DEFAULT_CHUNK_SIZE = 64

_METHODS = ("lanczos", "power")


# ---------------------------------------------------------------------------------------------------------
# shared helpers (also used by robustness.py and geometry.py)
# ---------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _measurement_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, no parameter gradients, autograd on; everything restored afterwards.

    Restores each submodule's ``training`` flag individually (mixed modes survive), each parameter's
    ``requires_grad`` and its ``.grad`` tensor (the same object).
    """
    if not isinstance(model, nn.Module):
        raise MeasurementError(
            f"lcnnify.metrics: model must be a torch.nn.Module (inputs -> logits), got {type(model).__name__}"
        )
    params = list(model.parameters())
    requires = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    try:
        with modes_preserved(model, training=False):
            for p in params:
                p.requires_grad_(False)
            with torch.enable_grad():
                yield
    finally:
        for p, r, g in zip(params, requires, grads):
            p.requires_grad_(r)
            p.grad = g


def _check_scalar(name: str, value: Any, *, fn: str, minimum: float = 0.0, strict: bool = False) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise MeasurementError(f"lcnnify.metrics.{fn}: {name} must be a number, got a tensor of shape "
                                   f"{tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MeasurementError(f"lcnnify.metrics.{fn}: {name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise MeasurementError(f"lcnnify.metrics.{fn}: {name} must be finite, got {value}")
    if value < minimum or (strict and value == minimum):
        op = ">" if strict else ">="
        raise MeasurementError(f"lcnnify.metrics.{fn}: {name} must be {op} {minimum:g}, got {value:g}")
    return value


def _check_int(name: str, value: Any, *, fn: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise MeasurementError(f"lcnnify.metrics.{fn}: {name} must be an int, got {value!r}")
    if value < minimum:
        raise MeasurementError(f"lcnnify.metrics.{fn}: {name} must be >= {minimum}, got {value}")
    return int(value)


def _check_xy(model: nn.Module, x: Any, y: Any, *, fn: str) -> tuple[Tensor, Tensor]:
    """Validate a batch and move it to the model's device. Label range is checked after the forward."""
    if not isinstance(x, Tensor):
        raise MeasurementError(f"lcnnify.metrics.{fn}: x must be a torch.Tensor of shape (N, ...), "
                               f"got {type(x).__name__}")
    if not x.is_floating_point():
        raise MeasurementError(f"lcnnify.metrics.{fn}: x must be a floating point tensor, got dtype {x.dtype}")
    if x.ndim < 2:
        raise MeasurementError(
            f"lcnnify.metrics.{fn}: x must be batched, shape (N, ...) with at least 2 dims, got shape "
            f"{tuple(x.shape)}; for a single sample use x.unsqueeze(0)")
    if x.shape[0] == 0:
        raise MeasurementError(f"lcnnify.metrics.{fn}: x is an empty batch (shape {tuple(x.shape)})")
    if not isinstance(y, Tensor):
        try:
            y = torch.as_tensor(y)
        except Exception as exc:  # noqa: BLE001
            raise MeasurementError(f"lcnnify.metrics.{fn}: y must be a tensor of integer class labels, "
                                   f"got {type(y).__name__}") from exc
    if y.dtype == torch.bool or y.is_floating_point() or y.is_complex():
        raise MeasurementError(f"lcnnify.metrics.{fn}: y must hold integer class labels (dtype long), "
                               f"got dtype {y.dtype}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise MeasurementError(
            f"lcnnify.metrics.{fn}: y must have shape (N,) = ({x.shape[0]},) to match x of shape "
            f"{tuple(x.shape)}, got shape {tuple(y.shape)} (one class index per sample, not one-hot)")
    bad = ~torch.isfinite(x.detach()).reshape(x.shape[0], -1).all(dim=1)
    if bool(bad.any()):
        idx = bad.nonzero().flatten()[:10].tolist()
        raise MeasurementError(f"lcnnify.metrics.{fn}: x contains NaN or inf values (samples {idx}"
                               f"{'...' if int(bad.sum()) > 10 else ''})")
    if int(y.min()) < 0:
        raise MeasurementError(f"lcnnify.metrics.{fn}: labels must be >= 0, got min label {int(y.min())}")
    device = model_device(model, default=x.device)
    return x.detach().to(device), y.detach().to(device=device, dtype=torch.long)


def _check_logits(logits: Any, y: Tensor, *, fn: str) -> Tensor:
    if not isinstance(logits, Tensor):
        raise MeasurementError(
            f"lcnnify.metrics.{fn}: the model must return a logits tensor of shape (N, num_classes), got "
            f"{type(logits).__name__}; wrap the model so that forward(x) returns the logits")
    n = y.shape[0]
    if logits.ndim != 2 or logits.shape[0] != n or logits.shape[1] < 2:
        raise MeasurementError(
            f"lcnnify.metrics.{fn}: the model must return logits of shape (N, num_classes) = ({n}, C) with "
            f"C >= 2, got shape {tuple(logits.shape)}")
    c = logits.shape[1]
    if int(y.max()) >= c:
        raise MeasurementError(
            f"lcnnify.metrics.{fn}: labels out of range: max label {int(y.max())} but the model has {c} "
            f"classes (valid labels 0..{c - 1})")
    if not bool(torch.isfinite(logits.detach()).all()):
        raise MeasurementError(f"lcnnify.metrics.{fn}: the model produced NaN/inf logits")
    return logits


def _check_differentiable(loss: Tensor, fn: str) -> None:
    if not loss.requires_grad:
        raise MeasurementError(
            f"lcnnify.metrics.{fn}: the model's logits do not depend differentiably on its input (torch.no_grad "
            f"or .detach() inside forward?); input gradients and Hessians cannot be measured")


def _chunks(n: int, chunk_size: int) -> Iterator[slice]:
    for start in range(0, n, chunk_size):
        yield slice(start, min(n, start + chunk_size))


def _flat_norm(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).norm(dim=1)


def _start_vectors(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device,
                   dtype: torch.dtype) -> Tensor:
    """Unit-norm Gaussian rows of shape (N, d), drawn on the generator's device (CPU by default)."""
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    n, d = shape[0], math.prod(shape[1:])
    v = torch.randn(n, d, generator=generator, device=generator.device, dtype=torch.float64)
    v = v / v.norm(dim=1, keepdim=True)
    return v.to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------
# Hessian spectral-norm estimators (batched over samples; `hvp` maps (B, d) -> (B, d), row i -> H_i v_i)
# ---------------------------------------------------------------------------------------------------------
def _lanczos_spectral_norm(hvp, v0: Tensor, steps: int) -> Tensor:
    """Per-row ||H_i||_2 from ``steps`` Hessian-vector products (Lanczos, full reorthogonalisation).

    Returns sigma_max of the (k+1) x k extended tridiagonal matrix, i.e. ||H_i Q_k||_2 <= ||H_i||_2.
    A row whose Krylov space becomes invariant (beta ~ 0: small dimension, zero Hessian) stops there:
    its later basis vectors are zero, which adds only zero rows/columns to its matrix.
    """
    b, d = v0.shape
    k = max(1, min(steps, d))  # a Krylov space has at most d dimensions
    tol = 100.0 * torch.finfo(v0.dtype).eps
    q = v0.new_zeros(k + 1, b, d)
    q[0] = v0
    alpha = v0.new_zeros(b, k)
    beta = v0.new_zeros(b, k)
    scale = v0.new_zeros(b)
    for j in range(k):
        w = hvp(q[j])
        a = (w * q[j]).sum(dim=1)
        alpha[:, j] = a
        basis = q[: j + 1]
        for _ in range(2):  # classical Gram-Schmidt twice against the whole basis ("twice is enough")
            coeff = torch.einsum("jbd,bd->jb", basis, w)
            w = w - torch.einsum("jb,jbd->bd", coeff, basis)
        bj = w.norm(dim=1)
        scale = torch.maximum(scale, torch.maximum(a.abs(), bj))
        ok = bj > tol * scale
        beta[:, j] = torch.where(ok, bj, torch.zeros_like(bj))
        q[j + 1] = torch.where(ok[:, None], w / torch.where(ok, bj, torch.ones_like(bj))[:, None],
                               torch.zeros_like(w))
    t = torch.zeros(b, k + 1, k, dtype=torch.float64, device=v0.device)
    idx = torch.arange(k, device=v0.device)
    t[:, idx, idx] = alpha.double()
    t[:, idx + 1, idx] = beta.double()
    t[:, idx[:-1], idx[1:]] = beta[:, :-1].double()
    sigma = torch.linalg.svdvals(t)[:, 0]
    return sigma.to(v0.dtype)


def _power_rayleigh(hvp, v0: Tensor, steps: int) -> Tensor:
    """The paper's estimator (reference ``estimate_curvature.py``): power iteration u <- Hu / (||Hu|| + 1e-6),
    then |u'Hu| of the last iterate; ``steps`` Hessian-vector products in total (steps - 1 power steps)."""
    u = v0
    for _ in range(max(0, steps - 1)):
        hu = hvp(u)
        u = hu / (hu.norm(dim=1, keepdim=True) + 1e-6)
    return (hvp(u) * u).sum(dim=1).abs()


# ---------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------
@dataclass
class CurvatureStats:
    """Per-sample input geometry of the loss: 1-D tensors of length N (on the CPU, detached).

    Attributes:
        curvature: normalized curvature ||Hess f|| / (||grad f|| + eps) (paper §3.1).
        hessian_norm: spectral norm of the input Hessian of the cross-entropy loss.
        grad_norm: l2 norm of the input gradient of the cross-entropy loss.
    """

    curvature: Tensor
    hessian_norm: Tensor
    grad_norm: Tensor

    FIELDS = ("grad_norm", "hessian_norm", "curvature")

    def __len__(self) -> int:
        return int(self.curvature.shape[0])

    def summary(self) -> dict[str, dict[str, float]]:
        """``{quantity: {"mean": m, "std": s}}`` over the samples (std with Bessel correction; 0 for N = 1)."""
        out = {}
        for name in self.FIELDS:
            v = getattr(self, name).double()
            std = v.std().item() if v.numel() > 1 else 0.0
            out[name] = {"mean": v.mean().item(), "std": std}
        return out

    @classmethod
    def cat(cls, stats: list["CurvatureStats"]) -> "CurvatureStats":
        """Concatenate the samples of several ``CurvatureStats``."""
        if not stats:
            raise MeasurementError("lcnnify.metrics.CurvatureStats.cat: nothing to concatenate")
        return cls(*(torch.cat([getattr(s, f) for s in stats]) for f in ("curvature", "hessian_norm",
                                                                          "grad_norm")))


def _curvature_impl(model: nn.Module, x: Tensor, y: Tensor, *, iters: int, eps: float, chunk_size: int,
                    method: str, generator: torch.Generator | None, fn: str) -> tuple[CurvatureStats, Tensor]:
    """Inside ``_measurement_mode``; x, y validated and on the model's device. Returns (stats, correct)."""
    n = x.shape[0]
    # Lanczos bookkeeping in at least float32 (half-precision inputs keep their dtype in the model)
    work = torch.promote_types(x.dtype, torch.float32)
    v0_all = _start_vectors(tuple(x.shape), generator, x.device, work)
    hess, gnorm, correct = [], [], []
    for sl in _chunks(n, chunk_size):
        xc = x[sl].clone().requires_grad_(True)
        yc = y[sl]
        logits = _check_logits(model(xc), yc, fn=fn)
        loss = F.cross_entropy(logits, yc, reduction="sum")
        _check_differentiable(loss, fn)
        (g,) = torch.autograd.grad(loss, xc, create_graph=True)
        gnorm.append(_flat_norm(g.detach().to(work)))
        correct.append((logits.detach().argmax(dim=1) == yc).cpu())

        if g.requires_grad:
            def hvp(v: Tensor, g=g, xc=xc) -> Tensor:
                (hv,) = torch.autograd.grad(g, xc, grad_outputs=v.reshape(xc.shape).to(xc.dtype),
                                            retain_graph=True, allow_unused=True)
                if hv is None:
                    return torch.zeros_like(v)
                return hv.reshape(v.shape).detach().to(v.dtype)
        else:  # the gradient does not depend on x: the Hessian is zero
            def hvp(v: Tensor) -> Tensor:
                return torch.zeros_like(v)

        v0 = v0_all[sl]
        if method == "lanczos":
            h = _lanczos_spectral_norm(hvp, v0, iters)
        else:
            h = _power_rayleigh(hvp, v0, iters)
        hess.append(h.detach())
        del g, loss, logits, hvp
    hessian_norm = torch.cat(hess).cpu()
    grad_norm = torch.cat(gnorm).cpu()
    curv = hessian_norm / (grad_norm + eps)
    if eps == 0.0:  # 0/0 for samples with zero gradient and zero Hessian: no curvature, not NaN
        curv = torch.where((hessian_norm == 0) & (grad_norm == 0), torch.zeros_like(curv), curv)
    stats = CurvatureStats(curvature=curv.to(x.dtype), hessian_norm=hessian_norm.to(x.dtype),
                           grad_norm=grad_norm.to(x.dtype))
    return stats, torch.cat(correct)


def _check_curvature_args(iters: Any, eps: Any, chunk_size: Any, method: Any, fn: str) -> tuple[int, float, int]:
    iters = _check_int("iters", iters, fn=fn, minimum=1)
    eps = _check_scalar("eps", eps, fn=fn, minimum=0.0)
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_SIZE
    chunk_size = _check_int("chunk_size", chunk_size, fn=fn, minimum=1)
    if method not in _METHODS:
        raise MeasurementError(f"lcnnify.metrics.{fn}: method must be one of {_METHODS}, got {method!r}")
    return iters, eps, chunk_size


def curvature(model: nn.Module, x: Tensor, y: Tensor, *, iters: int = 20, eps: float = 1e-6,
              chunk_size: int | None = None, method: str = "lanczos",
              generator: torch.Generator | None = None) -> CurvatureStats:
    """Per-sample gradient norm, Hessian spectral norm and normalized curvature of the cross-entropy loss
    w.r.t. the input (paper §3.1): ``C(x) = ||Hess_x f|| / (||grad_x f|| + eps)``.

    Args:
        model: any classifier ``nn.Module`` mapping a batch (N, ...) to logits (N, C). Measured in eval mode;
            its modes, parameters' ``requires_grad`` and ``.grad`` are restored afterwards.
        x: inputs, shape (N, ...), finite floating point; moved to the model's device.
        y: integer class labels, shape (N,), in ``[0, C)``.
        iters: Hessian-vector products per sample (Lanczos steps; capped at the input dimension).
            At the default 20 the estimate is within 1% of the exact norm on small smooth models.
        eps: the ``eps >= 0`` of the normalized curvature. With ``eps = 0`` a sample with zero gradient and zero
            Hessian gets curvature 0 (not NaN).
        chunk_size: samples per batched Hessian-vector product (default ``DEFAULT_CHUNK_SIZE`` = 64); bounds
            the memory; does not change the result.
        method: ``"lanczos"`` (default; robust on indefinite Hessians) or ``"power"`` (the paper's power
            iteration with the Rayleigh quotient ``|u'Hu|``, same number of Hessian-vector products; it
            underestimates when the Hessian has eigenvalues of both signs with similar magnitude).
        generator: random source of the start vectors (default: a CPU generator seeded with 0).

    Returns:
        ``CurvatureStats`` of detached CPU tensors of shape (N,).

    Raises:
        MeasurementError: wrong shapes/dtypes, labels out of range, NaN/inf inputs or logits, eps < 0,
            iters < 1, or a model that does not return (N, C) logits.
    """
    iters, eps, chunk_size = _check_curvature_args(iters, eps, chunk_size, method, "curvature")
    with _measurement_mode(model):
        x, y = _check_xy(model, x, y, fn="curvature")
        stats, _ = _curvature_impl(model, x, y, iters=iters, eps=eps, chunk_size=chunk_size, method=method,
                                   generator=generator, fn="curvature")
    return stats


def _input_gradients(model: nn.Module, x: Tensor, y: Tensor, chunk_size: int, fn: str) -> Tensor:
    """Per-sample input gradients of the cross-entropy (inside ``_measurement_mode``; x, y validated)."""
    out = []
    for sl in _chunks(x.shape[0], chunk_size):
        xc = x[sl].clone().requires_grad_(True)
        logits = _check_logits(model(xc), y[sl], fn=fn)
        loss = F.cross_entropy(logits, y[sl], reduction="sum")
        _check_differentiable(loss, fn)
        (g,) = torch.autograd.grad(loss, xc, allow_unused=True)
        out.append(torch.zeros_like(xc) if g is None else g.detach())
    return torch.cat(out)
