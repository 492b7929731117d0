"""`lcnnify()` and `validate()`: the public entry points of the conversion."""
from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from .._utils import modes_preserved
from ..config import LCNNConfig
from ..errors import ConversionError, ConversionWarning
from ..nn import is_lcnn_layer
from .model import LCNNGraphModule, attach
from .report import ConversionReport
from .rewrite import Converter


def _as_tuple(example_inputs: Any) -> tuple[Any, ...] | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise ConversionError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise ConversionError(
            f"lcnnify() converts a torch.nn.Module, got {type(model).__name__}. "
            "Fix: pass the model object itself (e.g. timm.create_model('resnet18')), not its state_dict or a name.")
    if getattr(model, "lcnn_report", None) is not None:
        raise ConversionError(
            f"this {type(model).__name__} is already an LCNN (it has .lcnn_report); converting it again would "
            "wrap its layers twice. Fix: convert the original model, or use the converted one as it is.")


def _resolve_config(config: LCNNConfig | None, overrides: dict[str, Any]) -> LCNNConfig:
    if config is not None and not isinstance(config, LCNNConfig):
        raise ConversionError(f"config must be an LCNNConfig, got {type(config).__name__}")
    config = config or LCNNConfig()
    try:
        return config.replace(**overrides) if overrides else config
    except TypeError as e:
        raise ConversionError(f"lcnnify(): {e}") from None


def lcnnify(model: nn.Module, config: LCNNConfig | None = None, *, example_inputs: Any = None,
            inplace: bool = False, **overrides: Any) -> nn.Module:
    """Turn a CNN into a Low-Curvature Neural Network (Srinivas et al. 2022, §3).

    Every ReLU-family activation call site becomes its own ``CenteredSoftplus`` (learnable beta, init
    ``beta0``); convs get "real" spectral normalization on the operator they apply, linears vanilla spectral
    normalization, BatchNorms become ``LipschitzBatchNorm`` (learnable gamma >= 1, init ``gamma0``).
    Pretrained weights and BN statistics carry over.

    Args:
        model: any ``nn.Module`` classifier (timm, torchvision or your own).
        config: an :class:`LCNNConfig`; keyword ``overrides`` replace its fields (``beta0=2.0``...).
        example_inputs: a tensor (or tuple) the model accepts; if given, each conv's power iteration is
            warmed up at the shape it sees now (an eval-mode forward under no_grad, BN statistics untouched);
            otherwise that happens lazily at the first forward.
        inplace: convert the given model's modules in place (no copy). Default False: the input is untouched.

    Returns:
        The converted model (usually a ``torch.fx.GraphModule``) with ``.curvature_penalty()``,
        ``.lcnn_report`` (a :class:`ConversionReport`) and ``.lcnn_config``.

    Raises:
        ConversionError: not a module, already converted, nothing to convert, or (with
            ``allow_fallback=False``) a module torch.fx cannot trace — the message names the module and the fix.
    """
    _check_model(model)
    cfg = _resolve_config(config, overrides)
    inputs = _as_tuple(example_inputs)
    work = model if inplace else _copy(model)
    report = ConversionReport(model=type(model).__name__)
    converter = Converter(cfg, report, inputs, root_cls=LCNNGraphModule)
    converted = converter.convert(work, "")
    if not report.converted:
        why = "; ".join(f"'{f.path or '<root>'}': {f.reason}" for f in report.fallbacks)
        raise ConversionError(
            f"nothing to convert in {type(model).__name__}: no ReLU-family activation, conv, linear or "
            "BatchNorm call site was found" + (f" (could not trace: {why})" if why else "") +
            ". Fix: lcnnify converts CNN classifiers built from torch.nn layers; check the model and the "
            "config (skip / convert_types / smooth_activations).")
    attach(converted, cfg, report)
    if inputs is not None:
        warm_up(converted, inputs)
    if cfg.preserve_function:  # BN statistics, biases, gamma and beta absorb the spectral norms' scales
        from .preserve import preserve_function

        preserve_function(converted, inputs, report)
    _warn_unmatched_skips(converter, model)
    if not report.certified:
        warnings.warn(f"lcnnify({type(model).__name__}): {report.voiding_summary()}", ConversionWarning,
                      stacklevel=2)
    return converted


def validate(model: nn.Module, config: LCNNConfig | None = None, *, example_inputs: Any = None,
             **overrides: Any) -> ConversionReport:
    """The dry run: the :class:`ConversionReport` of converting ``model``, without converting it.

    Same arguments as :func:`lcnnify` (``config``, ``example_inputs``, keyword overrides such as
    ``smooth_activations="keep"``). Nothing of ``model`` is changed (the analysis runs on a copy, with no
    spectral-norm warm-up). Skip patterns that match nothing give a :class:`ConversionWarning`; whether the
    guarantee holds is ``report.certified`` (``report.voiding_summary()`` says why not and how to fix it).
    """
    _check_model(model)
    cfg = _resolve_config(config, overrides)
    report = ConversionReport(model=type(model).__name__)
    converter = Converter(cfg, report, _as_tuple(example_inputs), dry_run=True)
    converter.convert(_copy(model), "")
    _warn_unmatched_skips(converter, model)
    return report


def _warn_unmatched_skips(converter: Converter, model: nn.Module) -> None:
    for pattern, close in converter.unmatched_skips(model):
        hint = f" Closest module paths: {', '.join(repr(c) for c in close)}." if close else ""
        warnings.warn(
            f"skip pattern {pattern!r} matched no call site of {type(model).__name__}, so it skipped nothing."
            f"{hint} Fix: use the module path as model.named_modules() spells it (an activation, conv, linear or "
            "BatchNorm call site), or 're:<regex>' matching whole paths.", ConversionWarning, stacklevel=3)


def warm_up(model: nn.Module, inputs: tuple[Any, ...]) -> None:
    """One eval-mode forward under no_grad: every conv's power iteration warms up at the shape it sees.

    Every submodule's own train/eval flag is restored afterwards."""
    try:
        with modes_preserved(model, training=False), torch.no_grad():
            model(*inputs)
    except Exception as e:
        raise ConversionError(
            f"the converted model failed on example_inputs of shape(s) "
            f"{[tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)]}: {type(e).__name__}: {e}. "
            "Fix: pass inputs the original model accepts.") from e


def _copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except Exception as e:
        raise ConversionError(
            f"cannot deep-copy {type(model).__name__} ({type(e).__name__}: {e}); lcnnify() never mutates the "
            "user's model, so it converts a copy. Fix: pass inplace=True to convert this model in place.") from e


def is_converted(model: nn.Module) -> bool:
    """Whether the model holds LCNN layers (converted by lcnnify or built from lcnnify.nn)."""
    return any(is_lcnn_layer(m) for m in model.modules())
