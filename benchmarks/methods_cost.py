"""Cost of one training step of each method of lcnnify.train, relative to `standard` (paper §5).

The paper reports average per-epoch training times on a GTX 1080Ti for a CIFAR-100 ResNet-18: standard /
softplus + weight decay ~100 s, LCNN ~160 s (1.6x), GradReg ~270 s (2.7x), LCNN + GradReg ~350 s (3.5x),
CURE / adversarial training ~500 s (5x).

Here every method trains the same base model on the same batch: one step = ``lcnnify.train.train_step``
(forward, penalty, backward, SGD step; adversarial training includes its 3-step PGD). Steps are timed
interleaved (A B C ... then again, the order rotated every round) in one process, so that machine load affects
every method alike; we report the median and ratios of medians to ``standard``.

    python benchmarks/methods_cost.py                      # small ResNet-ish CNN, 3x32x32, batch 64, CPU
    python benchmarks/methods_cost.py --model resnet18 --device cuda --batch-size 128 --rounds 30

Writes ``benchmarks/methods_cost.json`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lcnnify.train import METHODS, prepare_model, recipe_optimizer, train_step  # noqa: E402

#: Per-epoch time relative to the standard model, paper §5 (GTX 1080Ti, ResNet-18, CIFAR-100).
PAPER_RATIOS = {"standard": 1.0, "softplus+wd": 1.0, "lcnn": 1.6, "gradreg": 2.7, "lcnn+gradreg": 3.5,
                "cure": 5.0, "adversarial": 5.0}


class BasicBlock(nn.Module):
    """torchvision-style residual block (one ReLU module used at two call sites)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.down is None else self.down(x)))


class SmallResNet(nn.Module):
    """A ResNet-ish CNN for 3x32x32 inputs: stem + 3 stages (16, 32, 64 channels) of one block each."""

    def __init__(self, classes: int = 10, width: int = 16) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
        self.layers = nn.Sequential(BasicBlock(w, w, 1), BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 4 * w, 2))
        self.fc = nn.Linear(4 * w, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


def build_model(name: str, classes: int) -> nn.Module:
    if name == "small":
        return SmallResNet(classes)
    import timm  # any timm model name, e.g. resnet18

    return timm.create_model(name, num_classes=classes)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small", help="'small' (default: ResNet-ish, 3 blocks) or a timm name")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=10, help="timed steps per method (interleaved)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    dev = torch.device(args.device)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if "standard" not in methods:
        methods.insert(0, "standard")

    torch.manual_seed(args.seed)
    base = build_model(args.model, args.classes)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(dev)
    y = torch.randint(0, args.classes, (args.batch_size,), generator=g).to(dev)

    runs = {}
    for m in methods:
        torch.manual_seed(args.seed)
        model = prepare_model(base, m, example_inputs=x[:2].cpu()).to(dev).train()
        # lr 0.01 instead of the recipe's 0.1: the same random batch is trained on over and over, and the
        # cost of a step must not change because the weights blow up (the lr does not change the work done)
        opt = recipe_optimizer(model, lr=0.01)
        gen = torch.Generator(device=dev).manual_seed(args.seed)
        runs[m] = (model, opt, gen)

    def step(m: str) -> float:
        model, opt, gen = runs[m]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        train_step(model, opt, x, y, m, generator=gen)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    for m in methods:
        for _ in range(args.warmup):
            step(m)
    times: dict[str, list[float]] = {m: [] for m in methods}
    t_start = time.perf_counter()
    for r in range(args.rounds):
        order = methods[r % len(methods):] + methods[:r % len(methods)]
        for m in order:
            times[m].append(step(m))
        print(f"\rround {r + 1}/{args.rounds} ({time.perf_counter() - t_start:.0f}s)", end="", file=sys.stderr)
    print(file=sys.stderr)

    med = {m: statistics.median(v) for m, v in times.items()}
    ratios = {m: med[m] / med["standard"] for m in methods}
    print(f"\n{args.model} on {args.batch_size}x3x{args.image_size}x{args.image_size}, device {dev}, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds (median per step)")
    print(f"{'method':<14}{'ms/step':>10}{'min..max ms':>18}{'ratio':>8}{'paper':>8}")
    for m in methods:
        lo, hi = min(times[m]) * 1e3, max(times[m]) * 1e3
        print(f"{m:<14}{med[m] * 1e3:>10.1f}{f'{lo:.1f}..{hi:.1f}':>18}{ratios[m]:>7.2f}x"
              f"{PAPER_RATIOS.get(m, float('nan')):>7.1f}x")

    result = {
        "benchmark": "methods_cost",
        "what": "seconds per training step (forward + penalty + backward + SGD step) of each lcnnify.train "
                "method on the same model and batch; ratio = median / median of 'standard'",
        "model": args.model, "batch_size": args.batch_size, "image_size": args.image_size,
        "classes": args.classes, "rounds": args.rounds, "warmup": args.warmup, "device": str(dev),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "median_seconds": med, "ratio_to_standard": ratios, "paper_ratio": PAPER_RATIOS,
        "all_seconds": times,
    }
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
