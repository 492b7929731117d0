"""The training loop: :func:`fit` runs a :class:`~lcnnify.train.Recipe` for one method; :func:`evaluate`.

Reproducibility: a fresh ``fit`` seeds torch, ``random`` and numpy with ``seed`` (before the model is prepared,
so the LCNN conversion's power-iteration vectors are seeded too). Shuffling and the adversarial attack use their
own ``torch.Generator``. The checkpoint (written after every epoch, :mod:`lcnnify.train.checkpoint`) holds the
model, optimizer, scheduler, epoch, history and every RNG state, so an interrupted run resumed from it
continues bit-for-bit on CPU.

Logging: with ``progress=True``, one line per epoch (loss, accuracies, lr, the beta/gamma summary) goes to
stderr. On a terminal it is printed above a live progress bar (tqdm) and stays on screen; when stderr is a
file or a pipe there are no bars (no carriage returns or escape codes in logs), only the lines.
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, TensorDataset

from .._utils import model_device, modes_preserved
from ..errors import LCNNWarning
from .checkpoint import CheckpointError, atomic_write_text, read_checkpoint, rng_state, save_checkpoint, set_rng_state
from .methods import MethodSpec, get_method, has_lcnn_layers, prepare_model, train_step
from .recipe import Recipe, get_recipe, recipe_optimizer, recipe_scheduler

__all__ = ["fit", "FitResult", "evaluate", "lcnn_parameter_summary"]

# config keys that may differ when resuming (they do not change what is trained)
_FREE_ON_RESUME = ("seed",)


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


def _example_batch(ds: Dataset, size: int = 256) -> Tensor:
    """The first ``size`` training inputs: the conversion warms the spectral norms up at their shape, and
    ``preserve_function`` sets beta and gamma from their activation statistics (one image is too few)."""
    xs = []
    for i in range(min(size, len(ds))):  # type: ignore[arg-type]
        item = ds[i]
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, Tensor):
            raise TypeError(f"the dataset's samples must be (tensor, label) pairs, got {type(x).__name__}")
        xs.append(x)
    return torch.stack(xs)


def _resolve_device(model: nn.Module, device: Any) -> torch.device:
    return torch.device(device) if device is not None else model_device(model)


# ------------------------------------------------------------------------------------------- evaluate
@torch.no_grad()
def evaluate(model: nn.Module, data: Any, *, batch_size: int = 256, device: Any = None) -> dict[str, float]:
    """Eval-mode mean cross-entropy and accuracy over ``data`` (a Dataset, an (X, y) pair or a DataLoader).

    The model's (and every submodule's) mode is restored afterwards.
    """
    device = _resolve_device(model, device)
    loader = data if isinstance(data, DataLoader) else _loader(_as_dataset(data, "data"), batch_size, None)
    total, correct, loss = 0, 0, 0.0
    with modes_preserved(model, training=False):
        for batch in loader:
            xb, yb = batch[0].to(device), batch[1].to(device)
            logits = model(xb)
            loss += F.cross_entropy(logits, yb, reduction="sum").item()
            correct += (logits.argmax(1) == yb).sum().item()
            total += yb.shape[0]
    if total == 0:
        raise ValueError("evaluate(): the data is empty")
    return {"loss": loss / total, "acc": correct / total}


def _summary(values: Sequence[float]) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return {"min": float(t.min()), "median": float(t.quantile(0.5)), "max": float(t.max())}


@torch.no_grad()
def lcnn_parameter_summary(model: nn.Module) -> dict[str, dict[str, float]]:
    """Min / median / max of every centered-softplus beta (each channel of a per-channel beta counts) and of
    every gamma-Lipschitz BatchNorm's gamma; ``{}`` for a model without LCNN layers."""
    from ..nn import CenteredSoftplus, LipschitzBatchNorm

    betas = [float(b) for m in model.modules() if isinstance(m, CenteredSoftplus) for b in m.beta.flatten()]
    gammas = [float(m.gamma) for m in model.modules() if isinstance(m, LipschitzBatchNorm)]
    out = {}
    if betas:
        out["beta"] = _summary(betas)
    if gammas:
        out["gamma"] = _summary(gammas)
    return out


# ------------------------------------------------------------------------------------------- logging
class _EpochLog:
    """One summary line per epoch on stderr; live tqdm bars only when stderr is a terminal."""

    def __init__(self, enabled: bool, desc: str, epochs: int, start: int) -> None:
        self.enabled, self.desc, self.epochs = enabled, desc, epochs
        self.stream = sys.stderr
        self.live = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = None
        if self.live:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=epochs, initial=start, desc=desc, dynamic_ncols=True, file=self.stream)

    def batches(self, loader: Iterable, epoch: int) -> Iterable:
        if not self.live:
            return loader
        from tqdm.auto import tqdm

        return tqdm(loader, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False, dynamic_ncols=True,
                    file=self.stream)

    def epoch(self, rec: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        parts = [f"loss {rec['loss']:.4f}", f"train acc {100 * rec['train_acc']:.1f}%"]
        if rec.get("test_acc") is not None:
            parts.append(f"test acc {100 * rec['test_acc']:.1f}%")
        parts.append(f"lr {rec['lr']:.3g}")
        for k in ("beta", "gamma"):
            if k in rec:
                s = rec[k]
                parts.append(f"{k} {s['min']:.3g}/{s['median']:.3g}/{s['max']:.3g}")
        parts.append(f"{rec['seconds']:.1f} s")
        line = f"{self.desc} epoch {rec['epoch']}/{self.epochs}: " + ", ".join(parts)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------------------ fit
@dataclass
class FitResult:
    """What :func:`fit` returns: the trained model, the per-epoch history and the resolved settings."""

    model: nn.Module
    history: list[dict[str, Any]]
    config: dict[str, Any]
    resumed_from: int = 0  #: the epoch the run resumed after (0: a fresh run)


def _comparable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _resume_state(path: Path | None, config: dict[str, Any]) -> dict[str, Any] | None:
    if path is None or not path.exists():
        return None
    try:
        state = read_checkpoint(path)
    except CheckpointError as exc:
        raise ValueError(str(exc)) from None
    if "training" not in state:
        raise ValueError(f"{path} is a finished model checkpoint without training state; it cannot be resumed "
                         "(use a new checkpoint path)")
    old, new = _comparable(state.get("config", {})), _comparable(config)
    diff = {k: (old.get(k), new[k]) for k in new if k not in _FREE_ON_RESUME and old.get(k) != new[k]}
    if diff:
        raise ValueError(f"cannot resume from {path}: it was trained with different settings "
                         + ", ".join(f"{k}={a!r} (now {b!r})" for k, (a, b) in diff.items())
                         + ". Use the same arguments, or a new checkpoint path.")
    return state


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _lcnn_options(rec: Recipe, given: Mapping[str, Any]) -> dict[str, Any]:
    """LCNN conversion options: ``given``, plus ``preserve_function=True`` for a recipe that asks for it and an
    LCNNConfig that has it."""
    import dataclasses

    from ..config import LCNNConfig

    opts = dict(given)
    if rec.preserve_function:
        if "preserve_function" in {f.name for f in dataclasses.fields(LCNNConfig)}:
            opts.setdefault("preserve_function", True)
        else:
            warnings.warn(f"recipe {rec.name!r} converts with preserve_function=True, which this lcnnify version "
                          "does not have: the model is converted without it (its accuracy drops at conversion "
                          "and is regained by the fine-tuning)", LCNNWarning, stacklevel=4)
    return opts


def _build_model(model: nn.Module, spec: MethodSpec, train_ds: Dataset, prepare: bool, example_inputs: Any,
                 kwargs: Mapping[str, Any]) -> nn.Module:
    if not prepare:
        if spec.lcnn and not has_lcnn_layers(model):
            warnings.warn(f"fit(method={spec.name!r}, prepare=False): the model has no LCNN layers, so its "
                          "curvature penalty is 0", LCNNWarning, stacklevel=3)
        return model
    if spec.lcnn and example_inputs is None:
        example_inputs = _example_batch(train_ds)
    if example_inputs is not None:
        example_inputs = example_inputs.to(_resolve_device(model, None))
    return prepare_model(model, spec, example_inputs=example_inputs, **kwargs)


def _train_epoch(net: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, spec: MethodSpec,
                 rec: Recipe, epoch: int, dev: torch.device, loss_options: dict[str, Any],
                 log: _EpochLog) -> dict[str, Any]:
    """One epoch of training; returns the epoch's record (means of the loss terms weighted by batch size)."""
    net.train()
    lr = optimizer.param_groups[0]["lr"]
    sums: dict[str, float] = {}
    correct = seen = steps = 0
    steps_per_epoch = len(loader)
    scale = 1.0
    t0 = time.perf_counter()
    for batch in log.batches(loader, epoch):
        xb, yb = batch[0].to(dev, non_blocking=True), batch[1].to(dev, non_blocking=True)
        scale = rec.penalty_scale(epoch * steps_per_epoch + steps, steps_per_epoch)
        out = train_step(net, optimizer, xb, yb, spec, penalty_scale=scale, **loss_options)
        n = yb.shape[0]
        for k, v in out.terms.items():
            sums[k] = sums.get(k, 0.0) + v * n
        correct += (out.logits.detach().argmax(1) == yb).sum().item()
        seen += n
        steps += 1
        if not math.isfinite(out.terms["total_loss"]):
            raise FloatingPointError(f"fit(method={spec.name!r}): the loss became {out.terms['total_loss']} at "
                                     f"epoch {epoch + 1}, step {steps} (terms: {out.terms}); lower lr or the "
                                     "regularization weights")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    record: dict[str, Any] = {"epoch": epoch + 1, "lr": lr, **{k: v / seen for k, v in sums.items()},
                              "train_acc": correct / seen}
    if spec.curvature_penalty:
        record["penalty_scale"] = scale  # at the epoch's last step
    record.update(seconds=seconds, seconds_per_step=seconds / max(steps, 1), steps=steps)
    return record


def fit(model: nn.Module, train_data: Any, test_data: Any = None, *, method: str = "lcnn",
        recipe: str | Recipe | None = None, epochs: int | None = None, batch_size: int | None = None,
        lr: float | None = None, momentum: float | None = None, weight_decay: float | None = None,
        milestones: Sequence[float] | None = None, gradreg_weight: float | None = None,
        cure_weight: float | None = None, cure_h: float | None = None, cure_mode: str | None = None,
        adv_eps: float | None = None, adv_steps: int | None = None,
        softplus_wd_weight_decay: float | None = None, checkpoint: str | Path | None = None,
        checkpoint_meta: Mapping[str, Any] | None = None, history_path: str | Path | None = None,
        progress: bool = True, seed: int = 0, device: Any = None, prepare: bool = True,
        example_inputs: Any = None, prepare_kwargs: dict[str, Any] | None = None, eval_every: int = 1,
        num_workers: int = 0, callback: Callable[[dict[str, Any]], bool | None] | None = None) -> FitResult:
    """Train ``model`` with ``recipe`` (default: the paper's) for ``method`` (one of :data:`METHODS`).

    Args:
        model: the user's base (ReLU) model -- or a trained model, for ``recipe="finetune"``. With
            ``prepare=True`` (default) it is not modified: :func:`prepare_model` builds the model that is trained
            (``prepare_kwargs`` go there, e.g. ``softplus_beta`` or LCNN options like ``beta0``).
            ``prepare=False`` trains ``model`` itself, as it is.
        train_data, test_data: a torch ``Dataset`` of ``(x, label)`` or an ``(X, y)`` pair of tensors. Inputs
            in [0, 1] (required by ``adversarial``; normalization belongs inside the model).
        method: ``standard``, ``lcnn``, ``gradreg``, ``lcnn+gradreg``, ``cure``, ``softplus+wd``, ``adversarial``.
        recipe: ``"paper"`` (default), ``"finetune"`` or a :class:`Recipe`. The keyword arguments ``epochs``
            ... ``softplus_wd_weight_decay`` override its fields (``None``: keep the recipe's).
        checkpoint: a path; saved (atomically) after every epoch; if it exists, training resumes from it (the
            settings must match) and continues bit-for-bit on CPU. A finished checkpoint returns at once.
        checkpoint_meta: extra entries stored in the checkpoint (the CLI stores how to rebuild the model).
        history_path: a JSON file rewritten after every epoch: ``{"method", "config", "history"}``.
        progress: one summary line per epoch on stderr (above live bars on a terminal).
        seed: seeds torch, ``random`` and numpy (fresh runs only), the shuffling and the attack generators.
        device: where to train (default: the model's device).
        example_inputs: for the LCNN conversion's power-iteration warm-up (default: the first training sample).
        eval_every: evaluate on ``test_data`` every this many epochs (and after the last one).
        num_workers: DataLoader workers (0: in-process; bit-for-bit resume is only checked for 0).
        callback: called with each epoch's record after it is saved; returning ``True`` stops training (the
            checkpoint, if any, resumes it later).

    Returns:
        :class:`FitResult` ``(model, history, config, resumed_from)``; the model in eval mode on ``device``.
        Each history record holds ``epoch`` (1-based), ``lr``, ``loss`` (mean data term), the method's penalty
        terms (``curvature_penalty`` as added, ``gradreg``, ``cure``), ``total_loss``, ``train_acc``,
        ``test_loss`` and ``test_acc`` (``None`` when not evaluated), for LCNNs ``beta`` and ``gamma``
        (``{"min", "median", "max"}`` after the epoch) and ``penalty_scale``, and ``seconds``,
        ``seconds_per_step``, ``steps``, ``eval_seconds``.
    """
    spec = get_method(method)
    given = dict(epochs=epochs, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
                 milestones=milestones, gradreg_weight=gradreg_weight, cure_weight=cure_weight, cure_h=cure_h,
                 cure_mode=cure_mode, adv_eps=adv_eps, adv_steps=adv_steps,
                 softplus_wd_weight_decay=softplus_wd_weight_decay)
    rec = get_recipe(recipe).replace(**{k: v for k, v in given.items() if v is not None})
    if eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    train_ds = _as_dataset(train_data, "train_data")
    test_ds = _as_dataset(test_data, "test_data") if test_data is not None else None
    if len(train_ds) == 0:  # type: ignore[arg-type]
        raise ValueError("train_data is empty")
    config = {**rec.to_config(spec), "seed": seed}
    kwargs = dict(prepare_kwargs or {})
    if spec.lcnn and prepare and not has_lcnn_layers(model):
        kwargs = config["lcnn_options"] = _lcnn_options(rec, kwargs)  # the conversion, as recorded
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    state = _resume_state(ckpt_path, config)

    _seed_everything(seed)  # before preparing: the LCNN conversion draws its power-iteration start vectors
    net = _build_model(model, spec, train_ds, prepare, example_inputs, kwargs)
    dev = _resolve_device(model, device)
    net.to(dev)
    optimizer = recipe_optimizer(net, lr=rec.lr, momentum=rec.momentum, weight_decay=config["weight_decay"])
    scheduler = recipe_scheduler(optimizer, rec.epochs, milestones=rec.milestones, schedule=rec.schedule)
    gens = (torch.Generator().manual_seed(seed), torch.Generator(device=dev).manual_seed(seed + 1))
    history: list[dict[str, Any]] = []
    start = 0
    if state is not None:
        net.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["training"]["optimizer"])
        scheduler.load_state_dict(state["training"]["scheduler"])
        history, start = list(state["history"]), int(state["epoch"])
        set_rng_state(state["training"]["rng"], *gens)

    loader = _loader(train_ds, rec.batch_size, gens[0], num_workers)
    test_loader = _loader(test_ds, rec.batch_size, None, num_workers) if test_ds is not None else None
    loss_options = {**rec.loss_options(), "generator": gens[1]}
    log = _EpochLog(progress, f"fit[{spec.name}]", rec.epochs, start)
    try:
        for epoch in range(start, rec.epochs):
            record = _train_epoch(net, optimizer, loader, spec, rec, epoch, dev, loss_options, log)
            scheduler.step()
            record.update(lcnn_parameter_summary(net), test_loss=None, test_acc=None)
            t1 = time.perf_counter()
            if test_loader is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == rec.epochs):
                ev = evaluate(net, test_loader, device=dev)
                record.update(test_loss=ev["loss"], test_acc=ev["acc"])
            record["eval_seconds"] = time.perf_counter() - t1
            history.append(record)
            log.epoch(record)
            if ckpt_path is not None:
                save_checkpoint(ckpt_path, net.state_dict(), **dict(checkpoint_meta or {}), method=spec.name,
                                config=config, epoch=epoch + 1, history=history, trained=True,
                                training={"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                          "rng": rng_state(*gens)})
            if history_path is not None:
                atomic_write_text(history_path, json.dumps({"method": spec.name, "config": config,
                                                            "history": history}, indent=1, default=str))
            if callback is not None and callback(record):
                break
    finally:
        log.close()
    net.eval()
    return FitResult(model=net, history=history, config=config, resumed_from=start)
