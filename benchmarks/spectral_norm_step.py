"""Cost of the spectral normalization in a training step: this checkout against a baseline checkout and the plain model.

    git archive <baseline-commit> | tar -x -C /tmp/sn_base
    python benchmarks/spectral_norm_step.py --baseline /tmp/sn_base [--model resnet18] [--batch 64] [--size 64]
        [--rounds 6] [--reps 8] [--profile]

The variant measured is the spectral-norm-only conversion: ``lcnnify(model, convert_types={nn.ReLU: "keep"},
smooth_activations="keep", lipschitz_batchnorm=False)`` (ReLU and BatchNorm kept, every conv / linear weight
spectrally normalized), so its difference to the plain model is the spectral norm's cost alone.

Every measurement is a fresh worker process (one model per process, as in real training: the C allocator's state,
page faults and caches are not shared with the other variants). Each round runs, in rotating order, one worker for
the plain model, one for the baseline checkout's SN-only model and one for this checkout's; a worker builds its
model (2 warm-up Lanczos iterations: the warm-up is not what is measured), runs 3 untimed steps, then reports the
median CPU time (``time.process_time``, 1 thread) over ``reps`` steps of

    opt.zero_grad(); loss = cross_entropy(model(x), y) [+ model.curvature_penalty()]; loss.backward(); opt.step()

(SGD, momentum 0.9), the minor page faults per step, the peak RSS, and (SN workers) ``sn_only``: every normalized
weight evaluated in training mode plus the backward of a fixed random output-gradient to the raw weights.
Ratios are per round (SN worker / the same round's plain worker), then the median and range over rounds.
``--profile`` prints this checkout's torch.profiler table of 3 training steps (self CPU time per op; the
``lcnnify.spectral_norm.*`` ranges attribute the spectral norm's share).

``--steady-malloc`` runs every worker with glibc's trimming and mmap thresholds raised (``MALLOC_TRIM_THRESHOLD_``,
``MALLOC_MMAP_THRESHOLD_``), so freed memory is kept and reused instead of being returned to the kernel and
page-faulted in again: with the default allocator the number of page faults per step varies several-fold between
otherwise identical processes, which is most of the run-to-run spread; the steady setting isolates the compute.

``--in-process`` instead runs one worker holding all three models (plain; SN-only with this checkout's spectral
norm; the same converted model with its spectral-norm objects switched to the baseline checkout's classes, loaded
from the baseline's ``lcnnify/nn/{conv_operator,spectral_norm,linear_spectral_norm}.py``) and interleaves their
steps (rotating order) for ``reps * rounds`` rounds: paired differences in one process, plus the CPU time spent
inside the spectral norm's forward and backward during the step. Only for baselines whose spectral-norm objects
have the same attributes (true for the change this benchmark was written for).

Results are merged into benchmarks/spectral_norm_step.json under a key naming the configuration. Timing lives here,
never in the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, resource, statistics, sys, time, warnings
warnings.simplefilter("ignore")
import torch, torch.nn as nn, torch.nn.functional as F, timm
torch.set_num_threads({threads})
torch.manual_seed(0)
model = timm.create_model({model!r}, num_classes=10)
variant = {variant!r}
if variant == "sn":
    import lcnnify
    from torch.nn.utils import parametrize
    model = lcnnify.lcnnify(model, example_inputs=torch.randn(2, 3, {size}, {size}), convert_types={{nn.ReLU: "keep"}},
                            smooth_activations="keep", lipschitz_batchnorm=False, warmup_iterations=2)
model.train()
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x = torch.randn({batch}, 3, {size}, {size}); y = torch.randint(0, 10, ({batch},))
def train_step():
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    if variant == "sn":
        loss = loss + model.curvature_penalty()
    loss.backward()
    opt.step()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def med(fn, reps):
    for _ in range(3):
        fn()
    ts, fs = [], []
    for _ in range(reps):
        f = faults(); t = time.process_time(); fn(); ts.append(time.process_time() - t); fs.append(faults() - f)
    return 1e3 * statistics.median(ts), statistics.median(fs)
out = {{}}
out["train_step"], out["faults_per_step"] = med(train_step, {reps})
if variant == "sn":
    mods = [m for m in model.modules() if parametrize.is_parametrized(m, "weight")]
    R = [torch.randn_like(m.weight) for m in mods]
    def sn_only():
        torch.autograd.backward([m.weight for m in mods], R)
        for m in mods:
            m.parametrizations.weight.original.grad = None
    out["sn_only"] = med(sn_only, {reps})[0]
    out["n_layers"] = len(mods)
    if {profile}:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(3):
                train_step()
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30), file=sys.stderr)
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


INPROCESS_WORKER = r"""
import copy, json, resource, statistics, sys, time, types, warnings
warnings.simplefilter("ignore")
import torch, torch.nn as nn, torch.nn.functional as F, timm
torch.set_num_threads({threads})
import lcnnify
from lcnnify.nn import spectral_norm as this_sn
from torch.nn.utils import parametrize

def load(name, path, repl=()):
    src = open(path).read()
    for a, b in repl:
        src = src.replace(a, b)
    mod = types.ModuleType("lcnnify.nn." + name)
    mod.__package__ = "lcnnify.nn"
    sys.modules["lcnnify.nn." + name] = mod
    exec(compile(src, path, "exec"), mod.__dict__)
    return mod
base = {baseline!r} + "/lcnnify/nn/"
b_op = load("_baseline_conv_operator", base + "conv_operator.py")
b_sn = load("_baseline_spectral_norm", base + "spectral_norm.py",
            [("from .conv_operator import", "from ._baseline_conv_operator import")])
b_lin = load("_baseline_linear_spectral_norm", base + "linear_spectral_norm.py",
             [("from .spectral_norm import", "from ._baseline_spectral_norm import")])
acc = {{"t": 0.0}}
for mod in (this_sn, b_sn):  # CPU time inside the spectral norm's forward and backward
    def wrap(mod=mod):
        f, b = mod.SpectralNormBase.forward, mod._SpectralNormalize.backward
        def forward(self, w):
            t = time.process_time(); r = f(self, w); acc["t"] += time.process_time() - t; return r
        def backward(ctx, g):
            t = time.process_time(); r = b(ctx, g); acc["t"] += time.process_time() - t; return r
        mod.SpectralNormBase.forward = forward
        mod._SpectralNormalize.backward = staticmethod(backward)
    wrap()
torch.manual_seed(0)
plain = timm.create_model({model!r}, num_classes=10)
this = lcnnify.lcnnify(copy.deepcopy(plain), example_inputs=torch.randn(2, 3, {size}, {size}),
                       convert_types={{nn.ReLU: "keep"}}, smooth_activations="keep", lipschitz_batchnorm=False,
                       warmup_iterations=2)
baseline = copy.deepcopy(this)
for m in baseline.modules():
    if parametrize.is_parametrized(m, "weight"):
        for p in m.parametrizations["weight"]:
            if type(p).__name__ == "ConvSpectralNorm":
                p.__class__, p._op.__class__ = b_sn.ConvSpectralNorm, b_op.ConvOperator
            elif type(p).__name__ == "LinearSpectralNorm":
                p.__class__, p._op.__class__ = b_lin.LinearSpectralNorm, b_lin.MatrixOperator
x = torch.randn({batch}, 3, {size}, {size}); y = torch.randint(0, 10, ({batch},))
def make(model, penalty):
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    def step():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        if penalty:
            loss = loss + model.curvature_penalty()
        loss.backward()
        opt.step()
    return step
steps = dict(plain=make(plain, False), baseline=make(baseline, True), this=make(this, True))
names = list(steps)
for _ in range(3):
    for f in steps.values():
        f()
ts = {{k: [] for k in names}}; sn = {{k: [] for k in names}}; fl = {{k: [] for k in names}}
for r in range({rounds}):
    for k in names[r % 3:] + names[:r % 3]:
        acc["t"] = 0.0
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.process_time(); steps[k](); ts[k].append(1e3 * (time.process_time() - t))
        fl[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        sn[k].append(1e3 * acc["t"])
print(json.dumps(dict(step_ms=ts, sn_ms=sn, faults=fl)))
"""


def run_in_process(here: Path, args: argparse.Namespace) -> dict:
    code = INPROCESS_WORKER.format(threads=args.threads, model=args.model, size=args.size, batch=args.batch,
                                   rounds=args.rounds * args.reps, baseline=str(args.baseline.resolve()))
    env = dict(os.environ, PYTHONPATH=str(here), OMP_NUM_THREADS=str(args.threads))
    if args.steady_malloc:
        env.update(MALLOC_TRIM_THRESHOLD_=str(1 << 40), MALLOC_MMAP_THRESHOLD_=str(1 << 30))
    res = subprocess.run([sys.executable, "-c", code], cwd=str(here), env=env, capture_output=True, text=True,
                         check=True)
    raw = json.loads(res.stdout.strip().splitlines()[-1])
    st, sn = raw["step_ms"], raw["sn_ms"]
    med = statistics.median
    summary = {}
    for name in ("baseline", "this"):
        extra = [a - p for a, p in zip(st[name], st["plain"])]
        summary[name] = dict(train_step_ms=med(st[name]), ratio_to_plain=med(st[name]) / med(st["plain"]),
                             extra_ms_paired_median=med(extra), sn_time_in_step_ms=med(sn[name]),
                             faults_per_step=med(raw["faults"][name]))
    d_step = [a - b for a, b in zip(st["this"], st["baseline"])]
    d_sn = [a - b for a, b in zip(sn["this"], sn["baseline"])]
    q_step, q_sn = statistics.quantiles(d_step, n=4), statistics.quantiles(d_sn, n=4)
    summary["this_minus_baseline"] = dict(step_ms_median=med(d_step), step_ms_q1=q_step[0], step_ms_q3=q_step[2],
                                          sn_time_ms_median=med(d_sn), sn_time_ms_q1=q_sn[0], sn_time_ms_q3=q_sn[2])
    summary["plain"] = dict(train_step_ms=med(st["plain"]), faults_per_step=med(raw["faults"]["plain"]))
    print(f"plain     : {summary['plain']['train_step_ms']:.1f} ms/step")
    for name in ("baseline", "this"):
        s = summary[name]
        print(f"{name:10s}: {s['train_step_ms']:.1f} ms/step = {s['ratio_to_plain']:.3f}x plain "
              f"(+{s['extra_ms_paired_median']:.1f} ms paired), spectral norm {s['sn_time_in_step_ms']:.1f} ms "
              f"of it, {s['faults_per_step']:.0f} faults/step")
    s = summary["this_minus_baseline"]
    print(f"this - baseline (paired, one process): step {s['step_ms_median']:+.1f} ms [{s['step_ms_q1']:+.1f}, "
          f"{s['step_ms_q3']:+.1f}], spectral norm {s['sn_time_ms_median']:+.1f} ms [{s['sn_time_ms_q1']:+.1f}, "
          f"{s['sn_time_ms_q3']:+.1f}] over {len(d_step)} rounds")
    return dict(runs=raw, summary=summary)


def run_worker(root: Path, variant: str, args: argparse.Namespace, profile: bool) -> dict:
    code = WORKER.format(threads=args.threads, model=args.model, size=args.size, batch=args.batch, reps=args.reps,
                         variant=variant, profile=profile)
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS=str(args.threads))
    if args.steady_malloc:
        env.update(MALLOC_TRIM_THRESHOLD_=str(1 << 40), MALLOC_MMAP_THRESHOLD_=str(1 << 30))
    res = subprocess.run([sys.executable, "-c", code], cwd=str(root), env=env, capture_output=True, text=True,
                         check=True)
    if profile:
        print(res.stderr)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, required=True, help="a checkout of the baseline commit")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--steady-malloc", action="store_true", help="raise glibc's trim/mmap thresholds in the workers")
    ap.add_argument("--in-process", action="store_true", help="all three models in one worker, steps interleaved")
    args = ap.parse_args()
    here = Path(__file__).resolve().parent.parent
    if args.in_process:
        result = run_in_process(here, args)
        save(args, result["runs"], result["summary"], "_in-process")
        return
    jobs = [("plain", here, "plain"), ("baseline", args.baseline.resolve(), "sn"), ("this", here, "sn")]
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in jobs}
    for r in range(args.rounds):
        order = jobs[r % 3:] + jobs[: r % 3]  # rotate, so that load drifts hit every variant alike
        for name, root, variant in order:
            runs[name].append(run_worker(root, variant, args, profile=args.profile and r == 0 and name == "this"))
            print(r, name, runs[name][-1], flush=True)
    summary: dict[str, dict] = {}
    for name in ("baseline", "this"):
        ratios = [s["train_step"] / p["train_step"] for s, p in zip(runs[name], runs["plain"])]
        extra = [s["train_step"] - p["train_step"] for s, p in zip(runs[name], runs["plain"])]
        summary[name] = dict(
            train_step_ms=statistics.median(s["train_step"] for s in runs[name]),
            ratio_to_plain_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
            extra_ms_median=statistics.median(extra),
            sn_only_ms=statistics.median(s["sn_only"] for s in runs[name]),
            faults_per_step=statistics.median(s["faults_per_step"] for s in runs[name]),
            peak_rss_mb=statistics.median(s["peak_rss_mb"] for s in runs[name]))
    summary["plain"] = dict(train_step_ms=statistics.median(p["train_step"] for p in runs["plain"]),
                            faults_per_step=statistics.median(p["faults_per_step"] for p in runs["plain"]),
                            peak_rss_mb=statistics.median(p["peak_rss_mb"] for p in runs["plain"]))
    print(f"plain     : {summary['plain']['train_step_ms']:.1f} ms/step, "
          f"{summary['plain']['faults_per_step']:.0f} faults/step, peak RSS {summary['plain']['peak_rss_mb']:.0f} MB")
    for name in ("baseline", "this"):
        s = summary[name]
        print(f"{name:10s}: {s['train_step_ms']:.1f} ms/step = {s['ratio_to_plain_median']:.3f}x plain "
              f"[{s['ratio_min']:.3f}, {s['ratio_max']:.3f}] (+{s['extra_ms_median']:.1f} ms), sn_only "
              f"{s['sn_only_ms']:.1f} ms, {s['faults_per_step']:.0f} faults/step, peak RSS {s['peak_rss_mb']:.0f} MB "
              f"over {args.rounds} rounds")
    save(args, runs, summary, "")


def save(args: argparse.Namespace, runs: dict, summary: dict, suffix: str) -> None:
    path = Path(__file__).with_suffix(".json")
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        results = {}
    if "config" in results:  # the former single-run layout
        results = {}
    key = f"{args.model}_b{args.batch}_s{args.size}_t{args.threads}" + suffix + \
        ("_steady-malloc" if args.steady_malloc else "")
    results[key] = dict(config=vars(args) | {"baseline": str(args.baseline)}, runs=runs, summary=summary)
    path.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
