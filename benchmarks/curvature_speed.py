"""Per-sample Hessian-norm estimation: lcnnify.metrics.curvature (batched Lanczos) vs the paper's method.

The paper's method is the reference code's ``curvature_hessian_estimator`` (kylematoba/lcnn,
estimate_curvature.py): double-backward power iteration ``u <- Hu / (||Hu|| + 1e-6)`` and the Rayleigh
quotient ``|u'Hu|``, re-implemented here with ``num_power_iter = iters - 1`` so that both methods spend the
same number (``iters``) of Hessian-vector products.

1. Speed: timm resnet18 with every ReLU replaced by Softplus(beta), random init, in eval mode; medians of
   alternating runs (A B A B ...) in one process, ratio ours / paper, in wall time and in process CPU time
   (the latter is much less sensitive to other jobs on a shared machine).
2. Accuracy: relative error of both methods against the exact per-sample Hessian norm
   (``torch.autograd.functional.hessian``) of a small softplus CNN, at 10 and 20 Hessian-vector products; and,
   on the resnet18 batch, against a long float64 Lanczos run from another start vector (``--reference-iters``)
   as a proxy for the exact norm (the exact 3072 x 3072 Hessians are too slow on a CPU).

Usage: ``python benchmarks/curvature_speed.py [--batch 8 --size 32 --iters 20 --repeats 3 --threads 1]``.
Prints a table and writes ``benchmarks/curvature_speed.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lcnnify.metrics import curvature  # noqa: E402


def paper_hessian_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, n_hvp: int) -> torch.Tensor:
    """The reference implementation's estimator with ``n_hvp`` Hessian-vector products in total."""
    model.eval()
    dims = tuple(range(1, x.ndim))
    view = (-1,) + (1,) * (x.ndim - 1)
    u = torch.randn_like(x)
    u /= torch.norm(u, p=2, dim=dims, keepdim=True)
    with torch.enable_grad():
        image = x.clone().requires_grad_()
        out = model(image)
        loss = F.nll_loss(F.log_softmax(out, 1), y, reduction="none")
        (gradients,) = torch.autograd.grad(loss.sum(), image, create_graph=True)
        for _ in range(n_hvp - 1):
            (hvp,) = torch.autograd.grad((gradients * u.detach()).sum(), image, retain_graph=True)
            u = hvp / (torch.norm(hvp, p=2, dim=dims).view(view) + 1e-6)
        (hvp,) = torch.autograd.grad((gradients * u.detach()).sum(), image)
        return (hvp * u).sum(dims).abs().detach()


def softplus_resnet18(num_classes: int, beta: float) -> nn.Module:
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=num_classes)
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.Softplus(beta=beta))
                count += 1
    assert count > 0 and not any(isinstance(m, nn.ReLU) for m in model.modules())
    return model.eval()


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Softplus(beta=3.0), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                         nn.Softplus(beta=3.0), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).double().eval()


def exact_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = []
    for i in range(x.shape[0]):
        h = torch.autograd.functional.hessian(lambda xi, i=i: F.cross_entropy(model(xi[None]), y[i:i + 1]), x[i])
        d = x[i].numel()
        out.append(torch.linalg.eigvalsh(h.reshape(d, d)).abs().max())
    return torch.stack(out)


def err_stats(est: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    e = ((est.double() - ref.double()).abs() / ref.double()).cpu()
    return {"median": e.median().item(), "mean": e.mean().item(), "max": e.max().item()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=32, help="input resolution of the resnet18 (3 x size x size)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--beta", type=float, default=10.0, help="softplus beta replacing ReLU")
    ap.add_argument("--iters", type=int, default=20, help="Hessian-vector products per sample, both methods")
    ap.add_argument("--repeats", type=int, default=5, help="A B pairs")
    ap.add_argument("--reference-iters", type=int, default=60,
                    help="Lanczos steps of the resnet18 proxy reference (0: skip)")
    ap.add_argument("--exact-samples", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1 avoids OpenMP oversubscription on a shared machine)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    # ---------------------------------------------------------------- speed on resnet18
    model = softplus_resnet18(args.classes, args.beta).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=g).to(device)
    y = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)

    def run_ours():
        return curvature(model, x, y, iters=args.iters, chunk_size=args.batch).hessian_norm

    def run_paper():
        return paper_hessian_norm(model, x, y, args.iters).cpu()

    run_ours(), run_paper()  # warm-up
    times = {"ours_lanczos": [], "paper_power": []}
    cpu_times = {"ours_lanczos": [], "paper_power": []}
    results = {}
    for _ in range(args.repeats):
        for name, fn in (("ours_lanczos", run_ours), ("paper_power", run_paper)):
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            results[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu_med = {k: statistics.median(v) for k, v in cpu_times.items()}
    ratio = med["ours_lanczos"] / med["paper_power"]
    cpu_ratio = cpu_med["ours_lanczos"] / cpu_med["paper_power"]

    resnet_err = None
    if args.reference_iters > 0:
        # independent of the measured run: float64, another start vector, more steps
        ref = curvature(model.double(), x.double(), y, iters=args.reference_iters, chunk_size=args.batch,
                        generator=torch.Generator().manual_seed(12345)).hessian_norm
        model.float()
        resnet_err = {"reference": f"float64 Lanczos, {args.reference_iters} steps, other start vector",
                      "ours_lanczos": err_stats(results["ours_lanczos"], ref),
                      "paper_power": err_stats(results["paper_power"], ref)}

    # ---------------------------------------------------------------- accuracy vs exact Hessians, small model
    small = small_cnn(0)
    gs = torch.Generator().manual_seed(1)
    xs = torch.randn(args.exact_samples, 3, 8, 8, generator=gs, dtype=torch.float64)
    ys = torch.randint(0, 5, (args.exact_samples,), generator=gs)
    exact = exact_norms(small, xs, ys)
    small_err = {}
    for k in (10, 20):
        torch.manual_seed(0)
        small_err[k] = {"ours_lanczos": err_stats(curvature(small, xs, ys, iters=k).hessian_norm, exact),
                        "paper_power": err_stats(paper_hessian_norm(small, xs, ys, k), exact)}

    # ---------------------------------------------------------------- report
    print(f"\nresnet18 (softplus beta={args.beta}), batch {args.batch} x 3x{args.size}x{args.size}, "
          f"{args.iters} Hessian-vector products / sample, device {device}, {args.threads} thread(s)")
    print(f"{'method':<16}{'wall median s':>14}{'cpu median s':>14}   wall runs (s)")
    for k in times:
        print(f"{k:<16}{med[k]:>14.3f}{cpu_med[k]:>14.3f}   {' '.join(f'{t:.3f}' for t in times[k])}")
    print(f"ratio ours / paper: wall {ratio:.3f}, process cpu {cpu_ratio:.3f}  (<= 1: ours as fast or faster; "
          f"on a shared machine the cpu-time ratio is the less noisy one)")
    if resnet_err:
        print(f"\nresnet18 relative error vs {resnet_err['reference']} (proxy for exact):")
        for k in ("ours_lanczos", "paper_power"):
            s = resnet_err[k]
            print(f"  {k:<26} median {s['median']:.2e}  mean {s['mean']:.2e}  max {s['max']:.2e}")
    print(f"\nsmall softplus CNN (3x8x8, d=192), {args.exact_samples} samples, relative error vs exact Hessian:")
    print(f"{'HVPs':>6} {'method':<16}{'median':>10}{'mean':>10}{'max':>10}")
    for k, d in small_err.items():
        for name, s in d.items():
            print(f"{k:>6} {name:<16}{s['median']:>10.2e}{s['mean']:>10.2e}{s['max']:>10.2e}")

    out = {
        "config": vars(args),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "wall_times_s": times, "wall_median_s": med, "ratio_ours_over_paper_wall": ratio,
        "cpu_times_s": cpu_times, "cpu_median_s": cpu_med, "ratio_ours_over_paper_cpu": cpu_ratio,
        "resnet18_error_vs_long_lanczos": resnet_err,
        "small_cnn_error_vs_exact": {str(k): v for k, v in small_err.items()},
    }
    path = Path(__file__).with_suffix(".json")
    path.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
