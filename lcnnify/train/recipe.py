"""Training recipes: every setting of a run in one frozen :class:`Recipe`, and the optimizer and schedule it builds.

Two presets (:data:`RECIPES`):

* ``"paper"`` -- the paper's recipe (§5, "Parameter Settings"; the reference implementation
  ``kylematoba/lcnn``): SGD with momentum 0.9, learning rate 0.1 decayed x0.1 after 75% and 87.5% of the
  epochs (150 and 175 of 200), batch size 128, weight decay 5e-4 on every parameter except beta and gamma
  (those are penalized by the curvature penalty, eq. 5, instead; :func:`lcnnify.param_groups`).
* ``"finetune"`` -- from a *trained* model to a low-curvature one in a tenth of the epochs: convert with
  ``preserve_function=True`` (the converted model starts out computing what the trained one computed), then
  20 epochs at learning rate 0.01 on a cosine schedule while the curvature penalty's weight ramps linearly
  from 0 to 1 over the first half of the steps, so beta and gamma are annealed down gradually instead of
  being pushed down at once while the weights are still those of the original model.

Where the paper is silent (defaults, and where they come from):

* GradReg weight: the reference's constant ``--reg-gnorm 1e-3`` multiplies ``1e5 * ||grad_x mean CE||^2 / B``;
  our penalty is the batch-size-independent mean squared per-sample gradient norm, so the equivalent weight is
  ``1e-3 * 1e5 / B**2`` (:func:`lcnnify.regularizers.gradreg_weight_from_reference`): 6.1e-3 at B = 128.
* softplus+wd: the reference's "Softplus + Wt. Decay" baseline is the standard model with softplus beta = 10
  and the *same* weight decay 5e-4 as every other model (the paper's Table 1 agrees); set
  ``softplus_wd_weight_decay`` for a stronger decay in the spirit of Dombrowski et al.
* CURE: weight 4 and step h = 0.1 for inputs in [0, 1]; ``cure_mode`` "eval" (CURE's reference, meant for
  fine-tuning a trained model) or "current" (train mode: use it when training from scratch -- with eval-mode
  BatchNorm statistics that are not yet trained, the penalty can diverge).
* Adversarial training: l2 PGD, eps 0.1, 3 steps, attacking in eval mode with its own seeded generator.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..penalty import param_groups
from ..regularizers import DEFAULT_CURE_H, gradreg_weight_from_reference
from .methods import DEFAULT_CURE_WEIGHT, MethodSpec

__all__ = ["Recipe", "RECIPES", "get_recipe", "recipe_milestones", "recipe_optimizer", "recipe_scheduler",
           "SCHEDULES"]

#: Learning-rate schedules a recipe can use (stepped once per epoch).
SCHEDULES = ("step", "cosine")


@dataclass(frozen=True)
class Recipe:
    """Every setting of a training run except the method, the data and the seed.

    Attributes:
        name: the preset it came from (recorded in the history).
        epochs, batch_size, lr, momentum, weight_decay: SGD with momentum over :func:`lcnnify.param_groups`.
        schedule: ``"step"`` (lr x0.1 after each of ``milestones``, fractions of ``epochs``) or ``"cosine"``
            (cosine annealing from ``lr`` to 0 over ``epochs``).
        gradreg_weight: weight of the gradient-norm penalty (``None``: the reference's constant at this
            batch size, ``1e-3 * 1e5 / batch_size**2``).
        cure_weight, cure_h, cure_mode: CURE's weight, finite-difference step (``None``: 0.1) and mode.
        adv_eps, adv_steps: l2-PGD radius and steps of adversarial training.
        softplus_wd_weight_decay: weight decay of ``softplus+wd`` (``None``: ``weight_decay``).
        penalty_ramp: fraction of the training steps over which the curvature penalty's weight rises linearly
            from 0 to 1 (0: full weight from the first step, as the paper).
        preserve_function: convert the model with ``lcnnify(model, preserve_function=True)`` (fine-tuning a
            trained model), where this lcnnify version has that option.
    """

    name: str = "paper"
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "step"
    milestones: tuple[float, ...] = (0.75, 0.875)
    gradreg_weight: float | None = None
    cure_weight: float = DEFAULT_CURE_WEIGHT
    cure_h: float | None = None
    cure_mode: str = "eval"
    adv_eps: float = 0.1
    adv_steps: int = 3
    softplus_wd_weight_decay: float | None = None
    penalty_ramp: float = 0.0
    preserve_function: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(float(f) for f in self.milestones))
        for name in ("epochs", "batch_size", "adv_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"Recipe.{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"Recipe.lr must be a positive number, got {self.lr}")
        for name in ("momentum", "weight_decay", "cure_weight", "adv_eps"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"Recipe.{name} must be >= 0, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Recipe.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.cure_mode not in ("eval", "current"):
            raise ValueError(f"Recipe.cure_mode must be 'eval' or 'current', got {self.cure_mode!r}")
        if not 0 <= self.penalty_ramp <= 1:
            raise ValueError(f"Recipe.penalty_ramp is a fraction of the training steps in [0, 1], got "
                             f"{self.penalty_ramp}")
        if any(not 0 < f <= 1 for f in self.milestones):
            raise ValueError(f"Recipe.milestones are fractions of the epochs in (0, 1], got {self.milestones}")

    def replace(self, **changes: Any) -> "Recipe":
        """A copy with some fields changed; an unknown name raises a TypeError listing the valid ones."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(f"unknown Recipe field(s) {unknown}; valid fields: {sorted(names)}")
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------------------------------- resolved values
    def weight_decay_for(self, spec: MethodSpec) -> float:
        """The weight decay of ``spec``'s run (its own field if the method has one and it is set)."""
        own = getattr(self, spec.weight_decay_field) if spec.weight_decay_field else None
        return self.weight_decay if own is None else own

    def resolved_gradreg_weight(self) -> float:
        return gradreg_weight_from_reference(self.batch_size) if self.gradreg_weight is None else self.gradreg_weight

    def loss_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~lcnnify.train.method_loss` this recipe fixes."""
        return dict(gradreg_weight=self.resolved_gradreg_weight(), cure_weight=self.cure_weight,
                    cure_h=self.cure_h, adv_eps=self.adv_eps, adv_steps=self.adv_steps, cure_mode=self.cure_mode)

    def penalty_scale(self, step: int, steps_per_epoch: int) -> float:
        """The curvature penalty's weight at training step ``step`` (0-based): ``min(1, (step + 1) / R)`` with
        ``R = penalty_ramp * epochs * steps_per_epoch`` steps (1 throughout when ``penalty_ramp == 0``)."""
        ramp = self.penalty_ramp * self.epochs * steps_per_epoch
        return 1.0 if ramp <= 1 else min(1.0, (step + 1) / ramp)

    def to_config(self, spec: MethodSpec) -> dict[str, Any]:
        """Every setting of ``spec``'s run as plain data (weight decay, GradReg weight, milestones resolved)."""
        out = dataclasses.asdict(self)
        out.update(recipe=out.pop("name"), method=spec.name, weight_decay=self.weight_decay_for(spec),
                   gradreg_weight=self.resolved_gradreg_weight(),
                   cure_h=DEFAULT_CURE_H if self.cure_h is None else self.cure_h,
                   milestones=recipe_milestones(self.epochs, self.milestones) if self.schedule == "step" else [])
        return out


#: Named presets: ``fit(..., recipe="finetune")``.
RECIPES: dict[str, Recipe] = {
    "paper": Recipe(),
    "finetune": Recipe(name="finetune", epochs=20, lr=0.01, schedule="cosine", penalty_ramp=0.5,
                       preserve_function=True),
}


def get_recipe(recipe: str | Recipe | None) -> Recipe:
    """A :class:`Recipe` from a preset name, a Recipe, or ``None`` (the paper's)."""
    if recipe is None:
        return RECIPES["paper"]
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(map(repr, RECIPES))} or pass a "
                         "lcnnify.train.Recipe")
    return RECIPES[recipe]


# ------------------------------------------------------------------------------------------- schedule
def recipe_milestones(epochs: int, fractions: Sequence[float] = (0.75, 0.875)) -> list[int]:
    """Epochs after which the learning rate is divided by 10: ``fraction * epochs`` rounded half up.

    ``recipe_milestones(200) == [150, 175]`` (the paper), ``recipe_milestones(8) == [6, 7]``.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    return [int(math.floor(f * epochs + 0.5)) for f in fractions]


def recipe_optimizer(model: nn.Module, *, lr: float = 0.1, momentum: float = 0.9,
                     weight_decay: float = 5e-4) -> torch.optim.SGD:
    """SGD with momentum over :func:`lcnnify.param_groups` (no weight decay on beta/gamma)."""
    return torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=momentum)


def recipe_scheduler(optimizer: torch.optim.Optimizer, epochs: int, *,
                     milestones: Sequence[float] = (0.75, 0.875), gamma: float = 0.1,
                     schedule: str = "step") -> torch.optim.lr_scheduler.LRScheduler:
    """The per-epoch learning-rate schedule: ``MultiStepLR`` at :func:`recipe_milestones` (``"step"``) or
    ``CosineAnnealingLR`` over ``epochs`` (``"cosine"``). Step it once per epoch."""
    if schedule == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=recipe_milestones(epochs, milestones),
                                                    gamma=gamma)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
