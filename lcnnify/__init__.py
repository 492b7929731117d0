"""lcnnify: turn any CNN into a Low-Curvature Neural Network (Srinivas, Matoba, Lakkaraju & Fleuret, NeurIPS 2022).

    model = lcnnify(timm.create_model("resnet18"))
    loss = criterion(model(x), y) + model.curvature_penalty()
"""
from __future__ import annotations

from typing import Any

from .config import LCNNConfig
from .convert import ConversionReport, lcnnify, load_plain_state_dict, validate
from .errors import (ConversionError, ConversionWarning, DatasetNotFoundError, LCNNError, LCNNWarning,
                     MeasurementError, ShapeChangeWarning)
from .export import freeze
from .penalty import curvature_penalty, param_groups

__version__ = "0.1.0"

_LAZY = {"bound": ("bounds", "bound")}  # imported on first use (the bound pulls in its whole propagation)


def __getattr__(name: str) -> Any:
    """``lcnnify.bound`` is :func:`lcnnify.bounds.bound` itself (same signature and docstring), imported lazily."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lcnnify' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["lcnnify", "LCNNConfig", "curvature_penalty", "param_groups", "validate", "bound", "freeze",
           "load_plain_state_dict", "ConversionReport",
           "LCNNError", "ConversionError", "MeasurementError", "DatasetNotFoundError",
           "LCNNWarning", "ConversionWarning", "ShapeChangeWarning", "__version__"]
