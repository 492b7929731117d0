"""The ``lcnnify`` command (also ``python -m lcnnify``).

    lcnnify demo [--out DIR] [--quick]              Fig. 1, Tables 1-3 and Fig. 2 of the paper in miniature
    lcnnify convert timm:resnet18 [--input-size 3 224 224] [--num-classes N] [--out converted.pt]
    lcnnify train --model cifar_resnet18 --dataset cifar10 --method lcnn [--epochs 200] [--out run.pt]
    lcnnify train --recipe finetune --init trained.pt --dataset digits   a trained model -> a low-curvature one
    lcnnify evaluate run.pt [--dataset digits]      Table 1/2/3 rows of a trained model

Outputs go where ``--out`` says; the defaults are under ``./runs/`` (``runs/demo``, ``runs/DATASET-METHOD.pt``),
never loose files in the working directory.

Anticipated errors (unknown model, missing dataset files, bad input size, unwritable output, unreadable
checkpoint, a model that cannot be converted) print ``lcnnify: error: <message>`` on stderr and exit with status
2 (bad input) or 1 (a failure while running); anything else is a bug and shows its traceback.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .train.checkpoint import FORMAT as CHECKPOINT_FORMAT

__all__ = ["main", "build_parser", "CLIError", "CHECKPOINT_FORMAT", "RUNS_DIR"]

PROG = "lcnnify"
#: Where outputs go by default (listed in the project's .gitignore).
RUNS_DIR = "runs"


class CLIError(Exception):
    """An anticipated user error: printed as ``lcnnify: error: <message>``, exit status ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------------------------ helpers
def _number(kind: type, minimum: float, what: str) -> Callable[[str], Any]:
    """An argparse ``type``: parse ``kind`` (int or float) and require a finite value >= ``minimum``."""

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (v >= minimum and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    return parse


_positive_int = _number(int, 1, "a positive integer")
_positive_float = _number(float, math.ulp(0.0), "a positive number")
_nonneg_float = _number(float, 0.0, "a number >= 0")


def _gamma0(text: str) -> float:
    v = _positive_float(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"gamma must be >= 1 (paper §3.4.2), got {text!r}")
    return v


def _input_size(values: Sequence[int] | None, spec: str, default: Sequence[int]) -> tuple[int, ...]:
    """Validate ``--input-size``: C H W (3 positive integers); vector models (``mlp``) take any number."""
    from .models import parse_model_spec

    if values is None:
        return tuple(default)
    shape = tuple(values)
    is_vector_model = parse_model_spec(spec) == ("builtin", "mlp")
    if not is_vector_model and len(shape) != 3:
        raise CLIError(f"--input-size takes 3 numbers C H W (channels, height, width), e.g. --input-size 3 224 "
                       f"224; got {len(shape)}: {' '.join(map(str, shape))}")
    bad = [s for s in shape if s < 1]
    if bad:
        raise CLIError(f"--input-size: every dimension must be a positive integer, got "
                       f"{' '.join(map(str, shape))}")
    if is_vector_model is False and shape[0] > 64:
        raise CLIError(f"--input-size {' '.join(map(str, shape))}: {shape[0]} input channels? The order is C H W "
                       "(channels first), e.g. --input-size 3 224 224")
    return shape


def _check_writable_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """Create the parent directory if needed and check that a file can be written there (before long work)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise CLIError(f"{what} {str(p)!r} is a directory; give a file name, e.g. {str(p / 'model.pt')!r}")
    parent = p.parent
    for anc in (parent, *parent.parents):
        if anc.exists():
            if not anc.is_dir():
                raise CLIError(f"cannot write the {what} {str(p)!r}: {str(anc)!r} is a file, not a directory")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".lcnnify-write-test-"):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise CLIError(f"cannot write the {what} {str(p)!r}: {reason} ({str(parent)!r} is not a writable "
                       "directory)") from None
    return p


def _save(path: Path, state_dict: Any, **meta: Any) -> None:
    """Write a final checkpoint (the one format of :mod:`lcnnify.train.checkpoint`, no training state)."""
    from .train.checkpoint import save_checkpoint

    try:
        save_checkpoint(path, state_dict, **meta)
    except OSError as exc:
        raise CLIError(f"cannot write {str(path)!r}: {exc.strerror or exc}", code=1) from None


def _default_device(name: str | None) -> str:
    import torch

    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise CLIError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _build_model(spec: str, num_classes: int, shape: Sequence[int], width: int | None = None) -> Any:
    from .models import UnknownModelError, create_model

    try:
        return create_model(spec, num_classes=num_classes, input_shape=shape, width=width)
    except UnknownModelError as exc:
        raise CLIError(str(exc)) from None


def _check_accepts(model: Any, spec: str, shape: Sequence[int]) -> None:
    """Run the model once on zeros of ``shape``: a clear message instead of a deep traceback when the input size
    does not fit the architecture (e.g. too small for its down-sampling)."""
    import torch

    from ._utils import model_device, model_dtype, modes_preserved

    try:
        with modes_preserved(model, training=False), torch.no_grad():
            model(torch.zeros(1, *shape, device=model_device(model), dtype=model_dtype(model)))
    except Exception as exc:  # noqa: BLE001 - any failure here means: this input size does not fit the model
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CLIError(f"{spec} does not accept inputs of size {' '.join(map(str, shape))} (C H W): "
                       f"{type(exc).__name__}: {first}. Use a larger --input-size / --image-size or the number of "
                       "channels the model expects.") from None


def _default_input_size(model: Any, spec: str) -> tuple[int, ...]:
    from .models import parse_model_spec

    source, name = parse_model_spec(spec)
    if source == "timm":
        cfg = getattr(model, "pretrained_cfg", None) or {}
        size = cfg.get("input_size") if isinstance(cfg, dict) else None
        return tuple(size) if size else (3, 224, 224)
    if source == "torchvision":
        return (3, 299, 299) if name.startswith("inception") else (3, 224, 224)
    if name.startswith("cifar_"):
        return (3, 32, 32)
    return (2,) if name == "mlp" else (1, 8, 8)


def _compute_bound(model: Any, shape: Sequence[int], mode: str) -> tuple[Any, str | None]:
    """(bound, None) or (None, reason). ``mode``: ``certified`` or ``estimate`` (power iteration, faster)."""
    try:
        from . import bound

        return bound(model, tuple(shape), certify=(mode == "certified")), None
    except Exception as exc:  # noqa: BLE001 - the bound is extra information; say why it is missing
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return None, f"{type(exc).__name__}{': ' + msg if msg else ''}"


def _bound_lines(model: Any, shape: Sequence[int], mode: str) -> list[str]:
    """The data-free curvature bound (lcnnify.bound), or ``bound: n/a (reason)`` when it cannot be computed."""
    if mode == "none":
        return ["bound: n/a (skipped: --bound none)"]
    b, why = _compute_bound(model, shape, mode)
    if b is None:
        return [f"bound: n/a ({why})"]
    lines = str(b).strip().splitlines() or ["?"]
    return [f"bound: {lines[0]}", *lines[1:]]


def _bound_dict(model: Any, shape: Sequence[int], mode: str) -> dict[str, Any]:
    if mode == "none":
        return {"available": False, "reason": "skipped (--bound none)"}
    b, why = _compute_bound(model, shape, mode)
    if b is None:
        return {"available": False, "reason": why}
    out: dict[str, Any] = {"available": True, "mode": mode}
    for k in ("lipschitz", "logit_hessian", "loss_hessian", "theorem1", "certified", "reasons", "notes",
              "seconds"):
        if hasattr(b, k):
            v = getattr(b, k)
            out[k] = list(v) if isinstance(v, tuple) else v
    return out


# ------------------------------------------------------------------------------------------------ demo
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, check_output_dir, run_demo

    try:
        check_output_dir(args.out)
    except OSError as exc:
        raise CLIError(exc.strerror or str(exc)) from None
    cfg = DemoConfig.quick_config() if args.quick else DemoConfig()
    overrides = {k: v for k, v in (("seeds", args.seeds), ("epochs", args.epochs), ("workers", args.workers))
                 if v is not None}
    if "workers" not in overrides and not args.quick:
        try:
            usable = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover
            usable = os.cpu_count() or 1
        overrides["workers"] = max(1, min(cfg.workers, usable))
    run_demo(args.out, config=cfg, progress=not args.no_progress, **overrides)
    return 0


# --------------------------------------------------------------------------------------------- convert
def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from .convert import lcnnify
    from .models import parse_model_spec

    out = _check_writable_file(args.out, "output file") if args.out else None
    try:
        source, name = parse_model_spec(args.model)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    num_classes = args.num_classes if args.num_classes is not None else (10 if source == "builtin" else 1000)
    if args.input_size is not None:  # validate its form before building a (possibly large) model
        shape = _input_size(args.input_size, args.model, ())
        model = _build_model(args.model, num_classes, shape, args.width)
    else:
        build = (3, 224, 224) if source != "builtin" else ((2,) if name == "mlp" else
                                                          (3, 32, 32) if name.startswith("cifar_") else (1, 8, 8))
        model = _build_model(args.model, num_classes, build, args.width)
        shape = _default_input_size(model, args.model)
    _check_accepts(model, args.model, shape)
    overrides = {k: v for k, v in (("beta0", args.beta0), ("gamma0", args.gamma0)) if v is not None}
    t0 = time.perf_counter()
    converted = lcnnify(model, example_inputs=torch.zeros(1, *shape), **overrides)
    seconds = time.perf_counter() - t0
    report = converted.lcnn_report
    n_params = sum(p.numel() for p in converted.parameters())
    if args.json:
        print(json.dumps({"model": args.model, "input_size": list(shape), "num_classes": num_classes,
                          "parameters": n_params, "conversion_seconds": seconds, "report": report.to_dict(),
                          "bound": _bound_dict(converted, shape, args.bound)}, indent=2, default=str))
    else:
        print(f"{args.model} -> LCNN  (input size {' '.join(map(str, shape))}, {num_classes} classes, "
              f"{n_params:,} parameters, converted in {seconds:.1f} s)")
        print()
        print(report)
        print()
        for line in _bound_lines(converted, shape, args.bound):
            print(line)
    if out is not None:
        _save(out, converted.state_dict(), model=args.model, method="lcnn", num_classes=num_classes,
              input_size=list(shape), width=args.width, lcnn_overrides=overrides, report=report.to_dict(),
              trained=False)
        print(f"\nsaved the converted model to {out} (load it with `lcnnify evaluate {out} --dataset ...`, "
              "or rebuild it with lcnnify(model, example_inputs=...) and load_state_dict(ckpt['state_dict']))",
              file=sys.stderr if args.json else sys.stdout)
    return 0


# ----------------------------------------------------------------------------------------------- data
def _dataset_args(name: str, data_dir: str | None, image_size: int | None) -> tuple[int, tuple[int, ...]]:
    from . import data

    try:
        shape = data.input_shape(name, image_size)
    except ValueError as exc:
        raise CLIError(f"{exc} -- pass --image-size N") from None
    return data.num_classes(name, data_dir), shape


def _subset(ds: Any, n: int | None) -> Any:
    if n is None or n >= len(ds):
        return ds
    import torch

    if isinstance(ds, torch.utils.data.TensorDataset):
        return torch.utils.data.TensorDataset(*(t[:n] for t in ds.tensors))
    return torch.utils.data.Subset(ds, range(n))


def _check_data_dir(data_dir: str | None) -> None:
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        from .errors import DatasetNotFoundError

        raise DatasetNotFoundError(f"data directory {data_dir!r} does not exist (lcnnify never downloads; put the "
                                   "dataset files there first -- see `lcnnify train --help` for the layouts)")


# ----------------------------------------------------------------------------------------------- train
def _lcnn_overrides(args: argparse.Namespace) -> dict[str, float]:
    """The LCNN conversion options given on the command line (beta0, gamma0, lambda_beta, lambda_gamma)."""
    return {k: v for k in ("beta0", "gamma0", "lambda_beta", "lambda_gamma")
            if (v := getattr(args, k, None)) is not None}


def _recipe(args: argparse.Namespace, epochs: int | None) -> Any:
    """The training recipe: the ``--recipe`` preset with the flags given on the command line."""
    from .train import get_recipe

    given = {"epochs": epochs, "batch_size": args.batch_size, "lr": args.lr, "momentum": args.momentum,
             "weight_decay": args.weight_decay, "gradreg_weight": args.gradreg_weight}
    try:
        return get_recipe(args.recipe).replace(**{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def _load_init(path: str, base: Any, spec: str, device: str) -> Any:
    """The trained model to start from (``--init``): a lcnnify checkpoint of the same architecture, or a plain
    ``state_dict`` of the base model (e.g. pretrained weights; ``{"state_dict": ...}`` is unwrapped too)."""
    import torch

    from .train import METHOD_SPECS
    from .train.checkpoint import read_checkpoint

    p = Path(path).expanduser()
    if not p.is_file():
        raise CLIError(f"--init: no checkpoint file {str(p)!r}")
    try:
        raw = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure: not a loadable weights file
        raise CLIError(f"--init: cannot read {str(p)!r} as a checkpoint ({type(exc).__name__})") from None
    if isinstance(raw, dict) and "format" in raw:
        ckpt = read_checkpoint(p)  # checks the format
        if ckpt.get("model") not in (None, spec):
            raise CLIError(f"--init {str(p)!r} holds a {ckpt['model']} model, not {spec} (pass --model "
                           f"{ckpt['model']})")
        spec_ = METHOD_SPECS.get(ckpt.get("method", ""))
        if spec_ is not None and spec_.lcnn:  # already an LCNN: continue from it as it is
            return load_checkpoint(p, device)[0]
        state = ckpt["state_dict"]  # a softplus baseline has the base model's parameter names
    else:
        state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
        if not isinstance(state, dict):
            raise CLIError(f"--init {str(p)!r} is neither a lcnnify checkpoint nor a state_dict")
    try:
        base.load_state_dict(state)
    except RuntimeError as exc:
        raise CLIError(f"--init {str(p)!r}: the weights do not fit {spec}: {str(exc).splitlines()[0]}") from None
    return base


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from . import data
    from .train import METHODS, fit

    if args.method not in METHODS:  # argparse choices already checks; keep for programmatic calls
        raise CLIError(f"unknown method {args.method!r}; choose one of {', '.join(METHODS)}")
    if args.recipe == "finetune" and args.init is None:
        raise CLIError("--recipe finetune starts from a trained model: pass --init CHECKPOINT (a checkpoint of "
                       "`lcnnify train`, or a state_dict of the base model)")
    rec = _recipe(args, args.epochs if args.epochs is not None else (1 if args.quick else None))
    max_train = args.max_train_samples if args.max_train_samples is not None else (512 if args.quick else None)
    max_test = args.max_test_samples if args.max_test_samples is not None else (256 if args.quick else None)
    suffix = "" if args.recipe == "paper" else f"-{args.recipe}"
    out = _check_writable_file(args.out or Path(RUNS_DIR) / f"{args.dataset}-{args.method.replace('+', '_')}"
                               f"{suffix}.pt", "checkpoint")
    _check_data_dir(args.data_dir)
    num_classes, shape = _dataset_args(args.dataset, args.data_dir, args.image_size)
    augment = not args.no_augment and args.dataset != "digits"
    train_ds = _subset(data.load_dataset(args.dataset, args.data_dir, train=True, image_size=args.image_size,
                                         augment=augment), max_train)
    test_ds = _subset(data.load_dataset(args.dataset, args.data_dir, train=False, image_size=args.image_size),
                      max_test)
    device = _default_device(args.device)
    torch.manual_seed(args.seed)
    base = _build_model(args.model, num_classes, shape, args.width)
    _check_accepts(base, args.model, shape)
    if args.init is not None:
        base = _load_init(args.init, base, args.model, device)
    base.to(device)
    overrides = _lcnn_overrides(args)
    print(f"training {args.model} on {args.dataset} ({len(train_ds)} train / {len(test_ds)} test, input "
          f"{' '.join(map(str, shape))}, {num_classes} classes) with method {args.method!r}, recipe {rec.name!r}"
          + (f" from {args.init}" if args.init else "") + f": {rec.epochs} epochs, batch {rec.batch_size}, SGD lr "
          f"{rec.lr} momentum {rec.momentum} ("
          + ("x0.1 at 75% and 87.5% of the epochs" if rec.schedule == "step" else f"{rec.schedule} schedule")
          + f"), weight decay {rec.weight_decay}" + (f", LCNN options {overrides}" if overrides else "")
          + f"{', augmentation' if augment else ''}, device {device}", flush=True)
    partial = out.with_name(out.name + ".partial")
    history = out.with_name(out.name + ".history.json")
    if partial.exists():
        print(f"resuming from {partial}", flush=True)
    meta = {"model": args.model, "dataset": args.dataset, "image_size": args.image_size,
            "num_classes": num_classes, "input_size": list(shape), "width": args.width, "lcnn_overrides": overrides}
    try:
        res = fit(base, train_ds, test_ds, method=args.method, recipe=rec, seed=args.seed, device=device,
                  checkpoint=partial, checkpoint_meta=meta, history_path=history, progress=not args.no_progress,
                  num_workers=args.num_workers, prepare_kwargs=overrides or None)
    except (ValueError, TypeError) as exc:  # fit's argument checks, resume mismatches, options for a baseline
        raise CLIError(str(exc)) from None
    except FloatingPointError as exc:
        raise CLIError(str(exc), code=1) from None
    except KeyboardInterrupt:
        print(f"\ninterrupted; run the same command again to resume from {partial}", file=sys.stderr)
        return 130
    model = res.model.to("cpu")
    last = res.history[-1]
    secs = [h["seconds"] for h in res.history]
    meta["lcnn_overrides"] = res.config.get("lcnn_options", overrides)
    _save(out, model.state_dict(), **meta, method=args.method, history=res.history, config=res.config,
          epoch=len(res.history), trained=True)
    partial.unlink(missing_ok=True)
    acc = last.get("test_acc")
    print(f"done: train loss {last['loss']:.4f}, train acc {100 * last['train_acc']:.2f}%"
          + (f", test acc {100 * acc:.2f}%" if acc is not None else "")
          + f", {sum(secs) / len(secs):.2f} s/epoch")
    print(f"saved {out} (history: {history}); evaluate it with: lcnnify evaluate {out}")
    return 0


# -------------------------------------------------------------------------------------------- evaluate
def load_checkpoint(path: str | os.PathLike, device: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """Rebuild the model of a ``lcnnify train`` / ``lcnnify convert --out`` checkpoint; returns (model, ckpt)."""
    import torch

    from .train import METHODS, prepare_model
    from .train.checkpoint import CheckpointError, read_checkpoint

    p = Path(path).expanduser()
    try:
        ckpt = read_checkpoint(p)
    except CheckpointError as exc:
        raise CLIError(str(exc)) from None
    if ckpt.get("model") is None or "input_size" not in ckpt:
        raise CLIError(f"{str(p)!r} was written by lcnnify.train.fit directly and does not say how to rebuild "
                       "the model; rebuild it yourself and load ckpt['state_dict'] (or train with `lcnnify train`)")
    method = ckpt.get("method", "lcnn")
    if method not in METHODS:
        raise CLIError(f"{str(p)!r}: unknown method {method!r} in the checkpoint")
    shape = tuple(ckpt["input_size"])
    base = _build_model(ckpt["model"], int(ckpt["num_classes"]), shape, ckpt.get("width"))
    model = prepare_model(base, method, example_inputs=torch.zeros(1, *shape), **ckpt.get("lcnn_overrides", {}))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise CLIError(f"{str(p)!r}: the saved weights do not fit {ckpt['model']} ({method}): "
                       f"{str(exc).splitlines()[0]}", code=1) from None
    return model.to(device).eval(), ckpt


def _tensors(ds: Any) -> tuple[Any, Any]:
    import torch

    if isinstance(ds, torch.utils.data.TensorDataset):
        return ds.tensors[0], ds.tensors[1]
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(list(xs)), torch.as_tensor(ys)


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from . import data
    from .metrics import evaluate_geometry, robust_accuracy, train_test_discrepancy
    from .train import METHOD_LABELS
    from .train import evaluate as eval_acc
    from .train.tables import PAPER_EPS, format_table

    json_out = _check_writable_file(args.json, "JSON output") if args.json else None
    device = _default_device(args.device)
    model, ckpt = load_checkpoint(args.checkpoint, device)
    dataset = args.dataset or ckpt.get("dataset")
    if dataset is None:
        raise CLIError(f"{args.checkpoint} does not say which dataset it was trained on; pass --dataset")
    image_size = args.image_size if args.image_size is not None else ckpt.get("image_size")
    _check_data_dir(args.data_dir)
    num_classes, shape = _dataset_args(dataset, args.data_dir, image_size)
    if tuple(shape) != tuple(ckpt["input_size"]) or num_classes != int(ckpt["num_classes"]):
        raise CLIError(f"{args.checkpoint} is a model for inputs {tuple(ckpt['input_size'])} with "
                       f"{ckpt['num_classes']} classes, but {dataset} gives inputs {tuple(shape)} with {num_classes} "
                       "classes (check --dataset / --image-size)")
    n = args.max_samples if args.max_samples is not None else (64 if args.quick else 1000)
    n_train = args.max_train_samples if args.max_train_samples is not None else n
    iters = args.lanczos_iters if args.lanczos_iters is not None else (5 if args.quick else 20)
    steps = args.pgd_steps if args.pgd_steps is not None else (2 if args.quick else 10)
    eps = tuple(args.eps) if args.eps else PAPER_EPS
    test_ds = _subset(data.load_dataset(dataset, args.data_dir, train=False, image_size=image_size), n)
    train_ds = _subset(data.load_dataset(dataset, args.data_dir, train=True, image_size=image_size), n_train)
    x, y = _tensors(test_ds)
    xtr, ytr = _tensors(train_ds)
    progress = not args.no_progress
    label = f"{ckpt['model']} [{METHOD_LABELS.get(ckpt['method'], ckpt['method'])}]"
    print(f"evaluating {label} from {args.checkpoint} on {dataset} ({len(y)} test / {len(ytr)} train samples for "
          f"the geometry, {len(y)} for PGD with {steps} steps; Hessian norms by {iters}-step Lanczos)", flush=True)
    if not ckpt.get("trained", True):
        print("note: this checkpoint was converted but never trained (lcnnify convert)", flush=True)
    acc = eval_acc(model, (x, y), device=device)["acc"]
    gen = torch.Generator().manual_seed(0)
    geo = evaluate_geometry(model, (x, y), iters=iters, progress=progress, generator=gen)
    geo_tr = evaluate_geometry(model, (xtr, ytr), iters=iters, progress=progress, generator=gen)
    disc = train_test_discrepancy(geo_tr, geo)
    robust = robust_accuracy(model, (x, y), eps, steps=steps, progress=progress,
                             generator=torch.Generator().manual_seed(1))
    pm = lambda d: f"{d['mean']:.4g} ± {d['std']:.3g}"  # noqa: E731
    print("\nTable 1 row (± is the std over samples)")
    print(format_table(["Model", "E||grad f||", "E||Hess f||", "E C_f", "Accuracy (%)"],
                       [[label, pm(geo["grad_norm"]), pm(geo["hessian_norm"]), pm(geo["curvature"]),
                         f"{100 * acc:.2f}"]]))
    print("\nTable 2 row: l2-PGD robust accuracy (%), eps on inputs in [0, 1]")
    print(format_table(["Model", "Acc. (%)", *[f"eps={e:g}" for e in eps]],
                       [[label, f"{100 * acc:.2f}", *[f"{100 * robust[float(e)]:.2f}" for e in eps]]]))
    print("\nTable 3 row: train-test discrepancy |g(test) - g(train)| / g(test)")
    print(format_table(["Model", "Δtt E||grad f||", "Δtt E||Hess f||", "Δtt E C_f"],
                       [[label, f"{disc['grad_norm']:.4g}", f"{disc['hessian_norm']:.4g}",
                         f"{disc['curvature']:.4g}"]]))
    if json_out is not None:
        result = {"checkpoint": str(args.checkpoint), "model": ckpt["model"], "method": ckpt["method"],
                  "dataset": dataset, "test_samples": len(y), "train_samples": len(ytr), "accuracy": acc,
                  "geometry_test": {k: geo[k] for k in ("grad_norm", "hessian_norm", "curvature", "accuracy")},
                  "geometry_train": {k: geo_tr[k] for k in ("grad_norm", "hessian_norm", "curvature", "accuracy")},
                  "discrepancy": disc, "robust_accuracy": {str(k): v for k, v in robust.items()},
                  "pgd_steps": steps, "lanczos_iters": iters}
        try:
            json_out.write_text(json.dumps(result, indent=1))
        except OSError as exc:
            raise CLIError(f"cannot write {str(json_out)!r}: {exc.strerror or exc}", code=1) from None
        print(f"\nwrote {json_out}")
    return 0


# ---------------------------------------------------------------------------------------------- parser
_DATA_HELP = """dataset layouts under --data-dir (default $LCNNIFY_DATA_DIR or ./data; nothing is downloaded):
  cifar10:     DIR/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}  (cifar-10-python.tar.gz)
  cifar100:    DIR/cifar-100-python/{train, test, meta}                             (cifar-100-python.tar.gz)
  svhn:        DIR/train_32x32.mat, DIR/test_32x32.mat
  imagefolder: DIR/train/<class>/<image> and DIR/val/<class>/<image> (or DIR/test); needs --image-size
  digits:      no files (scikit-learn's 1797 8x8 handwritten digits)"""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .data import DATASETS
    from .train import METHODS, RECIPES

    parser = argparse.ArgumentParser(
        prog=PROG, description="Turn any CNN into a Low-Curvature Neural Network (Srinivas et al., NeurIPS 2022).",
        epilog="Run `lcnnify demo` first: it reproduces the paper's Fig. 1, Tables 1-3 and Fig. 2 in miniature "
               "on a CPU in a few minutes, with no download.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser("demo", help="the paper's Fig. 1, Tables 1-3, Fig. 2 in miniature (two moons, digits)",
                       description="Fig. 1 (two moons: standard vs LCNN decision boundaries) and Tables 1-3 + "
                                   "Fig. 2 on scikit-learn's digits with a small CNN converted by lcnnify, all "
                                   "seven training methods of the paper, several seeds. Writes results.json, "
                                   "results.md and two PNGs to --out and prints the tables.")
    d.add_argument("--out", "-o", default=f"{RUNS_DIR}/demo", help=f"output directory (default: ./{RUNS_DIR}/demo)")
    d.add_argument("--quick", action="store_true", help="a tiny version (seconds; for tests, numbers meaningless)")
    d.add_argument("--seeds", type=_positive_int, help="seeds per method (default 3; quick 2)")
    d.add_argument("--epochs", type=_positive_int, help="training epochs on digits (default 12; quick 1)")
    d.add_argument("--workers", type=_positive_int,
                   help="parallel single-threaded training processes (default: min(2, usable CPUs); quick 1)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("convert", help="convert a timm / torchvision / built-in model and print the report",
                       description="Build MODEL (random weights, nothing downloaded), convert it with "
                                   "lcnnify(), print the conversion report and the data-free curvature bound.")
    c.add_argument("model", help="timm:NAME, torchvision:NAME, small_cnn or mlp")
    c.add_argument("--input-size", nargs="+", type=int, metavar="N",
                   help="C H W of one input (default: the model's, e.g. 3 224 224)")
    c.add_argument("--num-classes", type=_positive_int, help="classifier outputs (default 1000; built-in 10)")
    c.add_argument("--out", "-o", help="save {state_dict, model, num_classes, input_size, ...} to this file")
    c.add_argument("--beta0", type=_positive_float, help="initial centered-softplus beta (default 5)")
    c.add_argument("--gamma0", type=_gamma0, help="initial BatchNorm gamma, >= 1 (default 10)")
    c.add_argument("--width", type=_positive_int, help=argparse.SUPPRESS)
    c.add_argument("--bound", choices=("certified", "estimate", "none"), default="certified",
                   help="the data-free curvature bound: certified operator norms (default; slow for big models), "
                        "power-iteration estimates (faster, not certified) or none")
    c.add_argument("--json", action="store_true", help="print the report and the bound as JSON")
    c.set_defaults(func=cmd_convert)

    t = sub.add_parser("train", help="train a model with one of the paper's methods (paper recipe)",
                       description="Train MODEL on a dataset with the paper's recipe (§5: SGD momentum 0.9, lr 0.1 "
                                   "x0.1 at 75% and 87.5% of the epochs, weight decay 5e-4, batch 128, 200 "
                                   "epochs) and one of its seven methods, or fine-tune a trained model into an "
                                   "LCNN (--recipe finetune --init CKPT: 20 epochs, lr 0.01, cosine, the curvature "
                                   "penalty ramped up over the first half); one summary line per epoch; saves a "
                                   "checkpoint for `lcnnify evaluate`. An interrupted run resumes from OUT.partial.",
                       epilog=_DATA_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--model", default="small_cnn",
                   help="timm:NAME, torchvision:NAME, or built-in: small_cnn (default), cifar_resnet18, "
                        "cifar_resnet34, cifar_vgg11 (the paper's §5 architectures, CIFAR form)")
    t.add_argument("--dataset", required=True, choices=DATASETS)
    t.add_argument("--data-dir", help="dataset root (default $LCNNIFY_DATA_DIR or ./data)")
    t.add_argument("--method", default="lcnn", choices=METHODS, help="training method (default lcnn)")
    t.add_argument("--recipe", default="paper", choices=tuple(RECIPES),
                   help="paper (default: from scratch) or finetune (from --init, a trained model)")
    t.add_argument("--init", metavar="CKPT", help="start from these weights: a checkpoint of `lcnnify train`, or a "
                                                  "state_dict of the base model (e.g. pretrained weights)")
    t.add_argument("--epochs", type=_positive_int, help="default: the recipe's (paper 200, finetune 20); --quick: 1")
    t.add_argument("--batch-size", type=_positive_int, help="default 128")
    t.add_argument("--lr", type=_positive_float, help="initial learning rate (default: paper 0.1, finetune 0.01)")
    t.add_argument("--momentum", type=_nonneg_float, help="SGD momentum (default 0.9)")
    t.add_argument("--weight-decay", type=_nonneg_float, help="default 5e-4 (never on beta and gamma)")
    t.add_argument("--lambda-beta", type=_nonneg_float,
                   help="weight of sum(beta) in the curvature penalty (LCNN methods; default 1e-2)")
    t.add_argument("--lambda-gamma", type=_nonneg_float,
                   help="weight of sum(log gamma) in the curvature penalty (LCNN methods; default 1e-2)")
    t.add_argument("--gradreg-weight", type=_nonneg_float,
                   help="weight of the gradient-norm penalty (gradreg methods; default 1e-3 * 1e5 / batch_size^2, "
                        "the reference's constant)")
    t.add_argument("--beta0", type=_positive_float, help="initial centered-softplus beta (LCNN methods; default 5)")
    t.add_argument("--gamma0", type=_gamma0, help="initial BatchNorm gamma, >= 1 (LCNN methods; default 10)")
    t.add_argument("--image-size", type=_positive_int, help="resize images to N x N (default: native size)")
    t.add_argument("--no-augment", action="store_true", help="no random crop / flip (digits: never augmented)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--width", type=_positive_int,
                   help="width of a built-in model (default: small_cnn 16, cifar_* 64 as the paper)")
    t.add_argument("--max-train-samples", type=_positive_int, help="train on the first N samples only")
    t.add_argument("--max-test-samples", type=_positive_int, help="evaluate on the first N test samples only")
    t.add_argument("--quick", action="store_true", help="1 epoch on 512 train / 256 test samples (a smoke test)")
    t.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    t.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    t.add_argument("--out", "-o", help=f"checkpoint file (default: {RUNS_DIR}/DATASET-METHOD.pt)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="Table 1/2/3 rows (geometry, PGD robustness, train-test discrepancy)",
                       description="Load a checkpoint of `lcnnify train` (or `lcnnify convert --out`) and print its "
                                   "rows of the paper's Table 1 (gradient norm, Hessian norm, normalized curvature, "
                                   "accuracy), Table 2 (l2-PGD robust accuracy) and Table 3 (train-test "
                                   "discrepancy).", epilog=_DATA_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("checkpoint")
    e.add_argument("--dataset", choices=DATASETS, help="default: the dataset the checkpoint was trained on")
    e.add_argument("--data-dir")
    e.add_argument("--image-size", type=_positive_int, help="default: the checkpoint's")
    e.add_argument("--max-samples", type=_positive_int, help="test samples (default 1000; quick 64)")
    e.add_argument("--max-train-samples", type=_positive_int, help="train samples for Table 3 (default: as test)")
    e.add_argument("--eps", type=_nonneg_float, nargs="+", help="l2 PGD radii (default 0.05 0.1 0.15 0.2)")
    e.add_argument("--pgd-steps", type=_positive_int, help="default 10 (quick 2)")
    e.add_argument("--lanczos-iters", type=_positive_int, help="Hessian-vector products per sample (default 20)")
    e.add_argument("--quick", action="store_true", help="64 samples, 5 Lanczos steps, 2 PGD steps")
    e.add_argument("--device")
    e.add_argument("--json", help="also write the numbers to this JSON file")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_evaluate)
    return parser


def _error(message: str) -> None:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the ``lcnnify`` script exits with it)."""
    from .errors import ConversionError, DatasetNotFoundError, LCNNError
    from .models import UnknownModelError
    from .train.checkpoint import CheckpointError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors (argparse printed the message)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    handlers: list[tuple[type[BaseException], Callable[[BaseException], int]]] = [
        (CLIError, lambda e: e.code),  # type: ignore[attr-defined]
        (CheckpointError, lambda e: 2),
        (DatasetNotFoundError, lambda e: 2),
        (UnknownModelError, lambda e: 2),
        (ConversionError, lambda e: 1),
        (LCNNError, lambda e: 1),
    ]
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as exc:  # noqa: BLE001 - re-raised below unless anticipated
        for cls, code in handlers:
            if isinstance(exc, cls):
                _error(str(exc))
                return code(exc)
        raise
