"""Where an LCNN's extra time goes, op by op, and what would remove it (torch.profiler, CPU).

    python benchmarks/overhead_profile.py               # resnet18 + mobilenetv3_small_100, batch 64, 64x64, 1 thread
    python benchmarks/overhead_profile.py --quick       # smoke run: resnet18, batch 8, 32x32, 1 step (prints only)
    python benchmarks/overhead_profile.py --components  # also the per-component variants of overhead.py

Same models, variants, data, training step and eval forward as ``benchmarks/overhead.py`` (its ``build``,
``train_step_fn``, ``eval_fn``, ``VARIANTS`` are reused): SGD with momentum and the curvature penalty, batch 64,
64x64 inputs. After ``--warmup`` untimed rounds, ``--steps`` rounds run one profiled step of every variant each
(the order rotating from round to round), each under its own ``torch.profiler`` session (CPU activity only, no
shapes or stacks) inside one ``record_function`` scope, so that the step's time is exactly the sum of the self
times of the events below it (aten ops, autograd nodes, labels; the self time of a label is the Python between
the ops it encloses). The profiler's clock is wall time: of each variant's profiled steps the fastest quarter
(``--keep-fraction``) is attributed and averaged, so that a step that waited for a core on a shared machine does
not count its wait as its ops' time.

Attribution. Every event's self time goes to exactly one category, so the categories add up to the profiled
step time of each model and their differences add up to the measured difference (LCNN minus original):

* forward: the innermost enclosing scope decides. Scopes are the library's own ``record_function`` labels where
  it has them (``lcnnify.spectral_norm.*``, ``lcnnify.lipschitz_batchnorm*``, ...), the custom autograd Functions
  (``_CenteredSoftplusFn``, ``_SpectralNormalize``, ``_BatchNormWithBatchStats``), the optimizer's labels, and
  labels this script puts around every module call by type (activation, BatchNorm, conv/linear, the spectral-
  norm parametrization) with forward hooks while profiling;
* backward: each ``autograd::engine::evaluate_function: <Node>`` belongs to the category of the forward op that
  created the node (matched by autograd sequence number; by the node's name where there is no match), with the
  forward categories' "backward" counterparts; ``AccumulateGrad`` nodes are a category of their own;
* spectral norm without the library's power-iteration label: inside the parametrization, in training every op
  before the ``_SpectralNormalize`` call counts as power iteration (the iteration runs first), in eval
  convolution-type ops and vector norms do (a cache miss), the W/sigma division counts as normalization, the rest
  (cache check, u/v copies, the Python of the parametrization) as bookkeeping.

What is reported (per model, training step and eval forward): the per-category ms/step of both models, the
difference and that difference as a fraction of the original step; the per-aten-op self-time difference with
call counts; an unprofiled timing of the same steps (process CPU time, rotated rounds) to show how much the
profiler inflates; and a micro-measurement of element-wise functions (exp, log, tanh, sigmoid, relu, expm1,
log1p, and the LCNN's centered softplus forward and forward+backward) at the model's own activation sizes, in
ns/element, which backs the "what would remove it" line of the activation rows.

Writes ``overhead_profile.json`` and ``overhead_profile.md`` next to this script (``--quick``: prints only).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, paired_ratios, rotated_rounds, spread, table  # noqa: E402
from overhead import (COMPILED, VARIANTS, _data, build, compiled_kernels_work, eval_fn,  # noqa: E402
                      kernels_switch, train_step_fn)

STEP_LABEL = "overhead_profile.step"
#: label prefix of the scopes this script opens around module calls
LABEL = "overhead_profile."

#: category key -> description (order = table order)
CATEGORIES: dict[str, str] = {
    "act_fwd": "activation forward (centered softplus / ReLU, Hardswish, ...)",
    "act_bwd": "activation backward",
    "sn_power": "spectral norm: power iteration",
    "sn_normalize": "spectral norm: W/sigma and its backward",
    "sn_bookkeeping": "spectral norm: parametrization + bookkeeping",
    "bn_fwd": "batch norm forward (Lipschitz BN / BN)",
    "bn_bwd": "batch norm backward",
    "conv_fwd": "main convolutions + linear, forward",
    "conv_bwd": "main convolutions + linear, backward",
    "loss": "loss + curvature penalty (forward and backward)",
    "grad_accum": "gradient accumulation into .grad (AccumulateGrad)",
    "optimizer": "optimizer (zero_grad, step)",
    "other_fwd": "other forward ops (residual adds, pooling, head, ...)",
    "other_bwd": "other backward ops",
    "python": "Python between ops (graph module, hooks, step loop)",
}
#: components with a forward and a backward category
_PHASED = {"act": ("act_fwd", "act_bwd"), "bn": ("bn_fwd", "bn_bwd"), "conv": ("conv_fwd", "conv_bwd"),
           "other": ("other_fwd", "other_bwd")}
_FWD_TO_COMPONENT = {"act_fwd": "act", "bn_fwd": "bn", "conv_fwd": "conv", "other_fwd": "other",
                     "sn_power": "sn_power", "sn_normalize": "sn_normalize", "sn_bookkeeping": "sn_bookkeeping",
                     "loss": "loss", "optimizer": "optimizer", "grad_accum": "grad_accum", "python": "other"}
_BACKWARD_PREFIX = "autograd::engine::evaluate_function: "
#: ops that count as power iteration inside a spectral-norm parametrization without the library's label
_POWER_OPS = ("conv", "linalg_vector_norm", "aten::mm", "aten::mv", "aten::addmm", "aten::matmul", "aten::linear",
              "mkldnn", "thnn_conv", "aten::vdot", "aten::dot")
_NORMALIZE_OPS = ("aten::div", "aten::clamp_min", "aten::reciprocal")


# ------------------------------------------------------------------------------------------ scopes
def _module_component(m: nn.Module) -> str | None:
    """Which component a module call belongs to (None: not labelled)."""
    from lcnnify.nn import CenteredSoftplus, LipschitzBatchNorm
    from lcnnify.nn.spectral_norm import SpectralNormBase

    if isinstance(m, SpectralNormBase):
        return "sn"
    if type(m).__name__ == "ParametrizationList":
        return "sn_bookkeeping"
    if isinstance(m, CenteredSoftplus):
        return "act"
    if isinstance(m, (LipschitzBatchNorm, nn.modules.batchnorm._NormBase)) or "BatchNorm" in type(m).__name__:
        return "bn"
    if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
        return "conv"
    mod = type(m).__module__
    if mod.startswith(("torch.nn.modules.activation", "timm.layers.activations")):
        return "act"
    return None


class Scopes:
    """Open a ``record_function`` scope around every call of a labelled module (forward pre-hook / hook), and
    record the activation inputs' numels of each forward. ``remove()`` takes the hooks off again."""

    def __init__(self, model: nn.Module) -> None:
        self.handles: list[Any] = []
        self.act_numels: list[int] = []
        self.act_shapes: list[tuple[int, ...]] = []
        self.record_shapes = False
        self._open: list[Any] = []
        for m in model.modules():
            comp = "forward" if m is model else _module_component(m)
            if comp is None:
                continue
            self.handles.append(m.register_forward_pre_hook(self._enter(comp), prepend=True))
            self.handles.append(m.register_forward_hook(self._exit(comp), always_call=True))

    def _enter(self, comp: str) -> Callable:
        def hook(_m: nn.Module, args: tuple) -> None:
            rf = record_function(LABEL + comp)
            rf.__enter__()
            self._open.append(rf)
            if comp == "act" and self.record_shapes and args and isinstance(args[0], torch.Tensor):
                self.act_shapes.append(tuple(args[0].shape))
        return hook

    def _exit(self, comp: str) -> Callable:
        def hook(_m: nn.Module, _args: tuple, _out: Any) -> None:
            self._open.pop().__exit__(None, None, None)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


# ------------------------------------------------------------------------------------------ attribution
def _library_label(name: str) -> str | None:
    """Component of one of the library's own ``record_function`` labels (``lcnnify.*``)."""
    n = name.lower()
    if "power" in n:
        return "sn_power"
    if "spectral" in n:
        return "sn_normalize" if ("normaliz" in n or "sigma" in n) else "sn"
    if "batchnorm" in n or "batch_norm" in n:
        return "bn"
    if "softplus" in n or "activation" in n:
        return "act"
    if "penalty" in n:
        return "loss"
    return None


def _scope_component(name: str) -> str | None:
    """Component decided by an enclosing event of this name (None: look further out)."""
    if name.startswith(LABEL):
        comp = name[len(LABEL):]
        return {"forward": "other", "step": "loss"}.get(comp, comp)
    if name.startswith("lcnnify."):
        return _library_label(name)
    if name.startswith("_CenteredSoftplusFn"):
        return "act"
    if name.startswith("_SpectralNormalize"):
        return "sn_normalize"
    if name.startswith("_BatchNormWithBatchStats"):
        return "bn"
    if name.startswith("Optimizer."):
        return "optimizer"
    return None


def _component_by_node_name(node: str) -> str:
    """Fallback for a backward node without a matched forward op."""
    if "AccumulateGrad" in node:
        return "grad_accum"
    if "CenteredSoftplus" in node or any(a in node for a in ("Relu", "Hardswish", "Hardsigmoid", "Silu", "Gelu",
                                                               "Sigmoid", "Tanh", "Threshold")):
        return "act"
    if "SpectralNormalize" in node:
        return "sn_normalize"
    if "BatchNorm" in node:
        return "bn"
    if "Convolution" in node or "Addmm" in node:
        return "conv"
    if "NllLoss" in node or "LogSoftmax" in node:
        return "loss"
    return "other"


def _category(component: str, backward: bool) -> str:
    if component in _PHASED:
        return _PHASED[component][1 if backward else 0]
    return component


class Attribution:
    """Categories and per-op self times of the events under the step scopes of one profile."""

    def __init__(self, events: Iterable[Any], steps: int) -> None:
        self.steps = steps
        evs = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
        self._comp: dict[int, tuple[str | None, bool]] = {}  # id -> (component, inside backward)
        self._cat: dict[int, str] = {}
        self._by_seq: dict[tuple[int, int], str] = {}
        # forward creators: the last forward event (by start time) carrying a sequence number made the node
        forward = sorted((e for e in evs if e.sequence_nr >= 0 and not self._in_backward(e)),
                         key=lambda e: e.time_range.start)
        for e in forward:
            self._by_seq[(e.thread, e.sequence_nr)] = self.category(e)
        self.category_us: dict[str, float] = {c: 0.0 for c in CATEGORIES}
        self.ops: dict[str, dict[str, float]] = defaultdict(lambda: {"self_us": 0.0, "calls": 0})
        self.category_ops: dict[str, dict[str, float]] = {c: defaultdict(float) for c in CATEGORIES}
        self.category_calls: dict[str, dict[str, int]] = {c: defaultdict(int) for c in CATEGORIES}
        self.step_us = 0.0
        self.outside_us = 0.0  # self time of events not under a step scope (other threads, profiler)
        for e in evs:
            if e.name == STEP_LABEL:
                self.step_us += e.cpu_time_total
            if not self._under_step(e):
                self.outside_us += e.self_cpu_time_total
                continue
            cat = self.category(e)
            self.category_us[cat] += e.self_cpu_time_total
            self.category_ops[cat][e.name] += e.self_cpu_time_total
            self.category_calls[cat][e.name] += 1
            op = self.ops[e.name]
            op["self_us"] += e.self_cpu_time_total
            op["calls"] += 1

    @classmethod
    def combined(cls, parts: list["Attribution"]) -> "Attribution":
        """Several profiles' steps together (sums; the per-step values divide by the total number of steps)."""
        new = cls.__new__(cls)
        new.steps = sum(p.steps for p in parts)
        new.step_us = sum(p.step_us for p in parts)
        new.outside_us = sum(p.outside_us for p in parts)
        new.category_us = {c: sum(p.category_us[c] for p in parts) for c in CATEGORIES}
        new.ops = defaultdict(lambda: {"self_us": 0.0, "calls": 0})
        new.category_ops = {c: defaultdict(float) for c in CATEGORIES}
        new.category_calls = {c: defaultdict(int) for c in CATEGORIES}
        for p in parts:
            for k, d in p.ops.items():
                new.ops[k]["self_us"] += d["self_us"]
                new.ops[k]["calls"] += d["calls"]
            for c in CATEGORIES:
                for k, us in p.category_ops[c].items():
                    new.category_ops[c][k] += us
                for k, n in p.category_calls[c].items():
                    new.category_calls[c][k] += n
        new.all_steps_ms = [t for p in parts for t in getattr(p, "all_steps_ms", [p.step_us / 1e3 / p.steps])]
        return new

    @staticmethod
    def _in_backward(e: Any) -> bool:
        p = e
        while p is not None:
            if p.name.startswith(_BACKWARD_PREFIX):
                return True
            p = p.cpu_parent
        return False

    @staticmethod
    def _under_step(e: Any) -> bool:
        p = e
        while p is not None:
            if p.name == STEP_LABEL:
                return True
            p = p.cpu_parent
        return False

    def _sn_op_component(self, e: Any, scope: Any) -> str:
        """Inside a spectral-norm parametrization without the library's labels: by the op (or the op below the
        scope that encloses it)."""
        p, top = e, e
        while p is not None and p is not scope:
            top = p
            p = p.cpu_parent
        normalize = [c for c in scope.cpu_children if c.name.startswith("_SpectralNormalize")]
        if normalize:  # training: the power iteration runs before W/sigma
            return "sn_power" if top.time_range.start < normalize[0].time_range.start else "sn_bookkeeping"
        if any(k in top.name for k in _POWER_OPS):
            return "sn_power"
        if top.name in _NORMALIZE_OPS:
            return "sn_normalize"
        return "sn_bookkeeping"

    def _component(self, e: Any) -> tuple[str, bool]:
        """(component, inside backward) for one event: the innermost scope that decides."""
        key = id(e)
        if key in self._comp:
            return self._comp[key]  # type: ignore[return-value]
        chain = []
        p = e
        while p is not None:
            chain.append(p)
            p = p.cpu_parent
        backward = any(q.name.startswith(_BACKWARD_PREFIX) for q in chain)
        comp: str | None = None
        for i, q in enumerate(chain):
            if q.name.startswith(_BACKWARD_PREFIX):
                node = q.name[len(_BACKWARD_PREFIX):]
                fwd = self._by_seq.get((q.fwd_thread if q.fwd_thread else q.thread, q.sequence_nr))
                comp = _FWD_TO_COMPONENT[fwd] if fwd is not None else _component_by_node_name(node)
                break
            c = _scope_component(q.name)
            if c is None:
                continue
            if c == "sn":
                comp = "sn_bookkeeping" if q is e else self._sn_op_component(e, q)
            elif q.name == STEP_LABEL:
                comp = "python" if q is e else "loss"
            elif q.name == LABEL + "forward":
                comp = "python" if q is e else "other"
            else:
                comp = c
            break
        if comp is None:
            comp = "python" if e.name.startswith(LABEL) else "other"
        self._comp[key] = (comp, backward)
        return comp, backward

    def category(self, e: Any) -> str:
        key = id(e)
        if key not in self._cat:
            comp, backward = self._component(e)
            self._cat[key] = _category(comp, backward)
        return self._cat[key]

    # per step, ms
    def categories_ms(self) -> dict[str, float]:
        return {c: us / 1e3 / self.steps for c, us in self.category_us.items()}

    def step_ms(self) -> float:
        return self.step_us / 1e3 / self.steps


def profile_step(fn: Callable[[], object]) -> Attribution:
    """One call of ``fn`` under the profiler, inside the step scope."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False, with_stack=False) as prof:
        with record_function(STEP_LABEL):
            fn()
    return Attribution(prof.events(), 1)


def profile_rounds(fns: dict[str, Callable[[], object]], models: dict[str, nn.Module], warmup: int,
                   steps: int) -> dict[str, list[Attribution]]:
    """``warmup`` unprofiled rounds, then ``steps`` rounds in which every variant runs one profiled step, the order
    rotating from round to round (as the unprofiled timing), with the module scopes attached."""
    names = list(fns)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    scopes = [Scopes(m) for m in models.values()]
    out: dict[str, list[Attribution]] = {v: [] for v in names}
    try:
        for r in range(steps):
            for j in range(len(names)):
                v = names[(r + j) % len(names)]
                out[v].append(profile_step(fns[v]))
    finally:
        for s in scopes:
            s.remove()
    return out


def fastest(parts: list[Attribution], fraction: float) -> Attribution:
    """The fastest ``ceil(fraction * n)`` of the profiled steps, combined: the profiler's clock is wall time, and
    on a shared machine a step that waited for a core would otherwise count its wait as its ops' time (waiting
    only ever adds, so the fastest steps are the least disturbed)."""
    k = max(1, math.ceil(fraction * len(parts)))
    return Attribution.combined(sorted(parts, key=lambda p: p.step_us)[:k])


# ------------------------------------------------------------------------------------------ micro-measurement
def activation_shapes(model: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Input shapes of the activation module calls of one eval forward (the same in training)."""
    scopes = Scopes(model)
    scopes.record_shapes = True
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was)
        scopes.remove()
    return scopes.act_shapes


def _time_ns(fn: Callable[[], object], reps: int) -> float:
    """Median process CPU time of ``fn`` (with one thread: the work done, not the wait for a core)."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.process_time_ns()
        fn()
        ts.append(time.process_time_ns() - t0)
    return statistics.median(ts)


def micro_elementwise(shapes: list[tuple[int, ...]], reps: int, beta: float = 5.0) -> dict[str, Any]:
    """ns/element (process CPU time) of element-wise functions at the given activation shapes, weighted by each
    shape's elements (one call per listed shape = one forward's worth). ``*_fwd_bwd``: forward + backward through
    autograd (for the centered softplus with a beta that requires grad, as in training)."""
    from lcnnify.nn.centered_softplus import centered_softplus

    g = torch.Generator().manual_seed(0)
    counts: dict[tuple[int, ...], int] = defaultdict(int)
    for s in shapes:
        counts[s] += 1
    b = torch.tensor(beta)
    fns: dict[str, Callable[[torch.Tensor, torch.Tensor], object]] = {
        "relu": lambda x, _: torch.relu(x),
        "exp": lambda x, _: torch.exp(x),
        "log": lambda x, _: torch.log(x),  # called with a positive copy of the input (below)
        "tanh": lambda x, _: torch.tanh(x),
        "sigmoid": lambda x, _: torch.sigmoid(x),
        "expm1": lambda x, _: torch.expm1(x),
        "log1p": lambda x, _: torch.log1p(x),
        "centered_softplus_fwd": lambda x, _: centered_softplus(x, b),
    }

    def fwd_bwd(f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor], object]:
        def run(x: torch.Tensor, gr: torch.Tensor) -> None:
            xr = x.detach().requires_grad_()
            f(xr).backward(gr)
        return run

    fns["relu_fwd_bwd"] = fwd_bwd(torch.relu)
    b_train = b.clone().requires_grad_()  # training: the backward also computes d/dbeta
    fns["centered_softplus_fwd_bwd"] = fwd_bwd(lambda x: centered_softplus(x, b_train))
    total = sum(int(torch.Size(s).numel()) * c for s, c in counts.items())
    ns = {k: 0.0 for k in fns}
    per_shape = []
    for s, c in counts.items():
        x = torch.randn(s, generator=g)
        gr = torch.randn(s, generator=g)
        n = x.numel()
        row = {"shape": list(s), "calls": c}
        xp = x.abs().add_(1e-3)  # log, log1p: positive inputs
        for k, f in fns.items():
            xin = xp if k in ("log", "log1p") else x
            t = _time_ns(lambda: f(xin, gr), reps)
            row[k] = t / n
            ns[k] += t * c
        per_shape.append(row)
        del x, xp, gr
    res = {k: v / max(total, 1) for k, v in ns.items()}
    res["centered_softplus_bwd"] = res["centered_softplus_fwd_bwd"] - res["centered_softplus_fwd"]
    res["relu_bwd"] = res["relu_fwd_bwd"] - res["relu"]
    return {"ns_per_element": res, "elements_per_forward": total, "per_shape": per_shape, "beta": beta}


# ------------------------------------------------------------------------------------------ one model
def _variants(args: argparse.Namespace) -> list[str]:
    """original and lcnn; with --components every variant of overhead.py (the compiled-softplus one only where
    its kernels compile)."""
    out = [v for v in VARIANTS if v in ("original", "lcnn") or args.components]
    if any(v in COMPILED for v in out) and not compiled_kernels_work():
        out = [v for v in out if v not in COMPILED]
    return out


def run_model(args: argparse.Namespace, name: str) -> dict[str, Any]:
    dev = torch.device("cpu")
    x, y = _data(args.batch, args.size, dev)
    variants = _variants(args)
    built = {v: build(name, v, args.size, dev) for v in variants}
    res: dict[str, Any] = {"modes": {}}
    for mode in ("train", "eval"):
        fns = {}
        for v, (m, o, lc) in built.items():
            m.train(mode == "train")
            fns[v] = kernels_switch(v, train_step_fn(m, o, x, y, lc) if mode == "train" else eval_fn(m, x))
        # unprofiled: process CPU time of rotated rounds (the step as overhead.py times it)
        timing = rotated_rounds(fns, args.timing_rounds, warmup=args.warmup) if args.timing_rounds else {}
        rounds = profile_rounds(fns, {v: b[0] for v, b in built.items()}, args.warmup, args.steps)
        prof = {v: fastest(parts, args.keep_fraction) for v, parts in rounds.items()}
        res["modes"][mode] = summarize(prof, timing, built)
        for v, parts in rounds.items():
            res["modes"][mode]["variants"][v]["profiled_steps_ms"] = [p.step_ms() for p in parts]
        for _, o, _ in built.values():
            o.zero_grad(set_to_none=True)
    lcnn = built["lcnn"][0]
    shapes = activation_shapes(lcnn, x)
    if args.micro_reps:
        betas = [float(m.beta.detach().mean()) for m in lcnn.modules() if hasattr(m, "log_beta")]
        res["micro"] = micro_elementwise(shapes, args.micro_reps, beta=statistics.median(betas) if betas else 5.0)
    res["counts"] = model_counts(built)
    del built
    gc.collect()
    return res


def model_counts(built: dict[str, tuple]) -> dict[str, Any]:
    """Sizes the 'what would remove it' lines use: spectral-norm layers and their weight elements, parameters."""
    from lcnnify.nn.spectral_norm import SpectralNormBase

    out: dict[str, Any] = {}
    for v, (m, o, _) in built.items():
        sn = [s for s in m.modules() if isinstance(s, SpectralNormBase)]
        sn_weights = 0
        for mod in m.modules():
            pl = getattr(mod, "parametrizations", None)
            if pl is not None and "weight" in pl and any(isinstance(p, SpectralNormBase) for p in pl["weight"]):
                sn_weights += pl["weight"].original.numel()
        out[v] = {"spectral_norm_layers": len(sn), "spectral_norm_weight_elements": sn_weights,
                  "parameters": sum(1 for p in m.parameters()),
                  "optimizer_params": sum(len(g["params"]) for g in o.param_groups)}
    return out


def summarize(prof: dict[str, Attribution], timing: dict[str, list[float]], built: dict) -> dict[str, Any]:
    base = prof["original"]
    out: dict[str, Any] = {"variants": {}}
    for v, a in prof.items():
        cats = a.categories_ms()
        entry: dict[str, Any] = {
            "step_ms": a.step_ms(), "categories_ms": cats, "sum_categories_ms": sum(cats.values()),
            "outside_step_ms": a.outside_us / 1e3 / a.steps,
            "ops": {k: {"self_ms": d["self_us"] / 1e3 / a.steps, "calls": d["calls"] / a.steps}
                    for k, d in a.ops.items()},
            "category_ops_ms": {c: {k: us / 1e3 / a.steps for k, us in sorted(d.items(), key=lambda kv: -kv[1])}
                                for c, d in a.category_ops.items() if d},
            "category_calls": {c: {k: n / a.steps for k, n in d.items()} for c, d in a.category_calls.items() if d},
        }
        if timing:
            entry["unprofiled_cpu_s"] = spread(timing["cpu"][v])
            entry["unprofiled_wall_s"] = spread(timing["wall"][v])
        if v != "original":
            bcats = base.categories_ms()
            diff = {c: cats[c] - bcats[c] for c in CATEGORIES}
            orig_step = base.step_ms()
            entry["difference"] = {
                "total_ms": a.step_ms() - orig_step,
                "total_fraction_of_original": (a.step_ms() - orig_step) / orig_step,
                "categories_ms": diff,
                "categories_fraction_of_original": {c: d / orig_step for c, d in diff.items()},
                "sum_categories_ms": sum(diff.values()),
                "unattributed_ms": diff["other_fwd"] + diff["other_bwd"] + diff["python"],
            }
            names = set(entry["ops"]) | set(out["variants"]["original"]["ops"])
            bops = out["variants"]["original"]["ops"]
            zero = {"self_ms": 0.0, "calls": 0.0}
            entry["difference"]["ops"] = sorted(
                ({"op": k, "diff_ms": entry["ops"].get(k, zero)["self_ms"] - bops.get(k, zero)["self_ms"],
                  "original_ms": bops.get(k, zero)["self_ms"], "lcnn_ms": entry["ops"].get(k, zero)["self_ms"],
                  "original_calls": bops.get(k, zero)["calls"], "lcnn_calls": entry["ops"].get(k, zero)["calls"]}
                 for k in names), key=lambda r: -abs(r["diff_ms"]))
            if timing:
                entry["unprofiled_ratio"] = paired_ratios(timing["cpu"][v], timing["cpu"]["original"])
                entry["unprofiled_ratio_wall"] = paired_ratios(timing["wall"][v], timing["wall"]["original"])
        out["variants"][v] = entry
    return out


# ------------------------------------------------------------------------------------------ what would remove it
def _top_ops(entry: dict, base: dict, cat: str, k: int = 3) -> str:
    """The ops whose self time in ``cat`` grew the most (LCNN minus original), with call counts per step."""
    lo = entry["category_ops_ms"].get(cat, {})
    bo = base["category_ops_ms"].get(cat, {})
    lc = entry["category_calls"].get(cat, {})
    bc = base["category_calls"].get(cat, {})
    rows = sorted(((n, lo.get(n, 0.0) - bo.get(n, 0.0)) for n in set(lo) | set(bo)), key=lambda r: -abs(r[1]))
    return ", ".join(f"`{n}` {d:+.1f} ms ({bc.get(n, 0):.0f} -> {lc.get(n, 0):.0f} calls)"
                     for n, d in rows[:k] if abs(d) >= 0.05) or "-"


def remedies(mode: str, mres: dict, model_res: dict) -> dict[str, str]:
    """One line per category: what the numbers say would remove that cost."""
    v = mres["variants"]
    base, lc = v["original"], v["lcnn"]
    d = lc["difference"]["categories_ms"]
    orig = base["step_ms"]
    micro = model_res.get("micro")
    counts = model_res["counts"]["lcnn"]
    lines: dict[str, str] = {}
    if micro:
        ns = micro["ns_per_element"]
        n_elem = micro["elements_per_forward"]
        ms = n_elem / 1e6  # ns/element -> ms per forward

        def act_line(cur: str, relu: str, floor: float, floor_text: str, cat: str) -> str:
            c, r, prof = ns[cur], ns[relu], lc["categories_ms"][cat]
            return (f"{n_elem / 1e6:.1f} M activation elements per forward. Micro (ns/element at these sizes): "
                    f"centered softplus {c:.2f} vs ReLU {r:.2f}, i.e. {(c - r) * ms:.1f} ms per step more than ReLU "
                    f"(profiled here: {prof:.1f} ms = {prof / ms:.2f} ns/element with the profiler and Python). "
                    f"{floor_text} ({floor:.2f} ns) would save {(c - floor) * ms:.1f} ms "
                    f"({(c - floor) * ms / orig:.1%} of the original step) and leave {(floor - r) * ms:.1f} ms over "
                    f"ReLU; only a ReLU-cost kernel removes it all. Top ops: {_top_ops(lc, base, cat)}.")

        lines["act_fwd"] = act_line(
            "centered_softplus_fwd", "relu", ns["exp"] + ns["log"],
            f"The functions it needs cost: exp {ns['exp']:.2f}, log {ns['log']:.2f}, tanh {ns['tanh']:.2f}, "
            f"sigmoid {ns['sigmoid']:.2f}, expm1 {ns['expm1']:.2f}, log1p {ns['log1p']:.2f}; one fused pass at "
            f"one exp + one log per element", "act_fwd")
        if mode == "train":
            lines["act_bwd"] = act_line(
                "centered_softplus_bwd", "relu_bwd", ns["exp"] + ns["log"],
                "From the output, d/dx = 1 - exp(-beta y)/2 needs one exp per element and d/dbeta one log more; "
                "one fused pass at one exp + one log per element", "act_bwd")
    n_sn = counts["spectral_norm_layers"]
    if mode == "train":
        p = lc["categories_ms"]["sn_power"]
        calls = sum(lc["category_calls"].get("sn_power", {}).values())
        lines["sn_power"] = (
            f"{n_sn} spectral norms, one power iteration each per step ({calls:.0f} events, "
            f"{p / max(n_sn, 1) * 1e3:.0f} us per layer); top ops: {_top_ops(lc, base, 'sn_power')}. Iterating every "
            f"k-th step saves (1 - 1/k) of it (k = 2: {p / 2:.1f} ms, k = 4: {3 * p / 4:.1f} ms) at the cost of a "
            f"staler sigma; the lossless removal is a cheaper batch-1 application of the operator and its adjoint "
            f"(the top ops above).")
        w = counts["spectral_norm_weight_elements"]
        nm = lc["categories_ms"]["sn_normalize"]
        lines["sn_normalize"] = (
            f"W/sigma forward + its backward (the sigma-gradient term) over {w / 1e6:.1f} M weight elements: "
            f"{nm / max(w, 1) * 1e6:.2f} ns per weight element; top ops: {_top_ops(lc, base, 'sn_normalize')}. "
            f"Folding 1/sigma into the convolution (one scale in its weight packing, or on its output) removes "
            f"the separate weight-sized passes.")
    else:
        nm = lc["categories_ms"]["sn_normalize"]
        w = counts["spectral_norm_weight_elements"]
        lines["sn_normalize"] = (
            f"eval divides every weight by its cached sigma on every forward ({w / 1e6:.1f} M elements, "
            f"{nm:.1f} ms); caching W/sigma with the converged sigma (it is fixed while the weight is) "
            f"removes it; top ops: {_top_ops(lc, base, 'sn_normalize')}.")
        lines["sn_power"] = f"no iteration in eval (cached); {lc['categories_ms']['sn_power']:.1f} ms left here."
    bk = lc["categories_ms"]["sn_bookkeeping"]
    eq = lc["category_ops_ms"].get("sn_bookkeeping", {}).get("aten::equal", 0.0)
    eq_text = (f" The eval cache check compares every weight with its stored copy (`aten::equal`, {eq:.1f} ms); "
               f"a version-counter key would remove it but miss `p.data` edits, so the check compares values; a "
               f"cheaper exact change test is what would remove it." if eq >= 0.05 else "")
    lines["sn_bookkeeping"] = (
        f"{bk / max(n_sn, 1) * 1e3:.0f} us per spectral-norm layer per step of parametrization machinery, dtype/"
        f"u,v copies{' and the eval cache check' if mode == 'eval' else ''}; top ops: "
        f"{_top_ops(lc, base, 'sn_bookkeeping')}. A parametrization-free layer (W/sigma computed in the conv's own "
        f"forward, u/v updated in place) would remove most of it.{eq_text}")
    if mode == "train":
        lines["bn_fwd"] = (f"{d['bn_fwd']:+.1f} ms vs BatchNorm; top op changes: {_top_ops(lc, base, 'bn_fwd')}. "
                           f"The clip needs the batch variance before normalizing, so the statistics are a pass of "
                           f"their own; one batch-norm kernel that computes the statistics, the clip and the "
                           f"normalization would remove it.")
        lines["bn_bwd"] = (f"{d['bn_bwd']:+.1f} ms vs BatchNorm; top op changes: {_top_ops(lc, base, 'bn_bwd')}. "
                           f"The extra terms come from the clip factor and gamma (per-channel, tiny).")
    else:
        lines["bn_fwd"] = (f"{d['bn_fwd']:+.1f} ms vs BatchNorm (running statistics; the clip is recomputed every "
                           f"forward); top op changes: {_top_ops(lc, base, 'bn_fwd')}. Caching the clipped scale "
                           f"while the parameters are unchanged would remove the per-forward part.")
    for cat in ("conv_fwd", "conv_bwd"):
        if cat == "conv_bwd" and mode == "eval":
            continue
        if d[cat] < 0:
            lines[cat] = (f"{d[cat]:+.1f} ms ({d[cat] / orig:+.1%}): the same convolution calls ran faster in the "
                          f"LCNN: run-to-run spread, not an LCNN cost; top op changes {_top_ops(lc, base, cat)}.")
            continue
        lines[cat] = (f"same convolution calls as the original; {d[cat]:+.1f} ms ({d[cat] / orig:+.1%}): top op "
                      f"changes {_top_ops(lc, base, cat)}. Either the cost of feeding a freshly computed W/sigma "
                      f"tensor (weight re-layout/packing on every call; reusing the packed weight while it is "
                      f"unchanged, as in eval, would remove it) or run-to-run spread.")
    if mode == "train":
        lines["loss"] = (f"{d['loss']:+.1f} ms: the curvature penalty's small ops (stack of every beta and gamma) "
                         f"and their backward; top ops: {_top_ops(lc, base, 'loss')}. One flat parameter vector for "
                         f"beta/gamma would make it two ops.")
        no, nl = model_res["counts"]["original"]["optimizer_params"], counts["optimizer_params"]
        lines["optimizer"] = (f"{d['optimizer']:+.1f} ms: {nl} parameter tensors vs {no} (beta, gamma, gamma-BN); "
                              f"SGD on CPU tensors loops over them one by one (no foreach default): "
                              f"``foreach=True`` would batch the per-tensor updates; top ops: "
                              f"{_top_ops(lc, base, 'optimizer')}.")
        copies = lc["category_calls"].get("grad_accum", {}).get("aten::copy_", 0)
        bcopies = base["category_calls"].get("grad_accum", {}).get("aten::copy_", 0)
        lines["grad_accum"] = (
            f"{d['grad_accum']:+.1f} ms: {copies:.0f} gradient copies per step (original {bcopies:.0f}); "
            f"AccumulateGrad copies an incoming gradient instead of taking it when its strides differ from the "
            f"parameter's or it is still referenced; returning the weight gradient in the parameter's memory "
            f"format from the spectral norm's backward would remove the copies; top ops: "
            f"{_top_ops(lc, base, 'grad_accum')}.")
    lines["other_fwd"] = f"{d['other_fwd']:+.1f} ms; top op changes: {_top_ops(lc, base, 'other_fwd')}."
    if mode == "train":
        lines["other_bwd"] = f"{d['other_bwd']:+.1f} ms; top op changes: {_top_ops(lc, base, 'other_bwd')}."
    lines["python"] = (f"{d['python']:+.1f} ms of Python between ops (more modules, the autograd Functions' "
                       f"Python, parametrize); unattributed to a layer type.")
    # rows present in both models whose difference is below 1% of the original step: noise at this sample size
    for cat in ("bn_fwd", "bn_bwd", "conv_fwd", "conv_bwd", "loss", "optimizer", "grad_accum", "other_fwd",
                "other_bwd", "python"):
        if cat in lines and abs(d[cat]) < 0.01 * orig:
            lines[cat] = (f"{d[cat]:+.1f} ms ({d[cat] / orig:+.1%}): below 1% of the step, within the run-to-run "
                          f"spread of this measurement; nothing to remove.")
    return {c: t for c, t in lines.items()
            if lc["categories_ms"][c] != 0.0 or base["categories_ms"][c] != 0.0}


# ------------------------------------------------------------------------------------------ report
def _variant_table(mode_res: dict, variant: str) -> str:
    base = mode_res["variants"]["original"]
    lc = mode_res["variants"][variant]
    orig = base["step_ms"]
    rows = []
    diff = lc["difference"]
    for c, desc in CATEGORIES.items():
        o, n = base["categories_ms"][c], lc["categories_ms"][c]
        if o == 0 and n == 0:
            continue
        rows.append([desc, f"{o:.1f}", f"{n:.1f}", f"{n - o:+.1f}", f"{(n - o) / orig:+.1%}"])
    rows.append(["**total (profiled step)**", f"{orig:.1f}", f"{lc['step_ms']:.1f}", f"{diff['total_ms']:+.1f}",
                 f"{diff['total_fraction_of_original']:+.1%}"])
    return table(["category", "original ms/step", f"{variant} ms/step", "difference ms", "of original step"], rows)


def _ops_table(mode_res: dict, variant: str, k: int) -> str:
    rows = [[f"`{r['op']}`", f"{r['original_ms']:.2f}", f"{r['lcnn_ms']:.2f}", f"{r['diff_ms']:+.2f}",
             f"{r['original_calls']:.0f}", f"{r['lcnn_calls']:.0f}"]
            for r in mode_res["variants"][variant]["difference"]["ops"][:k]]
    return table(["op (self CPU time)", "original ms", f"{variant} ms", "difference ms", "original calls",
                  f"{variant} calls"], rows)


def report_model(name: str, res: dict, args: argparse.Namespace, ops_rows: int) -> str:
    out = [f"## {name}"]
    for mode, title in (("train", "training step"), ("eval", "eval forward")):
        mres = res["modes"][mode]
        lc = mres["variants"]["lcnn"]
        diff = lc["difference"]
        line = (f"### {title}\n\nProfiled: original {mres['variants']['original']['step_ms']:.1f} ms/step, LCNN "
                f"{lc['step_ms']:.1f} ms/step, difference {diff['total_ms']:+.1f} ms "
                f"({diff['total_fraction_of_original']:+.1%}); the categories sum to "
                f"{diff['sum_categories_ms']:+.1f} ms, of which {diff['unattributed_ms']:+.1f} ms is not tied to an "
                f"LCNN part (other ops + Python).")
        if "unprofiled_ratio" in lc:
            r = lc["unprofiled_ratio"]
            rw = lc["unprofiled_ratio_wall"]
            t0 = mres["variants"]["original"]["unprofiled_cpu_s"]["median"] * 1e3
            t1 = lc["unprofiled_cpu_s"]["median"] * 1e3
            w0 = mres["variants"]["original"]["unprofiled_wall_s"]["median"] * 1e3
            w1 = lc["unprofiled_wall_s"]["median"] * 1e3
            line += (f" Unprofiled ({args.timing_rounds} rotated rounds, medians): process CPU time original "
                     f"{t0:.1f} ms, LCNN {t1:.1f} ms, ratio {r['median']:.3f} [{r['q1']:.3f}, {r['q3']:.3f}]; wall "
                     f"{w0:.1f} / {w1:.1f} ms, ratio {rw['median']:.3f} [{rw['q1']:.3f}, {rw['q3']:.3f}]. Profiled "
                     f"ratio {lc['step_ms'] / mres['variants']['original']['step_ms']:.3f}: the profiler adds a "
                     f"fixed cost per op, and the LCNN runs more ops.")
            disturbed = mres["variants"]["original"]["step_ms"] / t0
            if disturbed > 1.25:
                line += (f" **Disturbed run:** the original's profiled step is {disturbed:.2f}x its unprofiled CPU "
                         f"time (the profiler's clock is wall time: other processes took the core), so differences "
                         f"in the rows both models share (convolutions, pooling) are mostly noise here; re-run on "
                         f"a quiet machine.")
        out += [line, "", _variant_table(mres, "lcnn"), "", "What would remove each cost (from the numbers above):", ""]
        for c, text in res["remedies"][mode].items():
            out.append(f"- **{CATEGORIES[c]}**: {text}")
        out += ["", f"Largest per-op self-time differences (top {ops_rows}, per step):", "",
                _ops_table(mres, "lcnn", ops_rows), ""]
        for v in mres["variants"]:
            if v not in ("original", "lcnn"):
                out += [f"Component variant **{v}** ({title}):", "", _variant_table(mres, v), ""]
    if "micro" in res:
        mi = res["micro"]
        ns = mi["ns_per_element"]
        keys = ["relu", "exp", "log", "tanh", "sigmoid", "expm1", "log1p", "centered_softplus_fwd", "relu_bwd",
                "centered_softplus_bwd", "relu_fwd_bwd", "centered_softplus_fwd_bwd"]
        out += [f"### element-wise cost at this model's activation sizes ({mi['elements_per_forward'] / 1e6:.1f} M "
                f"elements per forward, {len(mi['per_shape'])} shapes, beta {mi['beta']:.3g})", "",
                table(["function", "ns/element", "x relu", "ms per forward"],
                      [[k, f"{ns[k]:.2f}", f"{ns[k] / max(ns['relu'], 1e-9):.1f}",
                        f"{ns[k] * mi['elements_per_forward'] / 1e6:.1f}"] for k in keys]), ""]
    return "\n".join(out)


def _compact(payload: dict) -> dict:
    """The JSON's form: per variant, ``category_ops`` = {category: {op: [ms/step, calls/step]}}; the per-op
    difference as ``{"columns": [...], "rows": [...]}``; a conversion's own per-op totals are in those rows."""
    out = copy.deepcopy(payload)
    for res in out["models"].values():
        for mres in res["modes"].values():
            for v, entry in mres["variants"].items():
                ms, calls = entry.pop("category_ops_ms"), entry.pop("category_calls")
                entry["category_ops"] = {c: {k: [t, calls[c][k]] for k, t in d.items()} for c, d in ms.items()}
                if v != "original":
                    del entry["ops"]
                    rows = entry["difference"]["ops"]
                    cols = ["op", "diff_ms", "original_ms", "lcnn_ms", "original_calls", "lcnn_calls"]
                    entry["difference"]["ops"] = {"columns": cols, "rows": [[r[k] for k in cols] for r in rows]}
    return out


def _rounded(obj: Any, digits: int = 4) -> Any:
    """Floats rounded to ``digits`` decimals (ms: 0.1 us), recursively: the JSON stays readable and small."""
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: _rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v, digits) for v in obj]
    return obj


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "../lcnnify"],
                               capture_output=True, text=True, cwd=Path(__file__).resolve().parent)
    except OSError:
        return None
    return (out.stdout.strip() + (" (+ uncommitted lcnnify changes)" if dirty.stdout.strip() else "")) or None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet18", "mobilenetv3_small_100"], help="timm model names")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=8,
                   help="profiled rounds (one step of every variant each); the fastest --keep-fraction are attributed")
    p.add_argument("--warmup", type=int, default=2, help="unprofiled steps first")
    p.add_argument("--keep-fraction", type=float, default=0.25,
                   help="attribute the fastest this fraction of each variant's profiled steps (at least one)")
    p.add_argument("--timing-rounds", type=int, default=5, help="unprofiled rotated rounds (0: skip)")
    p.add_argument("--micro-reps", type=int, default=5, help="repetitions per micro-measurement (0: skip)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--components", action="store_true", help="also the per-component variants")
    p.add_argument("--ops-rows", type=int, default=20, help="rows of the per-op table in the report")
    p.add_argument("--quick", action="store_true",
                   help="resnet18, batch 8, 32x32, 1 warm-up + 1 profiled step, no unprofiled rounds (prints only)")
    p.add_argument("--out", help="JSON path (default: overhead_profile.json next to this script; --quick: none); "
                   "the report goes next to it with the suffix .md")
    p.add_argument("--note", help="what was measured, stored as the commit (default: git rev-parse of this tree)")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.batch, args.size, args.steps, args.warmup, args.timing_rounds, args.micro_reps = (
            ["resnet18"], 8, 32, 1, 1, 0, 1)
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    texts = []
    for name in args.models:
        res = run_model(args, name)
        res["remedies"] = {mode: remedies(mode, res["modes"][mode], res) for mode in res["modes"]}
        results[name] = res
        texts.append(report_model(name, res, args, args.ops_rows))
        print(texts[-1], "\n", flush=True)
    payload = {"config": {k: v for k, v in vars(args).items() if k != "out"} | {"commit": args.note or _git_commit()},
               "machine": machine(), "categories": CATEGORIES, "models": results}
    out = args.out or (None if args.quick else str(Path(__file__).with_suffix(".json")))
    if out:
        Path(out).write_text(json.dumps(_rounded(_compact(payload)), indent=1))
        print(f"wrote {out}")
        md = Path(out).with_suffix(".md")
        head = (f"# Where the LCNN's extra time goes (torch.profiler, CPU)\n\nGenerated by "
                f"`python benchmarks/overhead_profile.py` (commit {payload['config']['commit']}, torch "
                f"{torch.__version__}, {args.threads} thread(s), batch {args.batch}, {args.size}x{args.size}, "
                f"{args.steps} profiled rounds of one step per variant after {args.warmup} warm-up rounds; the "
                f"fastest {args.keep_fraction:.0%} of each variant's profiled steps are attributed). Self CPU time "
                f"of every profiled event, per step, attributed to the LCNN part it belongs to (method: the "
                f"script's docstring); the profiler adds time per op and its clock is wall time, so the "
                f"unprofiled times are given too. "
                f"Percentages are of the profiled original step.\n")
        md.write_text(head + "\n" + "\n\n".join(texts) + "\n")
        print(f"wrote {md}")
    return payload


if __name__ == "__main__":
    main()
