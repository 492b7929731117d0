"""Centered softplus speed: the current CenteredSoftplus vs torch.relu vs the previous expm1/log1p formula.

Measures nanoseconds per element of

* ``forward``: the activation alone (no autograd graph), and
* ``fwd+bwd``: forward with autograd, then backward to the input and to beta (ReLU: to the input only),

on a float32 tensor of shape (64, 64, 32, 32) (an activation map of a CNN at batch 64), with a scalar and with
a per-channel beta. Runs are interleaved (A B C A B C ...) in one process; medians and the 25-75% range are
reported, and ratios to ReLU are ratios of medians.

The previous formula (kept here only as the comparison baseline) computed
``relu(x) + log1p(expm1(-beta |x|) / 2) / beta`` and saved the input x for backward. Its speed depends on
torch's expm1/log1p, which on the machines measured here run either fast or ~10x slower, varying between
processes and within one; the JSON records an expm1 probe at the start and end of each run, so compare the
``previous`` rows only together with it. The new formula uses tanh/exp/log, whose speed did not vary.

With ``--fused``, also the optional compiled kernels (``lcnnify.nn.fused_softplus``; scalar beta only, the
per-channel rows then show the eager path again), in their own interleaved column ``fused``; the compile
time (cold, or from inductor's on-disk cache) is reported separately.

Times are process CPU time with one intra-op thread by default (robust on a shared machine).

Usage: ``python benchmarks/softplus_speed.py [--repeats 15 --threads 1 --fused]``.
Writes ``benchmarks/softplus_speed.json``.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, table, write_json  # noqa: E402
from lcnnify.nn import CenteredSoftplus  # noqa: E402
from lcnnify.nn import fused_softplus  # noqa: E402

SHAPE = (64, 64, 32, 32)


class _PreviousFn(torch.autograd.Function):
    """The previous implementation (expm1/log1p forward; saves x; sigmoid / expm1-log1p backward)."""

    @staticmethod
    def forward(ctx, x, beta):
        t = (x.abs() * beta).neg_().expm1_().mul_(0.5).log1p_()
        ctx.save_for_backward(x, beta, t)
        return torch.relu(x).add_(t / beta)

    @staticmethod
    def backward(ctx, grad):
        x, beta, t = ctx.saved_tensors
        gx = grad * torch.sigmoid(x * beta)
        a = x.abs() * beta
        a2 = a * a
        series = a2 * (0.125 - a2 * (1.0 / 64.0 - a2 * (1.0 / 576.0)))
        large = (a * torch.sigmoid(-a)).add_(t).neg_()
        q = torch.where(a < 0.1, series, large)
        gb = (grad * q).sum_to_size(beta.shape) / (beta * beta)
        return gx, gb


class PreviousCenteredSoftplus(torch.nn.Module):
    def __init__(self, beta: float, num_channels: int | None = None) -> None:
        super().__init__()
        shape = () if num_channels is None else (num_channels,)
        self.log_beta = torch.nn.Parameter(torch.full(shape, math.log(beta)))

    def forward(self, x):
        b = self.log_beta.exp()
        if b.dim():
            b = b.view(1, -1, *([1] * (x.dim() - 2)))
        return _PreviousFn.apply(x, b)


def _fwd(act, x):
    def run():
        with torch.no_grad():
            act(x)
    return run


def _fwd_bwd(act, x, g):
    def run():
        xr = x.detach().requires_grad_(True)
        act(xr).backward(g)
    return run


def interleaved_cpu(fns: dict, repeats: int, warmup: int = 4) -> dict[str, list[float]]:
    """Process CPU seconds of each fn, interleaved (A B C A B C ...) after ``warmup`` rounds.

    CPU time rather than wall time: the machines this runs on are shared, and CPU time of a single-threaded
    run is far less sensitive to other jobs than wall time (page faults are included, as system time).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.process_time()
            fn()
            times[name].append(time.process_time() - t0)
    return times


def _with_fused(run):
    def fused_run():
        fused_softplus.enable_fused_kernels(warm_up=False)  # compiled already: inductor's cache
        try:
            run()
        finally:
            fused_softplus.disable_fused_kernels()
    return fused_run


def expm1_probe() -> dict:
    """ns/element of torch.expm1 and torch.exp on 2^22 floats: this torch build's expm1/log1p (which the previous
    formula uses) switch between a fast and a ~10x slower state from process to process and within a
    process, so every run records which state it saw (at its start and at its end)."""
    x = -(torch.randn(1 << 22) * 10).abs()
    out = {}
    for name, fn in (("expm1", torch.expm1), ("exp", torch.exp)):
        ts = []
        for _ in range(5):
            t0 = time.process_time()
            fn(x)
            ts.append(time.process_time() - t0)
        out[name] = statistics.median(ts) / x.numel() * 1e9
    return out


def saved_bytes_per_element(act, x) -> float:
    """Bytes that autograd keeps for backward per input element (distinct storages, via saved-tensor hooks)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        act(x.detach().requires_grad_(True) * 1.0)  # the product saves nothing tensor-sized
    return sum(seen.values()) / x.numel()


def _stats(ts: list[float], n: int) -> dict:
    ns = sorted(t / n * 1e9 for t in ts)
    q = statistics.quantiles(ns, n=4)
    return {"median_ns_per_element": statistics.median(ns), "q25": q[0], "q75": q[2]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (CPU time is per process)")
    ap.add_argument("--fused", action="store_true", help="also time the compiled (torch.compile) kernels")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(SHAPE) * 2.0
    g = torch.randn(SHAPE)
    n = x.numel()
    relu = torch.nn.ReLU()
    results: dict[str, dict] = {}
    probe = {"start": expm1_probe()}
    compile_s = None
    if args.fused:
        t0 = time.perf_counter()
        ok = fused_softplus.enable_fused_kernels()
        compile_s = time.perf_counter() - t0 if ok else None
        fused_softplus.disable_fused_kernels()
        args.fused = ok
    rows = []
    for label, channels in (("scalar beta", None), ("per-channel beta", SHAPE[1])):
        acts = {"relu": relu, "new": CenteredSoftplus(5.0, num_channels=channels),
                "previous": PreviousCenteredSoftplus(5.0, num_channels=channels)}
        for phase, make in (("forward", lambda a: _fwd(a, x)), ("fwd+bwd", lambda a: _fwd_bwd(a, x, g))):
            fns = {k: make(a) for k, a in acts.items()}
            if args.fused:
                fns["fused"] = _with_fused(make(CenteredSoftplus(5.0, num_channels=channels)))
            times = interleaved_cpu(fns, repeats=args.repeats)
            st = {k: _stats(v, n) for k, v in times.items()}
            relu_med = st["relu"]["median_ns_per_element"]
            for k, s in st.items():
                s["ratio_to_relu"] = s["median_ns_per_element"] / relu_med
            for k in ("new", "fused"):
                if k in st:
                    st[k]["speedup_vs_previous"] = (st["previous"]["median_ns_per_element"]
                                                    / st[k]["median_ns_per_element"])
            results[f"{label} / {phase}"] = st
            for k, s in st.items():
                rows.append([label, phase, k, s["median_ns_per_element"], f"{s['q25']:.3g}-{s['q75']:.3g}",
                             s["ratio_to_relu"]])
    probe["end"] = expm1_probe()
    print("expm1 / exp ns per element at start and end:",
          {k: {n: round(t, 2) for n, t in v.items()} for k, v in probe.items()})
    saved = {k: saved_bytes_per_element(a, x) for k, a in
             (("relu", relu), ("new", CenteredSoftplus(5.0)), ("previous", PreviousCenteredSoftplus(5.0)))}
    print("bytes kept for backward per element:", {k: round(v, 3) for k, v in saved.items()})
    print(f"shape {SHAPE}, float32, {torch.get_num_threads()} threads, process CPU time, "
          f"{args.repeats} interleaved repeats")
    print(table(["beta", "phase", "activation", "median ns/elem", "25-75%", "x relu"], rows))
    if compile_s is not None:
        print(f"fused kernels: compile + warm-up {compile_s:.1f} s (wall)")
    write_json(args.out, {"machine": machine(), "shape": list(SHAPE), "dtype": "float32",
                          "repeats": args.repeats, "clock": "process CPU time", "fused_compile_seconds": compile_s,
                          "saved_bytes_per_element": saved, "expm1_probe_ns": probe,
                          "results": results})


if __name__ == "__main__":
    main()
