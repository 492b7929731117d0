"""The paper's training recipe (Srinivas et al. 2022, §5) as a small, reusable loop.

    from lcnnify.train import fit
    result = fit(model, train_set, test_set, method="lcnn+gradreg", epochs=200,
                 checkpoint="run.pt", history_path="run.json")
    result.model, result.history

    # from a trained model to a low-curvature one, in a tenth of the epochs
    result = fit(trained_model, train_set, test_set, method="lcnn", recipe="finetune")

``fit`` is a convenience, not a framework. Every piece it uses is public and works in your own loop:

- :mod:`~lcnnify.train.methods` -- the method table (:data:`METHOD_SPECS`), :func:`prepare_model` (the model
  each method trains, built without mutating yours), :func:`method_loss` (the loss of one batch, its terms
  separately) and :func:`train_step`;
- :mod:`~lcnnify.train.recipe` -- :class:`Recipe` (every setting of a run; presets in :data:`RECIPES`),
  :func:`recipe_optimizer`, :func:`recipe_scheduler`, :func:`recipe_milestones`;
- :mod:`~lcnnify.train.loop` -- :func:`fit`, :func:`evaluate` (eval-mode loss and accuracy),
  :func:`lcnn_parameter_summary`;
- :mod:`~lcnnify.train.checkpoint` -- the one checkpoint format (for ``fit`` and the CLI) and its atomic writer;
- :mod:`lcnnify.regularizers` and ``model.curvature_penalty()`` underneath.
"""
from __future__ import annotations

from .checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from .loop import FitResult, evaluate, fit, lcnn_parameter_summary
from .methods import (
    BASELINE_SOFTPLUS_BETA,
    DEFAULT_CURE_WEIGHT,
    METHOD_LABELS,
    METHOD_SPECS,
    METHODS,
    WD_SOFTPLUS_BETA,
    MethodSpec,
    StepLoss,
    get_method,
    method_loss,
    prepare_model,
    train_step,
)
from .recipe import RECIPES, Recipe, get_recipe, recipe_milestones, recipe_optimizer, recipe_scheduler

__all__ = [
    "METHODS", "METHOD_SPECS", "METHOD_LABELS", "MethodSpec", "get_method",
    "Recipe", "RECIPES", "get_recipe",
    "FitResult", "StepLoss", "fit", "prepare_model", "method_loss", "train_step", "evaluate",
    "lcnn_parameter_summary", "recipe_milestones", "recipe_optimizer", "recipe_scheduler",
    "read_checkpoint", "save_checkpoint", "CheckpointError",
    "BASELINE_SOFTPLUS_BETA", "WD_SOFTPLUS_BETA", "DEFAULT_CURE_WEIGHT",
]
