""":func:`bound`: the entry point of the data-free bound (see :mod:`lcnnify.bounds`)."""
from __future__ import annotations

import math
import sys
import time
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .._utils import model_device, model_dtype, modes_preserved
from ..convert.trace import trace_module
from ..errors import MeasurementError
from ..nn.spectral_norm import find_conv_spectral_norm
from .propagate import BoundInterpreter, Context, ForwardFailed, static_reasons
from .result import Bound

__all__ = ["bound"]

_SQRT2 = math.sqrt(2.0)


class _SNHooksOff:
    """Temporarily detach the forward pre-hooks of spectrally normalized convs (the one that learns the input
    shape and re-initialises the power iteration at a new shape, and any other), so that analysing a shape never
    changes the model."""

    def __init__(self, model: nn.Module) -> None:
        self.saved: list[tuple[nn.Module, dict]] = []
        self.model = model

    def __enter__(self) -> "_SNHooksOff":
        for m in self.model.modules():
            if m._forward_pre_hooks and find_conv_spectral_norm(m) is not None:
                self.saved.append((m, m._forward_pre_hooks.copy()))
                m._forward_pre_hooks.clear()
        return self

    def __exit__(self, *exc: Any) -> None:
        for m, saved in self.saved:
            m._forward_pre_hooks.clear()
            m._forward_pre_hooks.update(saved)


def _normalize_shape(input_shape: Any) -> tuple[int, ...]:
    if isinstance(input_shape, torch.Tensor):
        return tuple(int(s) for s in input_shape.shape[1:])
    try:
        shape = tuple(int(s) for s in input_shape)
    except TypeError:
        raise MeasurementError(f"bound(): input_shape must be a sequence of ints (C, *spatial), without the "
                               f"batch dimension, got {input_shape!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise MeasurementError(f"bound(): input_shape must be non-empty positive ints, got {shape}")
    return shape


def _progress_bar(enabled: bool | None, total: int) -> Any:
    """A tqdm bar on stderr when ``enabled`` (None: only when stderr is a terminal)."""
    if enabled is None:
        enabled = bool(getattr(sys.stderr, "isatty", lambda: False)())
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except Exception:  # noqa: BLE001 - progress is optional
        return None
    return tqdm(total=total, desc="lcnnify.bound", unit="node", file=sys.stderr, leave=False)


def _fallback_reasons(model: nn.Module) -> list[str]:
    report = getattr(model, "lcnn_report", None)
    return [f"{getattr(fb, 'path', '') or '<root>'}: converted module by module, its own forward is not "
            f"analysed ({getattr(fb, 'reason', '')})" for fb in getattr(report, "fallbacks", ()) or ()]


def bound(model: nn.Module, input_shape: Any, *, certify: bool = True, dense_limit: int = 1024,
          rtol: float = 1e-2, power_iterations: int = 30, exact: bool = False, full: bool = False,
          progress: bool | None = None) -> Bound:
    """The data-free Lipschitz / curvature bound of ``model`` (eval mode) on inputs of shape ``input_shape``.

    The headline is ``Bound.loss_hessian`` >= sup_x ||Hess_x cross_entropy(f(x), y)||_2 (paper §3.2).

    Args:
        model: a converted model (the fx GraphModule ``lcnnify`` returns) or any ``nn.Module``: one that is
            not a GraphModule is traced with lcnnify's tracer; if that fails the bound is infinite, not
            certified, with the reason.
        input_shape: the shape of ONE input without the batch dimension, e.g. ``(3, 32, 32)`` (a batched
            example tensor is accepted too).
        certify: True: certified conv operator norms (circulant-embedding bound, or the exact dense norm of
            small operators); False: power-iteration estimates (``certified`` is then False).
        dense_limit: largest min(in, out) dimension of a conv whose exact (dense Gram) norm is computed when
            its circulant bound is more than ``rtol`` above the power estimate.
        rtol: see ``dense_limit``.
        power_iterations: iterations of the power estimates.
        exact: compute the exact dense norm of EVERY conv whose circulant bound is more than ``rtol`` above
            its estimate, whatever its size (the tightest certified bound; minutes on large models).
        full: propagate the bounds even when an op voids the guarantee (to see the finite Lipschitz bound and
            ``per_node`` of such a model). By default a model with a voiding op returns the infinite bound at
            once, with the reasons, without computing any operator norm.
        progress: show a progress bar on stderr (None: only when stderr is a terminal).

    Returns:
        :class:`Bound`. The model is not changed (mode, buffers and power-iteration state are restored);
        each analysed graph node gets ``node.meta["lcnnify_bound"] = (L, K)``.

    Raises:
        MeasurementError: the model does not run on inputs of ``input_shape``.
    """
    t0 = time.perf_counter()
    shape = _normalize_shape(input_shape)
    reasons: list[str] = _fallback_reasons(model)

    def infinite(why: list[str], notes: tuple[str, ...] = (), short: bool = False) -> Bound:
        return Bound(math.inf, math.inf, math.inf, math.inf, False, tuple(why), {}, notes, shape,
                     time.perf_counter() - t0, estimated=not certify, short_circuited=short)

    if isinstance(model, fx.GraphModule):
        gm = model
    else:
        try:
            gm = trace_module(model, training=False)
        except Exception as e:  # noqa: BLE001 - untraceable model: no bound
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            return infinite([f"<root> [{type(model).__name__}]: torch.fx cannot trace the model's forward "
                             f"({type(e).__name__}: {msg}); its ops are not analysed"] + reasons)

    example = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    example = example.to(dtype=model_dtype(model), device=model_device(model))
    with modes_preserved(model, training=False), _SNHooksOff(model):
        if not full:
            voids = static_reasons(gm)
            if voids or reasons:
                _check_runs(gm, example, shape)
                return infinite(voids + reasons, (
                    "an op voids the guarantee, so no operator norm was computed; bound(..., full=True) "
                    "computes the finite Lipschitz bound and the per-node values anyway",), short=True)
        bar = _progress_bar(progress, len(gm.graph.nodes))
        ctx = Context(bool(certify), int(1 << 62) if exact else int(dense_limit), float(rtol),
                      int(power_iterations), bar)
        try:
            out = BoundInterpreter(gm, ctx).analyse([example], [(1.0, 0.0)])
        except ForwardFailed as e:
            raise _shape_error(shape, e) from e
        finally:
            if bar is not None:
                bar.close()

    if out is None:
        L, K = 0.0, 0.0
        ctx.notes.append("the output does not depend on the input")
    else:
        L, K = out
    reasons = ctx.reasons + reasons
    if ctx.estimated:
        reasons.append("conv operator norms are power-iteration estimates (certify=False), which approach "
                       "the norm from below: the values are estimates, not bounds")
    theorem1, prod = 0.0, 1.0
    for a, nc, n in ctx.chain:
        prod = 0.0 if prod == 0.0 or a == 0.0 else prod * a
        term = 0.0 if n == 0 or nc == 0.0 or prod == 0.0 else float(n) * nc * prod
        theorem1 += term
    loss = 0.5 * (0.0 if L == 0.0 else L * L) + (0.0 if K == 0.0 else _SQRT2 * K)
    finite = math.isfinite(L) and math.isfinite(K)
    if not finite and not reasons:
        reasons.append("the bound is infinite")
    return Bound(float(L), float(K), float(loss), float(theorem1), finite and not reasons, tuple(reasons),
                 dict(ctx.per_node), tuple(dict.fromkeys(ctx.notes)), shape, time.perf_counter() - t0,
                 estimated=ctx.estimated)


def _shape_error(shape: tuple[int, ...], e: BaseException) -> MeasurementError:
    return MeasurementError(
        f"bound(): the model failed on an input of shape (1, {', '.join(map(str, shape))}): {e}. "
        f"Fix: pass input_shape = the shape of one input without the batch dimension, e.g. (3, 32, 32)")


def _check_runs(gm: fx.GraphModule, example: torch.Tensor, shape: tuple[int, ...]) -> None:
    try:
        with torch.no_grad():
            gm(example)
    except Exception as e:  # noqa: BLE001 - a wrong input shape gets a clear error
        raise _shape_error(shape, f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}") from e
