"""Dataset-level model geometry: paper Table 1 (mean +- std of gradient norm, Hessian norm, curvature and
accuracy) and Table 3 (train-test discrepancy)."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import nn

from lcnnify.errors import MeasurementError
from lcnnify.metrics.curvature import (
    CurvatureStats,
    _check_curvature_args,
    _check_int,
    _curvature_impl,
    _measurement_mode,
)
from lcnnify.metrics.robustness import DEFAULT_BATCH_SIZE, _checked_batches

__all__ = ["evaluate_geometry", "train_test_discrepancy"]

QUANTITIES = ("grad_norm", "hessian_norm", "curvature")


def evaluate_geometry(model: nn.Module, data: Any, *, iters: int = 20, eps: float = 1e-6,
                      chunk_size: int | None = None, method: str = "lanczos", max_samples: int | None = None,
                      batch_size: int = DEFAULT_BATCH_SIZE, generator: torch.Generator | None = None,
                      progress: bool = True, return_samples: bool = False) -> dict[str, Any]:
    """Model geometry over a dataset (paper Table 1), model in eval mode (state restored).

    Args:
        data: an (x, y) pair of tensors or an iterable of (x, y) batches (DataLoader).
        iters, eps, chunk_size, method: as in :func:`lcnnify.metrics.curvature`.
        max_samples: use only the first ``max_samples`` samples (the paper's reference used 10% of the data).
        batch_size: batch size when ``data`` is an (x, y) pair.
        generator: random source of the Lanczos start vectors (default: a CPU generator seeded with 0).
        progress: tqdm progress bar over the batches.
        return_samples: also return the per-sample ``CurvatureStats`` under ``"samples"``.

    Returns:
        ``{"grad_norm": {"mean", "std"}, "hessian_norm": {...}, "curvature": {...}, "accuracy": float in
        [0, 1], "num_samples": int}`` (std over samples, Bessel-corrected), plus ``"samples"`` if asked.
        The accuracy comes from the same forward passes.
    """
    fn = "evaluate_geometry"
    iters, eps, chunk_size = _check_curvature_args(iters, eps, chunk_size, method, fn)
    batch_size = _check_int("batch_size", batch_size, fn=fn, minimum=1)
    if max_samples is not None:
        max_samples = _check_int("max_samples", max_samples, fn=fn, minimum=1)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    stats, correct = [], []
    seen = 0
    with _measurement_mode(model):
        for xb, yb in _checked_batches(model, data, batch_size=batch_size, max_samples=max_samples, fn=fn,
                                       desc="geometry", progress=progress):
            s, c = _curvature_impl(model, xb, yb, iters=iters, eps=eps, chunk_size=chunk_size, method=method,
                                   generator=generator, fn=fn)
            stats.append(s)
            correct.append(c)
            seen += xb.shape[0]
    if seen == 0:
        raise MeasurementError(f"lcnnify.metrics.{fn}: data yielded no samples")
    all_stats = CurvatureStats.cat(stats)
    out: dict[str, Any] = dict(all_stats.summary())
    out["accuracy"] = torch.cat(correct).double().mean().item()
    out["num_samples"] = seen
    if return_samples:
        out["samples"] = all_stats
    return out


def _means(stats: Any, which: str) -> dict[str, float]:
    if isinstance(stats, CurvatureStats):
        return {q: getattr(stats, q).double().mean().item() for q in QUANTITIES}
    if isinstance(stats, Mapping):
        out = {}
        for q in QUANTITIES:
            if q not in stats:
                raise MeasurementError(
                    f"lcnnify.metrics.train_test_discrepancy: {which} has no {q!r}; pass the dict returned by "
                    f"evaluate_geometry, a CurvatureStats, or {{quantity: mean}}")
            v = stats[q]
            if isinstance(v, Mapping):
                v = v["mean"]
            if isinstance(v, torch.Tensor):
                v = v.double().mean().item()
            out[q] = float(v)
        return out
    raise MeasurementError(
        f"lcnnify.metrics.train_test_discrepancy: {which} must be the dict returned by evaluate_geometry or a "
        f"CurvatureStats, got {type(stats).__name__}")


def train_test_discrepancy(train_stats: Any, test_stats: Any, *, denominator: str = "test") -> dict[str, float]:
    """Relative train-test discrepancy ``|g(test) - g(train)| / g(test)`` of the dataset means ``g`` of the
    gradient norm, Hessian norm and curvature (paper Table 3).

    Args:
        train_stats, test_stats: results of :func:`evaluate_geometry` (or ``CurvatureStats``, or
            ``{quantity: mean}`` dicts).
        denominator: ``"test"`` (the paper's formula, the default) or ``"train"``. Note: the paper's Table 3
            reports values > 10 while saying test norms are > 10x the train norms, which matches
            dividing by ``g(train)``, not ``g(test)`` (the latter is < 1 whenever test > train).

    Returns:
        ``{"grad_norm": d, "hessian_norm": d, "curvature": d}``; 0 when both means are 0, ``inf`` when only the
        denominator is 0.
    """
    if denominator not in ("test", "train"):
        raise MeasurementError(f"lcnnify.metrics.train_test_discrepancy: denominator must be 'test' or 'train', "
                               f"got {denominator!r}")
    tr, te = _means(train_stats, "train_stats"), _means(test_stats, "test_stats")
    out = {}
    for q in QUANTITIES:
        num = abs(te[q] - tr[q])
        den = te[q] if denominator == "test" else tr[q]
        if not (math.isfinite(num) and math.isfinite(den)):
            raise MeasurementError(f"lcnnify.metrics.train_test_discrepancy: non-finite mean of {q}")
        out[q] = 0.0 if num == 0 else (num / abs(den) if den != 0 else math.inf)
    return out
