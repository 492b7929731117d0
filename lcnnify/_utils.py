"""Small helpers shared across lcnnify: module modes, device/dtype lookup, in-place ops in fx graphs.

Each exists once here so that every part of the package (conversion, metrics, bounds, training) does the same
thing the same way:

* :func:`modes_preserved` -- flip a model to train or eval mode and put EVERY submodule's own ``training`` flag
  back afterwards (``model.train(was)`` would reset a BatchNorm the user froze with ``bn.eval()``);
* :func:`model_device` / :func:`model_dtype` -- where a model lives (first parameter, else first buffer);
* :func:`redirect_later_readers` -- after an in-place op became an out-of-place one, make later readers of the
  mutated tensor read the new value (what the in-place op's aliasing meant). Which calls are in place is the
  op registry's knowledge: :func:`lcnnify.ops.inplace_source`;
* :func:`normal_tensors` -- compute caches and buffers as normal tensors even under ``torch.inference_mode()``;
* :func:`profiler_range` -- a ``torch.profiler`` label that costs nothing while no profiler records.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, Iterator, Mapping

import torch
import torch.fx as fx
from torch import nn

__all__ = ["modes_preserved", "model_device", "model_dtype", "redirect_later_readers", "normal_tensors",
           "profiler_range"]


@contextlib.contextmanager
def modes_preserved(model: nn.Module, training: bool | None = None) -> Iterator[nn.Module]:
    """Optionally put ``model`` in ``training`` mode; on exit restore every submodule's own flag.

    ``with modes_preserved(model, training=False): model(x)`` runs an eval-mode forward and leaves a model whose
    BatchNorm was frozen with ``bn.eval()`` (while the rest trains) exactly as it was. ``training=None`` changes
    nothing on entry (use it around code that may flip modes itself). Yields ``model``.
    """
    flags = [(m, m.training) for m in model.modules()]
    try:
        if training is not None:
            model.train(training)
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def model_device(model: nn.Module, default: torch.device | str | None = None) -> torch.device:
    """The device of the model's first parameter, else of its first buffer, else ``default`` (or CPU)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device(default if default is not None else "cpu")


def model_dtype(model: nn.Module, default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (else buffer), else ``default``."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return default


# ---------------------------------------------------------------------------------------------- fx graphs
def redirect_later_readers(src: fx.Node, new: fx.Node, order: Mapping[fx.Node, int] | None = None) -> None:
    """Readers of ``src`` placed after ``new`` read ``new`` instead (``new`` replaced an in-place op on ``src``).

    ``order`` maps nodes to their position in the graph (recomputed from the graph when not given; pass it
    when rewriting many nodes, keeping the replaced node's position for ``new``).
    """
    if order is None:
        order = {n: i for i, n in enumerate(new.graph.nodes)}
    pos = order[new]
    for user in list(src.users):
        if user is not new and order.get(user, -1) > pos:
            user.replace_input_with(src, new)


@contextlib.contextmanager
def normal_tensors() -> Iterator[None]:
    """Inside ``torch.inference_mode()``: compute (without grad) outside it, so that the buffers and caches a
    layer writes are normal tensors that training and autograd can use later. Elsewhere: nothing."""
    if torch.is_inference_mode_enabled():
        with torch.inference_mode(False), torch.no_grad():
            yield
    else:
        yield


_NO_RANGE = contextlib.nullcontext()
_profiler_enabled: Callable[[], bool] = getattr(torch._C._autograd, "_profiler_enabled", lambda: True)


def profiler_range(name: str) -> ContextManager:
    """``torch.profiler.record_function(name)`` while a profiler is recording, else a no-op (entering a
    record_function costs a few microseconds even when nothing records)."""
    return torch.profiler.record_function(name) if _profiler_enabled() else _NO_RANGE
