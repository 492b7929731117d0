"""Overhead of an LCNN: training step and eval forward of ``lcnnify(m)`` vs ``m``, measured side by side.

    python benchmarks/overhead.py [--model resnet18] [--batch 64] [--size 64] [--repeats 15] [--device cpu]

Training step = forward + cross-entropy (+ curvature penalty for the LCNN) + backward + SGD step, with the
paper's optimizer (momentum 0.9, weight decay 5e-4 except beta/gamma). Times are medians of interleaved runs
(A B A B ...) in this one process; peak memory is measured per variant in a fresh subprocess (CPU: peak RSS
(VmHWM) growth over model creation; CUDA: torch.cuda.max_memory_allocated). Writes benchmarks/overhead.json.
Target (issue #2): LCNN training step <= 1.25x (the paper's implementation: 1.6x).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import interleaved, machine, median, table, write_json  # noqa: E402


#: ablations for "where the time goes": which LCNN component is switched off
ABLATIONS = {
    "lcnn without spectral norms": dict(spectral_norm_conv=False, spectral_norm_linear=False),
    "lcnn without centered softplus": dict(skip=(r"re:(.*\.)?act\d*",)),  # timm ResNet names its ReLUs act*
    "lcnn without Lipschitz BN": dict(lipschitz_batchnorm=False),
}


def build(name: str, lcnn: bool, size: int, device: torch.device, classes: int = 10, **overrides):
    import timm

    from lcnnify import lcnnify, param_groups

    torch.manual_seed(0)
    m = timm.create_model(name, num_classes=classes).to(device)
    if lcnn:
        m = lcnnify(m, example_inputs=torch.randn(1, 3, size, size, device=device), **overrides)
    opt = torch.optim.SGD(param_groups(m, 5e-4), lr=0.01, momentum=0.9)
    return m, opt


def train_step_fn(m, opt, x, y, lcnn: bool):
    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(m(x), y)
        if lcnn:
            loss = loss + m.curvature_penalty()
        loss.backward()
        opt.step()
    return step


def eval_fn(m, x):
    def fwd():
        with torch.no_grad():
            m(x)
    return fwd


def peak_memory(args, lcnn: bool) -> float:
    """MiB of peak memory of 3 training steps of one variant, in a fresh process."""
    code = f"""
import torch, sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from overhead import build, train_step_fn
dev = torch.device({args.device!r})
m, opt = build({args.model!r}, {lcnn}, {args.size}, dev)
x = torch.randn({args.batch}, 3, {args.size}, {args.size}, device=dev); y = torch.randint(0, 10, ({args.batch},), device=dev)
step = train_step_fn(m, opt, x, y, {lcnn})
if dev.type == 'cuda':
    torch.cuda.reset_peak_memory_stats(); step(); step(); step(); torch.cuda.synchronize()
    print(torch.cuda.max_memory_allocated() / 2**20)
else:
    # VmHWM (peak RSS) is per address space: unlike ru_maxrss it is not inherited from the parent across exec
    hwm = lambda: int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])
    base = hwm()
    step(); step(); step()
    print((hwm() - base) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    p.add_argument("--breakdown", action="store_true", help="also time LCNNs with one component switched off")
    args = p.parse_args()
    dev = torch.device(args.device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
    y = torch.randint(0, 10, (args.batch,), device=dev)
    base, opt_b = build(args.model, False, args.size, dev)
    lc, opt_l = build(args.model, True, args.size, dev)
    base.train(), lc.train()
    fns = {"standard": train_step_fn(base, opt_b, x, y, False), "lcnn": train_step_fn(lc, opt_l, x, y, True)}
    if args.breakdown:
        for label, overrides in ABLATIONS.items():
            m, o = build(args.model, True, args.size, dev, **overrides)
            m.train()
            fns[label] = train_step_fn(m, o, x, y, True)
    t_train = interleaved(fns, args.repeats, device=dev)
    base.eval(), lc.eval()
    t_eval = interleaved({"standard": eval_fn(base, x), "lcnn": eval_fn(lc, x)}, args.repeats, device=dev)
    mem = {"standard": peak_memory(args, False), "lcnn": peak_memory(args, True)}
    res = {
        "config": vars(args), "machine": machine(),
        "train_step_s": {k: median(v) for k, v in t_train.items()},
        "eval_forward_s": {k: median(v) for k, v in t_eval.items()},
        "peak_memory_mib": mem,
        "raw": {"train": t_train, "eval": t_eval},
    }
    res["ratio"] = {"train_step": res["train_step_s"]["lcnn"] / res["train_step_s"]["standard"],
                    "eval_forward": res["eval_forward_s"]["lcnn"] / res["eval_forward_s"]["standard"],
                    "peak_memory": mem["lcnn"] / max(mem["standard"], 1e-9)}
    rows = [["train step (s)", res["train_step_s"]["standard"], res["train_step_s"]["lcnn"], res["ratio"]["train_step"]],
            ["eval forward (s)", res["eval_forward_s"]["standard"], res["eval_forward_s"]["lcnn"], res["ratio"]["eval_forward"]],
            ["peak memory (MiB)", mem["standard"], mem["lcnn"], res["ratio"]["peak_memory"]]]
    print(f"{args.model}, batch {args.batch}, {args.size}x{args.size}, {dev}, {args.repeats} interleaved repeats (medians)")
    print(table(["", "standard", "lcnnify", "ratio"], rows))
    if args.breakdown:
        std = res["train_step_s"]["standard"]
        print("\nwhere the time goes (training step, ratio to standard):")
        print(table(["variant", "s", "ratio"], [[k, v, v / std] for k, v in res["train_step_s"].items()]))
    write_json(Path(args.out), res)


if __name__ == "__main__":
    main()
