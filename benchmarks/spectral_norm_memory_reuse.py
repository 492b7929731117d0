"""What the spectral norm's step-memory reuse (``lcnnify.nn.spectral_norm._Scratch``) buys: the full LCNN
training step of timm resnet18 (batch 64, 64x64, 1 thread) with the reuse on and off, interleaved in one
process (the module switch ``_REUSE_MEMORY`` flipped between steps), process CPU time and minor page faults
per step.

    python benchmarks/spectral_norm_memory_reuse.py [--rounds 12]
"""
from __future__ import annotations

import argparse
import importlib
import resource
import statistics as st
import time
import warnings

import torch
import torch.nn.functional as F


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    import timm

    from lcnnify import lcnnify, param_groups

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    sn = importlib.import_module("lcnnify.nn.spectral_norm")
    torch.manual_seed(0)
    m = lcnnify(timm.create_model("resnet18", num_classes=10), example_inputs=torch.randn(2, 3, 64, 64))
    x, y = torch.randn(64, 3, 64, 64), torch.randint(0, 10, (64,))
    opt = torch.optim.SGD(param_groups(m, 5e-4), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        (F.cross_entropy(m(x), y) + m.curvature_penalty()).backward()
        opt.step()

    for _ in range(3):
        step()
    secs: dict[bool, list[float]] = {True: [], False: []}
    faults: dict[bool, list[int]] = {True: [], False: []}
    for r in range(args.rounds):
        for on in ((True, False) if r % 2 else (False, True)):
            sn._REUSE_MEMORY = on
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.process_time()
            step()
            secs[on].append(time.process_time() - t0)
            faults[on].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    ratio = [a / b for a, b in zip(secs[True][2:], secs[False][2:])]  # first rounds: the switch settles
    print(f"step CPU time: reuse on {st.median(secs[True]) * 1e3:.1f} ms, off {st.median(secs[False]) * 1e3:.1f} ms; "
          f"on/off per round: median {st.median(ratio):.4f} [min {min(ratio):.4f}, max {max(ratio):.4f}]")
    print(f"minor page faults per step: on {st.median(faults[True]):.0f}, off {st.median(faults[False]):.0f}")


if __name__ == "__main__":
    main()
