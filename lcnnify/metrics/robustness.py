"""Gradient robustness (paper §4.1, Fig. 2) and l2 PGD robust accuracy (paper §4.2, §5.3, Table 2).

Everything runs with the model in eval mode and restores its modes and its parameters' ``requires_grad`` and
``.grad`` afterwards. Inputs of the attacks live in ``[0, 1]``: input normalization belongs inside the model.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from lcnnify.errors import MeasurementError
from lcnnify.metrics.curvature import (
    DEFAULT_CHUNK_SIZE,
    _check_differentiable,
    _check_int,
    _check_logits,
    _check_scalar,
    _check_xy,
    _flat_norm,
    _input_gradients,
    _measurement_mode,
)

__all__ = ["gradient_robustness", "pgd_l2", "robust_accuracy", "iter_batches"]

#: Batch size used when ``data`` is given as one ``(x, y)`` pair of whole-dataset tensors.
DEFAULT_BATCH_SIZE = 128


# ---------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------
def _num_batches(data: Any, batch_size: int) -> int | None:
    if _is_tensor_pair(data):
        return math.ceil(data[0].shape[0] / batch_size) if data[0].ndim else None
    try:
        return len(data)
    except TypeError:
        return None


def _is_tensor_pair(data: Any) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data)


def iter_batches(data: Any, *, batch_size: int = DEFAULT_BATCH_SIZE, fn: str = "iter_batches"
                 ) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x, y)`` batches from ``data``: either one ``(x, y)`` pair of tensors (split into batches of
    ``batch_size``) or an iterable of ``(x, y[, ...])`` batches such as a ``DataLoader``."""
    if _is_tensor_pair(data):
        x, y = data
        if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
            raise MeasurementError(
                f"lcnnify.metrics.{fn}: data=(x, y) needs x of shape (N, ...) and y of shape (N,), got "
                f"{tuple(x.shape)} and {tuple(y.shape)}")
        for start in range(0, x.shape[0], batch_size):
            yield x[start:start + batch_size], y[start:start + batch_size]
        return
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        raise MeasurementError(
            f"lcnnify.metrics.{fn}: got a Dataset of single samples; pass a DataLoader (batches) or an "
            f"(x, y) pair of tensors")
    if isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise MeasurementError(
            f"lcnnify.metrics.{fn}: data must be an (x, y) pair of tensors or an iterable of (x, y) batches "
            f"(e.g. a DataLoader), got {type(data).__name__}")
    for i, batch in enumerate(data):
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise MeasurementError(
                f"lcnnify.metrics.{fn}: batch {i} of data is a {type(batch).__name__}, expected an (x, y) pair")
        yield batch[0], batch[1]


def _progress(it: Iterable, *, total: int | None, desc: str, progress: bool) -> Iterable:
    return tqdm(it, total=total, desc=desc, disable=not progress, leave=False)


def _checked_batches(model: nn.Module, data: Any, *, batch_size: int, max_samples: int | None, fn: str,
                     desc: str, progress: bool) -> Iterator[tuple[Tensor, Tensor]]:
    """The ``(x, y)`` batches of ``data`` (:func:`iter_batches`) behind a progress bar, each checked against
    the model (``_check_xy``: shapes, device, dtype) and cut so that at most ``max_samples`` are yielded."""
    seen = 0
    batches = iter_batches(data, batch_size=batch_size, fn=fn)
    for xb, yb in _progress(batches, total=_num_batches(data, batch_size), desc=desc, progress=progress):
        if max_samples is not None:
            xb, yb = xb[: max_samples - seen], yb[: max_samples - seen]
        xb, yb = _check_xy(model, xb, yb, fn=fn)
        seen += xb.shape[0]
        yield xb, yb
        if max_samples is not None and seen >= max_samples:
            return


# ---------------------------------------------------------------------------------------------------------
# gradient robustness (Fig. 2)
# ---------------------------------------------------------------------------------------------------------
def gradient_robustness(model: nn.Module, x: Tensor, y: Tensor, noise_norms: float | Iterable[float], *,
                        n_draws: int = 1, generator: torch.Generator | None = None,
                        chunk_size: int | None = None, reduction: str = "none") -> dict[float, Tensor]:
    """Relative gradient robustness ``||grad f(x + e) - grad f(x)|| / ||grad f(x)||`` (paper §4.1, Fig. 2).

    ``f`` is the cross-entropy loss, gradients are w.r.t. the input. For every draw, one random direction per
    sample (a Gaussian vector) is rescaled to each exact l2 norm in ``noise_norms`` (the same directions for
    every noise level, so the curves are smooth in the norm). The ratio is averaged over the ``n_draws`` draws.
    Proposition 1 bounds it by ``||e|| C exp(||e|| C)``, ~ ``||e|| C(x)`` for a locally quadratic loss.

    Args:
        model: classifier (inputs -> logits); measured in eval mode, state restored.
        x, y: a batch, shape (N, ...) and (N,).
        noise_norms: one l2 norm or several, each finite and >= 0. Noise is not clipped to any input range.
        n_draws: random directions averaged per sample.
        generator: random source (default: the global RNG). Directions are drawn on the generator's device.
        chunk_size: samples per gradient computation (memory bound; default 64).
        reduction: ``"none"`` (per-sample tensors of shape (N,), on the CPU) or ``"mean"`` (0-dim tensors).

    Returns:
        ``{float(norm): ratio}`` in the order given. A sample with zero gradient gets 0 if the gradient at
        ``x + e`` is zero too and ``inf`` otherwise.
    """
    fn = "gradient_robustness"
    if isinstance(noise_norms, (int, float, Tensor)) and not (isinstance(noise_norms, Tensor)
                                                              and noise_norms.ndim > 0):
        noise_norms = [noise_norms]
    if isinstance(noise_norms, Tensor):
        noise_norms = noise_norms.tolist()
    norms = [_check_scalar("noise norm", r, fn=fn, minimum=0.0) for r in noise_norms]
    if not norms:
        raise MeasurementError(f"lcnnify.metrics.{fn}: noise_norms is empty")
    n_draws = _check_int("n_draws", n_draws, fn=fn, minimum=1)
    chunk_size = _check_int("chunk_size", DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size, fn=fn,
                            minimum=1)
    if reduction not in ("none", "mean"):
        raise MeasurementError(f"lcnnify.metrics.{fn}: reduction must be 'none' or 'mean', got {reduction!r}")
    with _measurement_mode(model):
        x, y = _check_xy(model, x, y, fn=fn)
        n = x.shape[0]
        g0 = _input_gradients(model, x, y, chunk_size, fn)
        g0n = _flat_norm(g0)
        sums = {r: torch.zeros(n, dtype=torch.float64, device=x.device) for r in norms}
        for _ in range(n_draws):
            dev = generator.device if generator is not None else x.device
            u = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)
            u = u / _flat_norm(u).clamp_min(torch.finfo(u.dtype).tiny).view(-1, *[1] * (x.ndim - 1))
            for r in norms:
                if r == 0.0:
                    continue
                g1 = _input_gradients(model, x + r * u, y, chunk_size, fn)
                diff = _flat_norm(g1 - g0)
                ratio = torch.where(g0n > 0, diff / torch.where(g0n > 0, g0n, torch.ones_like(g0n)),
                                    torch.where(diff > 0, torch.full_like(diff, math.inf), torch.zeros_like(diff)))
                sums[r] += ratio.double()
    out = {}
    for r in norms:
        v = (sums[r] / n_draws).to(x.dtype).cpu()
        out[float(r)] = v.mean() if reduction == "mean" else v
    return out


# ---------------------------------------------------------------------------------------------------------
# l2 PGD (Madry et al.), iterate-for-iterate the same as torchattacks.PGDL2
# ---------------------------------------------------------------------------------------------------------
def _check_unit_range(x: Tensor, fn: str) -> None:
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise MeasurementError(
            f"lcnnify.metrics.{fn}: inputs must lie in [0, 1] (got min {lo:.4g}, max {hi:.4g}); put the input "
            f"normalization inside the model (e.g. nn.Sequential(Normalize(mean, std), net))")


def _pgd_l2(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int, alpha: float, random_start: bool,
            generator: torch.Generator | None, fn: str) -> Tensor:
    """Inside ``_measurement_mode``; x, y validated. The same operations, in the same order, as torchattacks
    3.5 ``PGDL2.forward`` (mean cross-entropy, ``eps_for_division = 1e-10``), generalised to any input rank."""
    b = x.shape[0]
    view = (b,) + (1,) * (x.ndim - 1)
    images = x.clone().detach()
    adv = images.clone().detach()
    if random_start:
        # torchattacks' "uniform" start: Gaussian direction, radius uniform in [0, eps] (not volume-uniform)
        if generator is None:
            delta = torch.empty_like(adv).normal_()
            r = torch.zeros(view, dtype=adv.dtype, device=adv.device).uniform_(0, 1)
        else:
            delta = torch.empty(adv.shape, dtype=adv.dtype, device=generator.device).normal_(
                generator=generator).to(adv.device)
            r = torch.zeros(view, dtype=adv.dtype, device=generator.device).uniform_(
                0, 1, generator=generator).to(adv.device)
        nrm = delta.view(b, -1).norm(p=2, dim=1).view(view)
        delta *= r / nrm * eps
        adv = torch.clamp(adv + delta, min=0, max=1).detach()
    for _ in range(steps):
        adv.requires_grad = True
        logits = _check_logits(model(adv), y, fn=fn)
        cost = F.cross_entropy(logits, y)
        _check_differentiable(cost, fn)
        (grad,) = torch.autograd.grad(cost, adv, retain_graph=False, create_graph=False)
        grad_norms = torch.norm(grad.view(b, -1), p=2, dim=1) + 1e-10
        grad = grad / grad_norms.view(view)
        adv = adv.detach() + alpha * grad
        delta = adv - images
        delta_norms = torch.norm(delta.view(b, -1), p=2, dim=1)
        factor = eps / delta_norms
        factor = torch.min(factor, torch.ones_like(delta_norms))
        delta = delta * factor.view(view)
        adv = torch.clamp(images + delta, min=0, max=1).detach()
    return adv


def _check_pgd_args(eps: Any, steps: Any, step_size: Any, fn: str) -> tuple[float, int, float | None]:
    eps = _check_scalar("eps", eps, fn=fn, minimum=0.0)
    steps = _check_int("steps", steps, fn=fn, minimum=0)
    if step_size is not None:
        step_size = _check_scalar("step_size", step_size, fn=fn, minimum=0.0, strict=True)
    return eps, steps, step_size


def pgd_l2(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, steps: int = 10,
           step_size: float | None = None, random_start: bool = True,
           generator: torch.Generator | None = None) -> Tensor:
    """Untargeted l2 PGD (Madry et al. 2018) on inputs in ``[0, 1]``; returns ``x_adv`` (detached).

    Each step: ``x <- x + step_size * g / ||g||`` (g the gradient of the mean cross-entropy), then the
    perturbation is projected onto the l2 ball of radius ``eps`` around ``x`` and the result clamped to
    ``[0, 1]`` — the same iterates as ``torchattacks.PGDL2(model, eps, alpha=step_size, steps,
    random_start)``. With ``random_start`` the start is ``x + r eps u`` (u a uniformly random unit
    direction, r ~ U(0, 1): torchattacks' convention), clamped to [0, 1].

    Args:
        eps: radius (>= 0) of the l2 ball, in the units of the [0, 1] input; ``eps = 0`` returns a copy of x.
        steps: PGD steps (>= 0).
        step_size: default ``2.5 * eps / steps`` (Madry et al.'s rule: enough to reach and move along the
            boundary of the ball from anywhere inside it).
        generator: random source of the random start (default: the global RNG, as torchattacks).
    """
    fn = "pgd_l2"
    eps, steps, step_size = _check_pgd_args(eps, steps, step_size, fn)
    with _measurement_mode(model):
        xd, yd = _check_xy(model, x, y, fn=fn)
        _check_unit_range(xd, fn)
        if eps == 0.0 or (steps == 0 and not random_start):
            return xd.clone()
        alpha = step_size if step_size is not None else (2.5 * eps / steps if steps else 0.0)
        return _pgd_l2(model, xd, yd, eps, steps, alpha, random_start, generator, fn)


def robust_accuracy(model: nn.Module, data: Any, eps_list: float | Iterable[float], *,
                    batch_size: int = DEFAULT_BATCH_SIZE, max_samples: int | None = None, progress: bool = True,
                    **pgd_kwargs: Any) -> dict[float, float]:
    """Accuracy (fraction in [0, 1]) on l2 PGD adversarial examples for each eps (paper Table 2).

    ``eps = 0`` gives the clean accuracy. A sample counts as correct when the model's prediction on its
    adversarial example equals the label.

    Args:
        data: an (x, y) pair of tensors (split into ``batch_size`` batches) or an iterable of (x, y) batches
            (DataLoader); inputs in [0, 1].
        eps_list: one radius or several (each >= 0).
        max_samples: stop after this many samples.
        progress: tqdm progress bar over the batches.
        **pgd_kwargs: ``steps``, ``step_size``, ``random_start``, ``generator`` of :func:`pgd_l2`.
    """
    fn = "robust_accuracy"
    if isinstance(eps_list, (int, float)):
        eps_list = [eps_list]
    eps_values = [_check_scalar("eps", e, fn=fn, minimum=0.0) for e in eps_list]
    if not eps_values:
        raise MeasurementError(f"lcnnify.metrics.{fn}: eps_list is empty")
    unknown = set(pgd_kwargs) - {"steps", "step_size", "random_start", "generator"}
    if unknown:
        raise MeasurementError(f"lcnnify.metrics.{fn}: unknown keyword arguments {sorted(unknown)} "
                               f"(pgd_l2 takes steps, step_size, random_start, generator)")
    steps = pgd_kwargs.get("steps", 10)
    step_size = pgd_kwargs.get("step_size")
    random_start = bool(pgd_kwargs.get("random_start", True))
    generator = pgd_kwargs.get("generator")
    batch_size = _check_int("batch_size", batch_size, fn=fn, minimum=1)
    if max_samples is not None:
        max_samples = _check_int("max_samples", max_samples, fn=fn, minimum=1)
    for e in eps_values:
        _check_pgd_args(e, steps, step_size, fn)
    steps = int(steps)
    correct = {e: 0 for e in eps_values}
    seen = 0
    with _measurement_mode(model):
        for xb, yb in _checked_batches(model, data, batch_size=batch_size, max_samples=max_samples, fn=fn,
                                       desc="robust accuracy", progress=progress):
            _check_unit_range(xb, fn)
            for e in eps_values:
                if e == 0.0 or (steps == 0 and not random_start):
                    xa = xb
                else:
                    alpha = step_size if step_size is not None else (2.5 * e / steps if steps else 0.0)
                    xa = _pgd_l2(model, xb, yb, e, steps, alpha, random_start, generator, fn)
                with torch.no_grad():
                    logits = _check_logits(model(xa), yb, fn=fn)
                correct[e] += int((logits.argmax(dim=1) == yb).sum())
            seen += xb.shape[0]
    if seen == 0:
        raise MeasurementError(f"lcnnify.metrics.{fn}: data yielded no samples")
    return {float(e): correct[e] / seen for e in eps_values}
