"""Cost of the spectral normalization's training step, this checkout against a baseline checkout, side by side.

    git archive <baseline-commit> | tar -x -C /tmp/sn_base
    python benchmarks/spectral_norm_step.py --baseline /tmp/sn_base [--model resnet18] [--batch 64] [--size 64]
        [--rounds 4] [--reps 10] [--profile]

Each round runs one worker process per checkout (alternating A B A B ..., so load drifts hit both alike);
a worker converts ``timm.create_model(model)`` with ``lcnnify`` (2 warm-up iterations: the warm-up is not
what is measured) and reports medians over ``reps`` of

* ``sn_only``: every spectrally normalized weight evaluated in training mode (power iteration + sigma) plus
  the backward of a fixed random output-gradient R to the raw weights: the spectral norm's share of a step;
* ``train_step``: forward + cross-entropy + curvature penalty + backward + SGD (momentum 0.9) of the whole LCNN.

``--profile`` prints the torch.profiler table (self CPU time per op) of ``sn_only`` for both checkouts.
Writes benchmarks/spectral_norm_step.json. Timing lives here, never in the tests.
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
import json, statistics, sys, time, warnings
warnings.simplefilter("ignore")
import torch, torch.nn.functional as F, timm
torch.set_num_threads({threads})
import lcnnify
from torch.nn.utils import parametrize
torch.manual_seed(0)
m = timm.create_model({model!r}, num_classes=10)
lc = lcnnify.lcnnify(m, example_inputs=torch.randn(1, 3, {size}, {size}), warmup_iterations=2)
lc.train()
mods = [mod for mod in lc.modules() if parametrize.is_parametrized(mod, "weight") and lcnnify.nn.is_lcnn_layer(mod)]
R = [torch.randn_like(mod.weight) for mod in mods]
def sn_only():
    torch.autograd.backward([mod.weight for mod in mods], R)
    for mod in mods:
        mod.parametrizations.weight.original.grad = None
opt = torch.optim.SGD(lcnnify.param_groups(lc, 5e-4), lr=0.01, momentum=0.9)
x = torch.randn({batch}, 3, {size}, {size}); y = torch.randint(0, 10, ({batch},))
def train_step():
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(lc(x), y) + lc.curvature_penalty()
    loss.backward()
    opt.step()
def med(fn, reps):
    fn(); fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)
out = dict(sn_only=med(sn_only, {reps}), train_step=med(train_step, max(3, {reps} // 2)), n_layers=len(mods))
if {profile}:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as p:
        for _ in range(5):
            sn_only()
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
print(json.dumps(out))
"""


def run_worker(root: Path, args: argparse.Namespace, profile: bool) -> dict:
    code = WORKER.format(threads=args.threads, model=args.model, size=args.size, batch=args.batch, reps=args.reps,
                         profile=profile)
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS=str(args.threads))
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
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    here = Path(__file__).resolve().parent.parent
    runs: dict[str, list[dict]] = {"baseline": [], "this": []}
    for r in range(args.rounds):
        for name, root in (("baseline", args.baseline.resolve()), ("this", here)):
            runs[name].append(run_worker(root, args, profile=args.profile and r == 0))
            print(name, runs[name][-1], flush=True)
    summary = {}
    for key in ("sn_only", "train_step"):
        ratios = [t[key] / b[key] for t, b in zip(runs["this"], runs["baseline"])]
        summary[key] = dict(baseline_ms=statistics.median(b[key] for b in runs["baseline"]),
                            this_ms=statistics.median(t[key] for t in runs["this"]),
                            ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))
        s = summary[key]
        print(f"{key:10s}: baseline {s['baseline_ms']:.1f} ms, this {s['this_ms']:.1f} ms, "
              f"ratio {s['ratio_median']:.3f} [{s['ratio_min']:.3f}, {s['ratio_max']:.3f}] over {args.rounds} rounds")
    out = dict(config=vars(args) | {"baseline": str(args.baseline)}, runs=runs, summary=summary)
    Path(__file__).with_suffix(".json").write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
