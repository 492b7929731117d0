"""Overhead of an LCNN over the plain model it was converted from, and where it comes from.

    python benchmarks/overhead.py            # timm resnet18 and mobilenetv3_small_100, batch 64, 64x64
    python benchmarks/overhead.py --quick    # smoke run: resnet18, batch 8, 32x32, 3 rounds (prints only)
    python benchmarks/overhead.py --models resnet18 --repeats 25 --threads 2

For each model, the plain timm model ("original") and these conversions of it are measured:

* ``lcnn``: ``lcnnify(model)`` (centered softplus + spectral norms + gamma-Lipschitz BN);
* ``softplus only``: only the activations converted (``spectral_norm_conv/linear=False``,
  ``lipschitz_batchnorm=False``);
* ``spectral norm only``: only the conv/linear spectral norms (activations kept: ReLU and smooth ones);
* ``Lipschitz BN only``: only the BatchNorms converted (activations kept, no spectral norms);
* ``lcnn, compiled softplus``: the full LCNN with ``lcnnify.nn.fused_softplus.enable_fused_kernels()`` (the
  centered softplus as one torch.compile'd loop per direction; opt-in, needs a working compiler; switched on
  only around this variant's steps, skipped with a message where it does not compile; ``--no-compiled``).

Training step = forward + cross-entropy (+ curvature penalty for the conversions) + backward + SGD step with the
paper's optimizer (momentum 0.9, weight decay 5e-4 except beta/gamma); eval forward = eval mode under no_grad.
Times: rounds in which every variant runs once, the order rotating from round to round; a variant's ratio is
taken per round against the original's time in the same round, and the table gives the median ratio with its
quartiles [q1, q3] (all of them, with the range, in the JSON). Both clocks are recorded: wall time and the
process's CPU time; ``--clock cpu`` puts the CPU-time ratios in the table, the robust choice on a machine
shared with other jobs (with ``--threads 1`` CPU time is the work done, unaffected by waiting for a core).

Memory: each variant and mode in a fresh process (a process's peak RSS cannot be shared or undone). After
building the model and one warm-up step (gradients, optimizer state and caches come into being), free heap
pages are returned to the OS (``malloc_trim``) and the peak RSS (VmHWM) is reset to the resting RSS; then
``--memory-steps`` steps run. ``peak`` is the process's peak RSS during them (runtime, weights, optimizer state
included); ``incr.`` is peak minus the resting RSS (activations, gradients, temporaries). Training: every
variant; eval forward: the original and the full LCNN. On CUDA: ``torch.cuda`` allocator counters instead.

Writes ``overhead.json`` next to this script (``--out`` to change; ``--quick`` writes only with ``--out``).
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (machine, paired_ratios, peak_rss_mib, release_free_memory, reset_peak_rss,  # noqa: E402
                     rotated_rounds, rss_mib, spread, table, write_json)

#: activations left as they are: ReLU (by type) and every smooth one (by policy)
KEEP_ACTIVATIONS: dict[str, Any] = dict(convert_types={nn.ReLU: "keep"}, smooth_activations="keep")
NO_SPECTRAL_NORM: dict[str, Any] = dict(spectral_norm_conv=False, spectral_norm_linear=False)

#: variant -> lcnnify overrides (None: the original model, not converted)
VARIANTS: dict[str, dict[str, Any] | None] = {
    "original": None,
    "lcnn": {},
    "softplus only": dict(**NO_SPECTRAL_NORM, lipschitz_batchnorm=False),
    "spectral norm only": dict(**KEEP_ACTIVATIONS, lipschitz_batchnorm=False),
    "Lipschitz BN only": dict(**KEEP_ACTIVATIONS, **NO_SPECTRAL_NORM),
    "lcnn, compiled softplus": {},
}
#: variants run with lcnnify.nn.fused_softplus.enable_fused_kernels() (skipped where compiling fails)
COMPILED = ("lcnn, compiled softplus",)


def kernels_switch(variant: str, fn):
    """fn run with the compiled centered-softplus kernels on for COMPILED variants, off for every other."""
    from lcnnify.nn.fused_softplus import disable_fused_kernels, enable_fused_kernels

    def run() -> None:
        if variant in COMPILED:
            enable_fused_kernels(warm_up=False)  # compiled once (compiled_kernels_work); a dict lookup here
        else:
            disable_fused_kernels()
        try:
            fn()
        finally:
            disable_fused_kernels()
    return run


def compiled_kernels_work() -> bool:
    """Compile the centered-softplus kernels now (False, with the compiler's warning, if that fails)."""
    from lcnnify.nn.fused_softplus import disable_fused_kernels, enable_fused_kernels

    ok = enable_fused_kernels()
    disable_fused_kernels()
    return ok
DEFAULT_MODELS = ("resnet18", "mobilenetv3_small_100")


def build(name: str, variant: str, size: int, device: torch.device, classes: int = 10):
    """(model, optimizer, is_lcnn) for one variant; the same initial weights for every variant."""
    import timm

    from lcnnify import lcnnify, param_groups

    torch.manual_seed(0)
    m = timm.create_model(name, num_classes=classes).to(device)
    overrides = VARIANTS[variant]
    if overrides is not None:
        m = lcnnify(m, example_inputs=torch.randn(2, 3, size, size, device=device), **overrides)
    opt = torch.optim.SGD(param_groups(m, 5e-4), lr=0.01, momentum=0.9)
    return m, opt, overrides is not None


def train_step_fn(m: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, lcnn: bool):
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(m(x), y)
        if lcnn:
            loss = loss + m.curvature_penalty()
        loss.backward()
        opt.step()
    return step


def eval_fn(m: nn.Module, x: torch.Tensor):
    def fwd() -> None:
        with torch.no_grad():
            m(x)
    return fwd


def _data(batch: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(device)
    return x, torch.randint(0, 10, (batch,), generator=g).to(device)


# ------------------------------------------------------------------------------------------ memory probe
def memory_probe(model: str, variant: str, mode: str, batch: int, size: int, steps: int, device: str,
                 threads: int) -> dict:
    """Run in a fresh process: peak memory of one variant in ``mode`` "train" or "eval" (module docstring)."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    m, opt, lcnn = build(model, variant, size, dev)
    x, y = _data(batch, size, dev)
    if variant in COMPILED and not compiled_kernels_work():
        raise RuntimeError("the compiled centered-softplus kernels do not build here")
    run = train_step_fn(m, opt, x, y, lcnn) if mode == "train" else eval_fn(m, x)
    run = kernels_switch(variant, run)
    m.train(mode == "train")

    def settle() -> float:  # memory in use now, after dropping what is free
        if cuda:
            torch.cuda.synchronize(dev)
            return torch.cuda.memory_allocated(dev) / 2**20
        release_free_memory()
        return rss_mib()

    model_mib = settle()  # the built model (and its input batch) before any step
    run()  # warm-up: gradients, optimizer state, caches come into being
    resting = settle()
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
        reset = True
    else:
        reset = reset_peak_rss()
    for _ in range(steps):
        run()
    if cuda:
        torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else peak_rss_mib()
    return {"model_mib": model_mib, "resting_mib": resting, "peak_mib": peak, "increment_mib": peak - resting,
            "peak_reset": reset}


def measure_memory(args: argparse.Namespace, model: str, variant: str, mode: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-probe", json.dumps(
        dict(model=model, variant=variant, mode=mode, batch=args.batch, size=args.size, steps=args.memory_steps,
             device=args.device, threads=args.threads))]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe {model}/{variant}/{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ one model
def run_model(args: argparse.Namespace, name: str) -> dict:
    dev = torch.device(args.device)
    x, y = _data(args.batch, args.size, dev)
    variants = [v for v in VARIANTS if (args.breakdown or v in ("original", "lcnn"))
                and (v not in COMPILED or args.compiled) and (not args.variants or v in args.variants)]
    built = {v: build(name, v, args.size, dev) for v in variants}
    for m, _, _ in built.values():
        m.train()
    t_train = rotated_rounds({v: kernels_switch(v, train_step_fn(m, o, x, y, lc))
                              for v, (m, o, lc) in built.items()}, args.repeats, warmup=args.warmup, device=dev)
    for m, o, _ in built.values():
        o.zero_grad(set_to_none=True)
        m.eval()
    t_eval = rotated_rounds({v: kernels_switch(v, eval_fn(m, x)) for v, (m, _, _) in built.items()},
                            args.repeats, warmup=args.warmup, device=dev)
    del built
    gc.collect()
    memory: dict[str, dict[str, dict]] = {}
    if args.memory:  # training: every variant; eval: the original and the full LCNN
        memory["train"] = {v: measure_memory(args, name, v, "train") for v in variants}
        memory["eval"] = {v: measure_memory(args, name, v, "eval") for v in ("original", "lcnn")}
    base = "original"
    res: dict[str, Any] = {"clock": args.clock, "memory_mib": memory, "ratio": {}, "raw_s": {}}
    for what, times in (("train_step", t_train), ("eval_forward", t_eval)):
        for clock, per_variant in times.items():
            suffix = "" if clock == args.clock else f"_{clock}"
            res[f"{what}_s{suffix}"] = {v: spread(t) for v, t in per_variant.items()}
            res["ratio"][what + suffix] = {v: paired_ratios(per_variant[v], per_variant[base])
                                           for v in variants if v != base}
            res["raw_s"][f"{what}_{clock}"] = per_variant
    for mode, per_variant in memory.items():
        for key in ("peak", "increment"):
            res["ratio"][f"{mode}_{key}_memory"] = {
                v: r[f"{key}_mib"] / max(per_variant[base][f"{key}_mib"], 1e-9)
                for v, r in per_variant.items() if v != base}
    return res


def _fmt(r: dict[str, float]) -> str:
    return f"{r['median']:.3f} [{r['q1']:.3f}, {r['q3']:.3f}]"


def report(name: str, args: argparse.Namespace, res: dict) -> str:
    variants = list(res["train_step_s"])
    mem, ratio = res["memory_mib"], res["ratio"]
    header = ["variant", "train step s", "x original", "eval fwd s", "x original"]
    if mem:
        header += ["train peak MiB", "x", "train incr. MiB", "x", "eval peak MiB", "x"]
    rows = []
    for v in variants:
        orig = v == "original"
        row = [v, f"{res['train_step_s'][v]['median']:.4f}", "1" if orig else _fmt(ratio["train_step"][v]),
               f"{res['eval_forward_s'][v]['median']:.4f}", "1" if orig else _fmt(ratio["eval_forward"][v])]
        if mem:
            for mode, key in (("train", "peak"), ("train", "increment"), ("eval", "peak")):
                r = mem[mode].get(v)
                row += ["-", "-"] if r is None else [
                    f"{r[key + '_mib']:.0f}", "1" if orig else f"{ratio[f'{mode}_{key}_memory'][v]:.3f}"]
        rows.append(row)
    title = (f"{name}, batch {args.batch}, {args.size}x{args.size}, {args.device}, {torch.get_num_threads()} threads: "
             f"{args.repeats} rotated rounds, {args.clock} time; ratios per round vs the original: median [q1, q3]")
    notes = ("memory: peak RSS of a fresh process over the timed steps; incr. = peak minus the resting RSS after "
             "a warm-up step (activations, gradients, temporaries)") if mem else ""
    return title + "\n" + table(header, rows) + ("\n" + notes if notes else "")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent)
    except OSError:
        return None
    return out.stdout.strip() or None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), help="timm model names")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15, help="timed rounds (every variant once per round)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--memory-steps", type=int, default=3, help="steps per memory probe")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clock", choices=("wall", "cpu", "gpu"), default=None,
                   help="which time the table shows (all are in the JSON); cpu: process CPU time; gpu: CUDA "
                        "events (default: gpu on CUDA, else wall)")
    p.add_argument("--no-breakdown", dest="breakdown", action="store_false",
                   help="only the original and the full LCNN")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory probes")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                   help="only these variants (default: all; 'original' is always needed for the ratios)")
    p.add_argument("--no-compiled", dest="compiled", action="store_false",
                   help="skip the variant with the compiled (torch.compile) centered-softplus kernels")
    p.add_argument("--quick", action="store_true",
                   help="resnet18, batch 8, 32x32, 3 rounds, original vs lcnn only, 1 memory step")
    p.add_argument("--out", help="JSON output (default: overhead.json next to this script; --quick: none)")
    p.add_argument("--note", help="free text stored in the JSON (e.g. the commit measured)")
    p.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_probe:
        print(json.dumps(memory_probe(**json.loads(args.memory_probe))))
        return
    if args.quick:
        args.models, args.batch, args.size, args.repeats, args.warmup, args.memory_steps = (
            ["resnet18"], 8, 32, 3, 1, 1)
        args.breakdown = False
    if args.clock is None:
        args.clock = "gpu" if args.device.startswith("cuda") else "wall"
    if args.clock == "gpu" and not args.device.startswith("cuda"):
        p.error("--clock gpu needs --device cuda")
    if args.variants and "original" not in args.variants:
        args.variants.insert(0, "original")
    torch.set_num_threads(args.threads)
    if args.compiled and args.breakdown and not compiled_kernels_work():
        print("compiled centered-softplus kernels unavailable here: that variant is skipped", flush=True)
        args.compiled = False
    out = args.out or (None if args.quick else str(Path(__file__).with_suffix(".json")))
    results = {}
    for name in args.models:
        results[name] = run_model(args, name)
        print(report(name, args, results[name]), "\n", flush=True)
    if out:
        config = {k: v for k, v in vars(args).items() if k not in ("memory_probe", "out")}
        config["commit"] = args.note or _git_commit()
        write_json(Path(out), {"config": config, "machine": machine(), "variants": {
            k: (None if v is None else {kk: (repr(vv) if kk == "convert_types" else vv) for kk, vv in v.items()})
            for k, v in VARIANTS.items()}, "models": results})


if __name__ == "__main__":
    main()
