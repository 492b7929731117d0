"""The paper's training recipe (Srinivas et al. 2022, §5) as a small, reusable loop.

    from lcnnify.train import fit
    result = fit(model, train_set, test_set, method="lcnn+gradreg", epochs=200,
                 checkpoint="run.pt", history_path="run.json")
    result.model, result.history

The recipe (paper §5, "Parameter Settings"; the reference implementation ``kylematoba/lcnn``): SGD with momentum
0.9, initial learning rate 0.1 decayed x0.1 after 75% and 87.5% of the epochs (150 and 175 of the paper's 200),
batch size 128, weight decay 5e-4 on every parameter except the LCNN's beta and gamma (those are penalized by the
curvature penalty, eq. 5, instead; :func:`lcnnify.param_groups`).

``fit`` is a convenience, not a framework. Every piece it uses is public and works in your own loop:

- :func:`prepare_model` -- the model each method trains, built from your (ReLU) model without mutating it;
- :func:`recipe_optimizer`, :func:`recipe_scheduler`, :func:`recipe_milestones` -- the optimizer and schedule;
- :func:`method_loss` -- the training loss of one batch for any method (returns the terms separately);
- :func:`train_step` -- ``zero_grad`` + :func:`method_loss` + ``backward`` + ``step``;
- :func:`evaluate` -- eval-mode loss and accuracy;
- :mod:`lcnnify.regularizers` and ``model.curvature_penalty()`` underneath.

Methods (:data:`METHODS`) and the losses they train on:

============== ======================================= =====================================================
method         model (from a ReLU base model)          loss of a batch
============== ======================================= =====================================================
standard       softplus, beta = 1e3 (paper's baseline)  CE
lcnn           ``lcnnify(model)``                       CE + ``model.curvature_penalty()``
gradreg        softplus, beta = 1e3                     CE + w * ``gradient_norm_penalty`` (w: see below)
lcnn+gradreg   ``lcnnify(model)``                       CE + curvature penalty + w * ``gradient_norm_penalty``
cure           softplus, beta = 1e3                     CE + 4 * ``cure_penalty`` (h = 0.1)
softplus+wd    softplus, beta = 10 (Dombrowski et al.)  CE (weight decay, see below)
adversarial    softplus, beta = 1e3                     CE on l2-PGD examples (eps 0.1, 3 steps; Madry)
============== ======================================= =====================================================

Choices (where the paper is silent) and where they come from:

* GradReg weight ``w``: the reference's constant ``--reg-gnorm 1e-3`` multiplies ``1e5 * ||grad_x mean CE||^2 / B``;
  our penalty is the batch-size-independent mean squared per-sample gradient norm, so the equivalent weight is
  ``1e-3 * 1e5 / B**2`` (:func:`lcnnify.regularizers.gradreg_weight_from_reference`): 6.1e-3 at B = 128.
* softplus+wd: the reference's "Softplus + Wt. Decay" baseline (its ``resnet18lowbeta``) is the standard model with
  ``nn.Softplus(beta=10)`` and the *same* weight decay 5e-4 as every other model; the paper's Table 1 agrees (its
  gradient norm and accuracy are those of the standard model). So the defaults are beta = 10 and weight decay =
  ``weight_decay``; pass ``softplus_wd_weight_decay`` for a stronger decay in the spirit of Dombrowski et al.
* Adversarial training attacks in eval mode (see :func:`lcnnify.regularizers.adversarial_examples`) with its own
  seeded generator for the random start; inputs must lie in [0, 1].

Reproducibility: a fresh ``fit`` seeds torch, ``random`` and numpy with ``seed`` (before the model is prepared,
so the LCNN conversion's power-iteration vectors are seeded too). Shuffling uses its own ``torch.Generator``.
The checkpoint (written after every epoch) holds the model, optimizer, scheduler, epoch, history and every RNG
state (torch CPU/CUDA, ``random``, numpy, the shuffling and attack generators), so an interrupted run resumed
from it continues bit-for-bit on CPU.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, TensorDataset
from tqdm.auto import tqdm

from .errors import LCNNWarning
from .penalty import curvature_penalty as _curvature_penalty
from .penalty import param_groups
from .regularizers import (
    DEFAULT_CURE_H,
    adversarial_examples,
    cure_penalty,
    gradient_norm_penalty,
    gradreg_weight_from_reference,
    softplus_model,
)

__all__ = [
    "METHODS",
    "FitResult",
    "StepLoss",
    "fit",
    "prepare_model",
    "method_loss",
    "train_step",
    "evaluate",
    "recipe_milestones",
    "recipe_optimizer",
    "recipe_scheduler",
    "BASELINE_SOFTPLUS_BETA",
    "WD_SOFTPLUS_BETA",
    "DEFAULT_CURE_WEIGHT",
]

#: The training methods of the paper's §5 (Tables 1 and 2).
METHODS = ("standard", "lcnn", "gradreg", "lcnn+gradreg", "cure", "softplus+wd", "adversarial")
#: Softplus beta of the paper's baseline models ("to mimic ReLU, and yet have well-defined curvatures").
BASELINE_SOFTPLUS_BETA = 1e3
#: Softplus beta of the "softplus + weight decay" baseline (reference implementation: ``low_softplus``).
WD_SOFTPLUS_BETA = 10.0
#: CURE's regularization weight (gamma = 4 in Moosavi-Dezfooli et al. 2019).
DEFAULT_CURE_WEIGHT = 4.0

_LCNN_METHODS = ("lcnn", "lcnn+gradreg")
_CHECKPOINT_FORMAT = "lcnnify.train/1"
# fit() arguments that must match when resuming from a checkpoint (they fix the schedule / the loss)
_RESUME_KEYS = ("method", "epochs", "batch_size", "lr", "momentum", "weight_decay", "milestones")


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(repr(m) for m in METHODS)}")
    return method


# ------------------------------------------------------------------------------------------------ model
def _has_lcnn_layers(model: nn.Module) -> bool:
    from .convert.api import is_converted

    return getattr(model, "lcnn_report", None) is not None or is_converted(model)


def prepare_model(model: nn.Module, method: str, *, example_inputs: Any = None,
                  softplus_beta: float = BASELINE_SOFTPLUS_BETA, wd_softplus_beta: float = WD_SOFTPLUS_BETA,
                  **lcnn_overrides: Any) -> nn.Module:
    """The model that ``method`` trains, built from a user's base (ReLU) model. ``model`` is never mutated.

    * ``standard``, ``gradreg``, ``cure``, ``adversarial``: the paper's baseline,
      :func:`~lcnnify.regularizers.softplus_model` with ``beta = softplus_beta`` (1e3: ReLU-like, but with a
      defined curvature).
    * ``softplus+wd``: softplus with the low ``wd_softplus_beta`` (10, as the reference implementation).
    * ``lcnn``, ``lcnn+gradreg``: ``lcnnify(model, example_inputs=example_inputs, **lcnn_overrides)``; a model
      that is already an LCNN (has ``.lcnn_report`` or LCNN layers) is copied, not converted again.

    Raises:
        ValueError: unknown method, or a baseline method given a model that is already an LCNN (train the
            base model, or call ``fit(..., prepare=False)`` to train this one as it is).
    """
    _check_method(method)
    if method in _LCNN_METHODS:
        if _has_lcnn_layers(model):
            if lcnn_overrides:
                raise ValueError(f"the model is already an LCNN; LCNN options {sorted(lcnn_overrides)} cannot be "
                                 "applied again (convert the base model with them instead)")
            return copy.deepcopy(model)
        from .convert import lcnnify

        return lcnnify(model, example_inputs=example_inputs, **lcnn_overrides)
    if lcnn_overrides:
        raise TypeError(f"prepare_model(method={method!r}) got unexpected options {sorted(lcnn_overrides)} "
                        "(LCNN conversion options only apply to the 'lcnn' methods)")
    if _has_lcnn_layers(model):
        raise ValueError(f"method {method!r} trains the paper's softplus baseline built from a base (ReLU) model, "
                         "but this model is already an LCNN. Pass the original model, or fit(..., prepare=False) "
                         "to train this model as it is.")
    beta = wd_softplus_beta if method == "softplus+wd" else softplus_beta
    return softplus_model(model, beta=beta)


def _model_curvature_penalty(model: nn.Module) -> Tensor:
    fn = getattr(model, "curvature_penalty", None)
    return fn() if callable(fn) else _curvature_penalty(model)


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
                     milestones: Sequence[float] = (0.75, 0.875),
                     gamma: float = 0.1) -> torch.optim.lr_scheduler.MultiStepLR:
    """``MultiStepLR`` at :func:`recipe_milestones` (step it once per epoch)."""
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=recipe_milestones(epochs, milestones),
                                                gamma=gamma)


# ----------------------------------------------------------------------------------------------- loss
@dataclass
class StepLoss:
    """What :func:`method_loss` returns: the loss to back-propagate and its parts (all for one batch).

    ``terms`` holds detached floats: ``loss`` (the data term, CE), and for the methods that use them
    ``curvature_penalty`` (as added, i.e. already weighted by lambda_beta/lambda_gamma), ``gradreg`` (the
    unweighted mean squared input-gradient norm) and ``cure`` (unweighted); ``total_loss`` is the sum as trained.
    """

    total: Tensor
    logits: Tensor
    y: Tensor
    terms: dict[str, float] = field(default_factory=dict)


def method_loss(model: nn.Module, x: Tensor, y: Tensor, method: str, *, gradreg_weight: float | None = None,
                cure_weight: float = DEFAULT_CURE_WEIGHT, cure_h: float | None = None, adv_eps: float = 0.1,
                adv_steps: int = 3, generator: torch.Generator | None = None,
                cure_mode: str = "eval") -> StepLoss:
    """The training loss of one batch for ``method`` (the model should be in train mode).

    ``gradreg_weight`` defaults to the reference's constant converted for this batch size
    (:func:`~lcnnify.regularizers.gradreg_weight_from_reference`). ``generator`` drives the random start of the
    adversarial examples (default: the global RNG).
    """
    _check_method(method)
    terms: dict[str, float] = {}
    if method == "adversarial":
        x = adversarial_examples(model, x, y, adv_eps, adv_steps, generator=generator)
    use_gradreg = method in ("gradreg", "lcnn+gradreg")
    if use_gradreg:
        x = x.detach().requires_grad_(True)
    logits = model(x)
    data = F.cross_entropy(logits, y)
    total = data
    terms["loss"] = data.item()
    if method in _LCNN_METHODS:
        cp = _model_curvature_penalty(model)
        total = total + cp
        terms["curvature_penalty"] = cp.item()
    if use_gradreg:
        w = gradreg_weight_from_reference(x.shape[0]) if gradreg_weight is None else gradreg_weight
        gr = gradient_norm_penalty(model, x, y, logits=logits)
        total = total + w * gr
        terms["gradreg"] = gr.item()
    if method == "cure":
        cu = cure_penalty(model, x, y, h=DEFAULT_CURE_H if cure_h is None else cure_h, mode=cure_mode)
        total = total + cure_weight * cu
        terms["cure"] = cu.item()
    terms["total_loss"] = total.item()
    return StepLoss(total=total, logits=logits, y=y, terms=terms)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, method: str,
               **loss_kwargs: Any) -> StepLoss:
    """One training step: ``zero_grad``, :func:`method_loss`, ``backward``, ``optimizer.step()``."""
    optimizer.zero_grad(set_to_none=True)
    out = method_loss(model, x, y, method, **loss_kwargs)
    out.total.backward()
    optimizer.step()
    return out


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, *, batch_size: int = 256, device: Any = None) -> dict[str, float]:
    """Eval-mode mean cross-entropy and accuracy over ``data`` (a Dataset, an (X, y) pair or a DataLoader).

    The model's (and every submodule's) mode is restored afterwards.
    """
    device = _resolve_device(model, device)
    loader = data if isinstance(data, DataLoader) else _loader(_as_dataset(data, "data"), batch_size, None)
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    total, correct, loss = 0, 0, 0.0
    try:
        for batch in loader:
            xb, yb = batch[0].to(device), batch[1].to(device)
            logits = model(xb)
            loss += F.cross_entropy(logits, yb, reduction="sum").item()
            correct += (logits.argmax(1) == yb).sum().item()
            total += yb.shape[0]
    finally:
        for m, f in flags:
            m.training = f
    if total == 0:
        raise ValueError("evaluate(): the data is empty")
    return {"loss": loss / total, "acc": correct / total}


# ----------------------------------------------------------------------------------------------- data
def _as_dataset(data: Any, name: str) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
        x, y = data
        if x.ndim == 0 or x.shape[0] != y.shape[0]:
            raise ValueError(f"{name}=(X, y) needs X of shape (N, ...) and y of shape (N,), got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        return TensorDataset(x, y)
    raise TypeError(f"{name} must be a torch Dataset or an (X, y) pair of tensors, got {type(data).__name__}")


def _loader(ds: Dataset, batch_size: int, generator: torch.Generator | None, num_workers: int = 0) -> DataLoader:
    """Shuffled (with ``generator``) or sequential batches. TensorDatasets are indexed a batch at a time."""
    if isinstance(ds, TensorDataset):  # fast path: one advanced-indexing gather per batch
        base = RandomSampler(ds, generator=generator) if generator is not None else SequentialSampler(ds)
        return DataLoader(ds, sampler=BatchSampler(base, batch_size, drop_last=False), batch_size=None,
                          num_workers=num_workers)
    return DataLoader(ds, batch_size=batch_size, shuffle=generator is not None, generator=generator,
                      num_workers=num_workers)


def _example_batch(ds: Dataset) -> Tensor:
    item = ds[0]
    x = item[0] if isinstance(item, (tuple, list)) else item
    if not isinstance(x, Tensor):
        raise TypeError(f"the dataset's samples must be (tensor, label) pairs, got {type(x).__name__}")
    return x.unsqueeze(0)


def _resolve_device(model: nn.Module, device: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


# ------------------------------------------------------------------------------------------ checkpoint
def _rng_state(loader_gen: torch.Generator, attack_gen: torch.Generator) -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])),
        "loader": loader_gen.get_state(),
        "attack": attack_gen.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], loader_gen: torch.Generator, attack_gen: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    loader_gen.set_state(state["loader"])
    attack_gen.set_state(state["attack"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def _write_history(path: Path, method: str, config: dict[str, Any], history: list[dict[str, Any]]) -> None:
    def write(p: str) -> None:
        with open(p, "w") as fh:
            json.dump({"method": method, "config": config, "history": history}, fh, indent=1)

    _atomic_write(path, write)


# ------------------------------------------------------------------------------------------------ fit
@dataclass
class FitResult:
    """What :func:`fit` returns: the trained model, the per-epoch history and the resolved settings."""

    model: nn.Module
    history: list[dict[str, Any]]
    config: dict[str, Any]
    resumed_from: int = 0  #: the epoch the run resumed after (0: a fresh run)


def _mean(values: list[tuple[float, int]]) -> float:
    n = sum(w for _, w in values)
    return sum(v * w for v, w in values) / n


def fit(model: nn.Module, train_data: Any, test_data: Any = None, *, method: str = "lcnn", epochs: int = 200,
        batch_size: int = 128, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
        milestones: Sequence[float] = (0.75, 0.875), gradreg_weight: float | None = None,
        cure_weight: float = DEFAULT_CURE_WEIGHT, cure_h: float | None = None, cure_mode: str = "eval",
        adv_eps: float = 0.1, adv_steps: int = 3, softplus_wd_weight_decay: float | None = None,
        checkpoint: str | os.PathLike | None = None, history_path: str | os.PathLike | None = None,
        progress: bool = True, seed: int = 0, device: Any = None, prepare: bool = True,
        example_inputs: Any = None, prepare_kwargs: dict[str, Any] | None = None, eval_every: int = 1,
        num_workers: int = 0, callback: Callable[[dict[str, Any]], bool | None] | None = None) -> FitResult:
    """Train ``model`` with the paper's recipe for ``method`` (one of :data:`METHODS`).

    Args:
        model: the user's base (ReLU) model; with ``prepare=True`` (default) it is not modified:
            :func:`prepare_model` builds the model that is trained (``prepare_kwargs`` go there, e.g.
            ``softplus_beta``, ``wd_softplus_beta`` or LCNN options like ``beta0``). ``prepare=False`` trains
            ``model`` itself, as it is.
        train_data, test_data: a torch ``Dataset`` of ``(x, label)`` or an ``(X, y)`` pair of tensors. Inputs
            in [0, 1] (required by ``adversarial``; normalization belongs inside the model).
        method: ``standard``, ``lcnn``, ``gradreg``, ``lcnn+gradreg``, ``cure``, ``softplus+wd``, ``adversarial``.
        epochs, batch_size, lr, momentum, weight_decay, milestones: the recipe (200, 128, 0.1, 0.9, 5e-4,
            decays x0.1 at ``round(0.75 * epochs)`` and ``round(0.875 * epochs)``).
        gradreg_weight: weight of :func:`~lcnnify.regularizers.gradient_norm_penalty` (default: the reference's
            constant at this batch size, ``1e-3 * 1e5 / batch_size**2``).
        cure_weight, cure_h: CURE's weight (4) and finite-difference step (default 0.1 for inputs in [0, 1]).
        cure_mode: the mode of CURE's extra forwards: "eval" (CURE's reference, meant for fine-tuning a trained
            model) or "current" (train mode, batch statistics). Measured on the demo's digits CNN trained from
            scratch: "eval" diverges at weight 4 (untrained BatchNorm running statistics make the eval-mode
            network's scale explode: CURE term inf by epoch 2), "current" trains (test accuracy 0.43, 0.51,
            0.64 over the first 3 epochs). Use "current" when training from scratch.
        adv_eps, adv_steps: the l2-PGD radius and steps of adversarial training (paper: 0.1, 3).
        softplus_wd_weight_decay: the weight decay of ``softplus+wd`` (default: ``weight_decay``, as the
            reference implementation).
        checkpoint: a path; saved (atomically) after every epoch; if it exists, training resumes from it (the
            recipe arguments must match) and continues bit-for-bit on CPU. A finished checkpoint returns at once.
        history_path: a JSON file rewritten after every epoch: ``{"method", "config", "history"}``.
        progress: tqdm bars over epochs and (transient) over batches.
        seed: seeds torch, ``random`` and numpy (fresh runs only), the shuffling and the attack generators.
        device: where to train (default: the model's device).
        example_inputs: for the LCNN conversion's power-iteration warm-up (default: the first training sample).
        eval_every: evaluate on ``test_data`` every this many epochs (and after the last one).
        num_workers: DataLoader workers (0: in-process; bit-for-bit resume is only checked for 0).
        callback: called with each epoch's record after it is saved; returning ``True`` stops training (the
            checkpoint, if any, resumes it later).

    Returns:
        :class:`FitResult` ``(model, history, config, resumed_from)``; the model is returned in eval mode
        (on ``device``). Each history record holds ``epoch``
        (1-based), ``lr``, ``loss`` (mean data term), the method's penalty terms (``curvature_penalty``,
        ``gradreg``, ``cure``; see :class:`StepLoss`), ``total_loss``, ``train_acc`` (on the batches trained on,
        adversarial ones for ``adversarial``), ``test_loss`` and ``test_acc`` (``None`` when not evaluated),
        ``seconds`` (training time of the epoch), ``seconds_per_step``, ``steps`` and ``eval_seconds``.
    """
    _check_method(method)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    train_ds = _as_dataset(train_data, "train_data")
    test_ds = _as_dataset(test_data, "test_data") if test_data is not None else None
    if len(train_ds) == 0:  # type: ignore[arg-type]
        raise ValueError("train_data is empty")

    wd = weight_decay if method != "softplus+wd" or softplus_wd_weight_decay is None else softplus_wd_weight_decay
    gw = gradreg_weight_from_reference(batch_size) if gradreg_weight is None else gradreg_weight
    config: dict[str, Any] = {
        "method": method, "epochs": epochs, "batch_size": batch_size, "lr": lr, "momentum": momentum,
        "weight_decay": wd, "milestones": recipe_milestones(epochs, milestones), "seed": seed,
    }
    if method in ("gradreg", "lcnn+gradreg"):
        config["gradreg_weight"] = gw
    if method == "cure":
        config.update(cure_weight=cure_weight, cure_h=DEFAULT_CURE_H if cure_h is None else cure_h,
                      cure_mode=cure_mode)
    if method == "adversarial":
        config.update(adv_eps=adv_eps, adv_steps=adv_steps)

    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    state = None
    if ckpt_path is not None and ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if state.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"{ckpt_path} is not a lcnnify.train checkpoint (format {state.get('format')!r})")
        diff = {k: (state["config"].get(k), config[k]) for k in _RESUME_KEYS if state["config"].get(k) != config[k]}
        if diff:
            raise ValueError(f"cannot resume from {ckpt_path}: it was trained with different settings "
                             + ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in diff.items())
                             + ". Use the same arguments, or a new checkpoint path.")

    # seed before preparing: the LCNN conversion draws its power-iteration start vectors from the global RNG
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)

    if prepare:
        if example_inputs is None and method in _LCNN_METHODS:
            example_inputs = _example_batch(train_ds)
        if example_inputs is not None:
            example_inputs = example_inputs.to(_resolve_device(model, None))
        net = prepare_model(model, method, example_inputs=example_inputs, **(prepare_kwargs or {}))
    else:
        net = model
        if method in _LCNN_METHODS and not _has_lcnn_layers(net):
            warnings.warn(f"fit(method={method!r}, prepare=False): the model has no LCNN layers, so its curvature "
                          "penalty is 0", LCNNWarning, stacklevel=2)
    dev = _resolve_device(model, device)
    net.to(dev)

    optimizer = recipe_optimizer(net, lr=lr, momentum=momentum, weight_decay=wd)
    scheduler = recipe_scheduler(optimizer, epochs, milestones=milestones)
    loader_gen = torch.Generator().manual_seed(seed)
    attack_gen = torch.Generator(device=dev).manual_seed(seed + 1)
    history: list[dict[str, Any]] = []
    start = 0
    if state is not None:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = list(state["history"])
        start = int(state["epoch"])
        _set_rng_state(state["rng"], loader_gen, attack_gen)

    loader = _loader(train_ds, batch_size, loader_gen, num_workers)
    test_loader = _loader(test_ds, batch_size, None, num_workers) if test_ds is not None else None
    loss_kwargs = dict(gradreg_weight=gw, cure_weight=cure_weight, cure_h=cure_h, adv_eps=adv_eps,
                       adv_steps=adv_steps, generator=attack_gen, cure_mode=cure_mode)

    epoch_bar = tqdm(range(start, epochs), total=epochs, initial=start, desc=f"fit[{method}]",
                     disable=not progress, dynamic_ncols=True)
    for epoch in epoch_bar:
        net.train()
        current_lr = optimizer.param_groups[0]["lr"]
        sums: dict[str, list[tuple[float, int]]] = {}
        correct = seen = steps = 0
        t0 = time.perf_counter()
        batch_bar = tqdm(loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=not progress,
                         dynamic_ncols=True)
        for batch in batch_bar:
            xb, yb = batch[0].to(dev, non_blocking=True), batch[1].to(dev, non_blocking=True)
            out = train_step(net, optimizer, xb, yb, method, **loss_kwargs)
            n = yb.shape[0]
            for k, v in out.terms.items():
                sums.setdefault(k, []).append((v, n))
            correct += (out.logits.detach().argmax(1) == yb).sum().item()
            seen += n
            steps += 1
            if not math.isfinite(out.terms["total_loss"]):
                raise FloatingPointError(f"fit(method={method!r}): the loss became {out.terms['total_loss']} at "
                                         f"epoch {epoch + 1}, step {steps} (terms: {out.terms}); lower lr or the "
                                         "regularization weights")
            batch_bar.set_postfix(loss=f"{out.terms['loss']:.3f}", refresh=False)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
        scheduler.step()

        record: dict[str, Any] = {"epoch": epoch + 1, "lr": current_lr}
        record.update({k: _mean(v) for k, v in sums.items()})
        record["train_acc"] = correct / seen
        record.update(test_loss=None, test_acc=None)
        t1 = time.perf_counter()
        if test_loader is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs):
            ev = evaluate(net, test_loader, device=dev)
            record.update(test_loss=ev["loss"], test_acc=ev["acc"])
        record.update(seconds=seconds, seconds_per_step=seconds / max(steps, 1), steps=steps,
                      eval_seconds=time.perf_counter() - t1)
        history.append(record)
        epoch_bar.set_postfix({k: f"{record[k]:.3f}" for k in ("loss", "train_acc", "test_acc")
                               if record.get(k) is not None}, refresh=False)

        if ckpt_path is not None:
            payload = {"format": _CHECKPOINT_FORMAT, "config": config, "epoch": epoch + 1,
                       "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                       "scheduler": scheduler.state_dict(), "history": history,
                       "rng": _rng_state(loader_gen, attack_gen)}
            _atomic_write(ckpt_path, lambda p: torch.save(payload, p))
        if history_path is not None:
            _write_history(Path(history_path), method, config, history)
        if callback is not None and callback(record):
            break
    epoch_bar.close()
    net.eval()
    return FitResult(model=net, history=history, config=config, resumed_from=start)
