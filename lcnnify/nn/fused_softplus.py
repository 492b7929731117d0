"""Optional compiled (torch.compile / inductor) kernels for :class:`~lcnnify.nn.CenteredSoftplus`.

The eager implementation runs each element-wise step of the centered softplus as its own pass over memory.
A compiler fuses them into one loop per direction (forward: s0 from x; backward: ds0/dx and the beta-gradient
sum from the saved output), with the same formulas (:func:`~lcnnify.nn.centered_softplus._forward_graph`,
``_slope_terms``, ``_q2_graph``), so the accuracy guarantees carry over up to the compiler's reordering
(a few ulp).

Opt-in, never required::

    from lcnnify.nn.fused_softplus import enable_fused_kernels
    enable_fused_kernels()          # True if the kernels compiled, else False (with a warning)

Used only where it applies: float32, a single (scalar) beta, a contiguous or channels-last input of at
least ``min_numel`` elements, first-order backward (in-place activations are computed in place). Everything else (per-channel beta, float64/bfloat16, double backward under
``create_graph``, tracing by an outer ``torch.compile``) takes the exact eager path. If the compiler is
missing or fails (no C++ compiler, unsupported platform), the kernels are switched off with a warning and
the eager path is used; nothing else changes.

The first call compiles (tens of seconds cold, cached afterwards by inductor). The kernels are compiled for
1-D inputs with a dynamic length (every activation shape shares them) and warmed up on a large tensor, so
that inductor generates its multi-threaded variant.
"""
from __future__ import annotations

import importlib
import warnings
from typing import Callable

import torch
from torch import Tensor

from ..errors import LCNNWarning

_csp = importlib.import_module(".centered_softplus", __package__)  # the module, not the function

__all__ = ["enable_fused_kernels", "disable_fused_kernels", "fused_kernels_enabled"]


def _fwd(x: Tensor, beta: Tensor) -> Tensor:
    return _csp._forward_graph(x, beta)


def _fwd_inplace(x: Tensor, beta: Tensor) -> None:
    x.copy_(_csp._forward_graph(x, beta))  # the compiler writes the result straight into x


def _flat(t: Tensor) -> Tensor | None:
    """A 1-D view of t's elements in memory order (contiguous or channels-last), else None."""
    if t.is_contiguous():
        return t.view(-1)
    for fmt, perm in ((torch.channels_last, (0, 2, 3, 1)), (torch.channels_last_3d, (0, 2, 3, 4, 1))):
        if t.dim() == len(perm) and t.is_contiguous(memory_format=fmt):
            return t.permute(perm).reshape(-1)  # a view: the permuted tensor is contiguous
    return None


def _unflat(flat: Tensor, like: Tensor) -> Tensor:
    """flat (from :func:`_flat` of a tensor laid out like ``like``) viewed with like's shape and strides."""
    return flat.as_strided(like.shape, like.stride())


def _bwd_x(y: Tensor, beta: Tensor, g: Tensor) -> Tensor:
    _, e = _csp._slope_terms(y, beta)
    return g * (1.0 - 0.5 * e)


def _bwd_b(y: Tensor, beta: Tensor, g: Tensor) -> Tensor:
    z, e = _csp._slope_terms(y, beta)
    return (g * _csp._q2_graph(z, e)).sum() / (2.0 * beta * beta)


def _bwd_xb(y: Tensor, beta: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    z, e = _csp._slope_terms(y, beta)
    return g * (1.0 - 0.5 * e), (g * _csp._q2_graph(z, e)).sum() / (2.0 * beta * beta)


class _FusedKernels:
    """The compiled kernels and the rule for when they apply (the object behind ``_csp._FUSED``)."""

    def __init__(self, compile_fn: Callable, min_numel: int) -> None:
        opts = dict(dynamic=True, fullgraph=True)
        self.fwd = compile_fn(_fwd, **opts)
        self.fwd_inplace = compile_fn(_fwd_inplace, **opts)
        self.bwd = {(True, False): compile_fn(_bwd_x, **opts), (False, True): compile_fn(_bwd_b, **opts),
                    (True, True): compile_fn(_bwd_xb, **opts)}
        self.min_numel = int(min_numel)

    def applies(self, t: Tensor, beta: Tensor) -> bool:
        return (t.dtype == torch.float32 and beta.numel() == 1 and t.numel() >= self.min_numel
                and not torch.compiler.is_compiling() and _flat(t) is not None)

    def forward(self, x: Tensor, beta: Tensor, inplace: bool = False) -> Tensor | None:
        """s0(x; beta) (written over x if ``inplace``), or None where the kernels do not apply."""
        if not self.applies(x, beta):
            return None
        b = beta.detach().reshape(())
        xf = _flat(x.detach())

        def run():
            if inplace:
                self.fwd_inplace(xf, b)
                return x
            return _unflat(self.fwd(xf, b), x)

        return self._guarded(run)

    def backward(self, y: Tensor, beta: Tensor, grad: Tensor, need_x: bool, need_b: bool):
        if not (need_x or need_b) or not self.applies(y, beta):
            return None
        fmt = torch.contiguous_format if y.is_contiguous() else (
            torch.channels_last if y.dim() == 4 else torch.channels_last_3d)
        g = _flat(grad.contiguous(memory_format=fmt))
        b = beta.detach().reshape(())

        def run():
            out = self.bwd[(need_x, need_b)](_flat(y.detach()), b, g)
            if need_x and need_b:
                return _unflat(out[0], y), out[1].reshape(beta.shape)
            if need_x:
                return _unflat(out, y), None
            return None, out.reshape(beta.shape)

        return self._guarded(run)

    def warm_up(self) -> None:
        x = torch.randn(1 << 20) * 3.0
        b = torch.tensor(2.0)
        y = self.fwd(x, b)
        self.fwd_inplace(x.clone(), b)
        for fn in self.bwd.values():
            fn(y, b, torch.randn(1 << 20))

    def _guarded(self, run: Callable):
        try:
            return run()
        except Exception as exc:  # a missing / failing compiler: fall back to the eager path for good
            disable_fused_kernels()
            warnings.warn(f"lcnnify.nn.fused_softplus: compiled centered-softplus kernels failed "
                          f"({type(exc).__name__}: {exc}); using the eager implementation", LCNNWarning,
                          stacklevel=3)
            return None


_BUILT: dict[Callable, _FusedKernels] = {}


def enable_fused_kernels(*, min_numel: int = 1 << 16, warm_up: bool = True,
                         compile_fn: Callable | None = None) -> bool:
    """Use compiled, fused kernels for float32 scalar-beta centered softplus (forward and first-order backward).

    Args:
        min_numel: smaller tensors keep the eager path (the launch overhead would dominate).
        warm_up: compile now, on a large tensor (so the multi-threaded kernels are the ones cached).
        compile_fn: the compiler (default ``torch.compile``).

    Returns True if the kernels are in use; False (with a warning) if compiling failed, in which case the
    eager implementation stays in use.
    """
    compile_fn = compile_fn or torch.compile
    kernels = _BUILT.get(compile_fn)  # the same compiled objects each time: no recompilation
    if kernels is None:
        kernels = _BUILT[compile_fn] = _FusedKernels(compile_fn, min_numel)
    kernels.min_numel = int(min_numel)
    if warm_up:
        try:
            kernels.warm_up()
        except Exception as exc:
            warnings.warn(f"lcnnify.nn.fused_softplus: cannot compile the centered-softplus kernels "
                          f"({type(exc).__name__}: {exc}); using the eager implementation", LCNNWarning,
                          stacklevel=2)
            disable_fused_kernels()
            _BUILT.pop(compile_fn, None)
            return False
    _csp._FUSED = kernels
    return True


def disable_fused_kernels() -> None:
    """Back to the eager implementation (the default)."""
    _csp._FUSED = None


def fused_kernels_enabled() -> bool:
    return _csp._FUSED is not None
