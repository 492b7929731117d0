"""lcnnify: turn any CNN into a Low-Curvature Neural Network (Srinivas, Matoba, Lakkaraju & Fleuret, NeurIPS 2022).

    model = lcnnify(timm.create_model("resnet18"))
    loss = criterion(model(x), y) + model.curvature_penalty()
"""
from __future__ import annotations

from typing import Any

from .config import LCNNConfig
from .convert import ConversionReport, lcnnify, validate
from .errors import ConversionError, LCNNError, LCNNWarning
from .penalty import curvature_penalty, param_groups

__version__ = "0.1.0"


def bound(model: Any, input_shape: Any, **kwargs: Any) -> Any:
    """The data-free curvature bound of a converted model (see :mod:`lcnnify.bounds`)."""
    from .bounds import bound as _bound

    return _bound(model, input_shape, **kwargs)


def freeze(model: Any, **kwargs: Any) -> Any:
    """Bake a converted model into plain torch layers for deployment (see :mod:`lcnnify.export`)."""
    from .export import freeze as _freeze

    return _freeze(model, **kwargs)


__all__ = ["lcnnify", "LCNNConfig", "curvature_penalty", "param_groups", "validate", "bound", "freeze",
           "ConversionReport", "LCNNError", "ConversionError", "LCNNWarning", "__version__"]
