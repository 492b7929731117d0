"""From a trained model to an LCNN: preserved conversion and fine-tuning vs an LCNN trained from scratch (digits).

    python benchmarks/pretrained_digits.py [--seeds 2] [--epochs 12] [--finetune-epochs 4] [--quick]

For each seed, on scikit-learn digits (8x8, in [0, 1]) with the built-in ``SmallCNN`` (conv-BN-ReLU x3, global
average pool, linear):

1. ``standard``: the ReLU model trained with the paper's recipe (``fit(method="standard", prepare=False)``);
2. ``converted``: ``lcnnify(model)``: what a user gets today (no training);
3. ``preserved``: ``lcnnify(model, preserve_function=True, example_inputs=<256 training images>)`` (no training);
   accuracy before/after and argmax agreement with the trained model;
4. ``finetuned``: the trained model fine-tuned into an LCNN (``fit(method="lcnn", recipe="finetune")``);
5. ``scratch``: an LCNN trained from scratch with the paper's recipe for as many epochs as ``standard`` got;
6. ``scratch_short``: the same for as many epochs as the fine-tuning got.

Measured on the test set for each: accuracy, normalized curvature ``||Hess_x f|| / ||grad_x f||`` (median and
mean over ``n_geometry`` test images; :func:`lcnnify.metrics.curvature`), l2 PGD accuracy
(:func:`lcnnify.metrics.robust_accuracy`) and the wall time of its training (+ conversion). The ReLU model's
Hessian is zero almost everywhere, so -- as in the paper, whose standard models use softplus with beta = 1e3 --
its curvature is measured on the same weights with every ReLU replaced by softplus(beta = 1e3)
(:func:`lcnnify.regularizers.softplus_model`); its accuracies are those of the ReLU model.

Writes ``pretrained_digits.json`` next to this script (every number, per seed), and, unless ``--no-docs``,
``docs/fig_pretrained.png``. The experiment is a set of functions (:func:`run_seed`, :func:`run`,
:func:`figure`) so that the demo can call them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lcnnify import lcnnify  # noqa: E402
from lcnnify.data import digits  # noqa: E402
from lcnnify.metrics import curvature, robust_accuracy  # noqa: E402
from lcnnify.models import SmallCNN  # noqa: E402
from lcnnify.nn import CenteredSoftplus, LipschitzBatchNorm  # noqa: E402
from lcnnify.regularizers import softplus_model  # noqa: E402
from lcnnify.train import fit  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: The rows of the table, in order.
ROWS = ("standard", "converted", "preserved", "finetuned", "scratch", "scratch_short")
LABELS = {
    "standard": "standard (ReLU), trained",
    "converted": "lcnnify(model)",
    "preserved": "lcnnify(model, preserve_function=True)",
    "finetuned": "preserved + LCNN fine-tuning",
    "scratch": "LCNN from scratch (same epochs as standard)",
    "scratch_short": "LCNN from scratch (same epochs as fine-tuning)",
}


@dataclass(frozen=True)
class Settings:
    """What one run measures (defaults: a few minutes on 2 CPU cores)."""

    seeds: int = 2
    epochs: int = 12               # standard training and the long from-scratch LCNN
    finetune_epochs: int = 4       # fine-tuning and the short from-scratch LCNN
    batch_size: int = 64
    n_example: int = 256           # training images for preserve_function (activation scales, sigma shapes)
    n_geometry: int = 256          # test images for the curvature
    lanczos_iters: int = 20
    n_pgd: int = 200               # test images for PGD (of the 450)
    pgd_steps: int = 10
    eps: tuple[float, ...] = (0.1, 0.2, 0.5)

    @classmethod
    def quick(cls) -> "Settings":
        return cls(seeds=1, epochs=2, finetune_epochs=1, n_geometry=16, lanczos_iters=5, n_pgd=32, pgd_steps=2)


# ------------------------------------------------------------------------------------------------ measurements
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


def _agreement(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    a.eval()
    b.eval()
    with torch.no_grad():
        return float((a(x).argmax(1) == b(x).argmax(1)).double().mean())


def _lcnn_summary(model: nn.Module) -> dict[str, float]:
    with torch.no_grad():
        parts = [m.beta.detach().reshape(-1) for m in model.modules() if isinstance(m, CenteredSoftplus)]
        gammas = [float(m.gamma) for m in model.modules() if isinstance(m, LipschitzBatchNorm)]
    if not parts:
        return {}
    betas = torch.cat(parts)
    return {"beta_median": float(betas.median()), "beta_max": float(betas.max()),
            "gamma_median": statistics.median(gammas) if gammas else math.nan}


def measure(model: nn.Module, test: tuple[torch.Tensor, torch.Tensor], s: Settings, *, seed: int,
            curvature_model: nn.Module | None = None) -> dict[str, Any]:
    """Accuracy, normalized curvature (median, mean) and PGD accuracy of ``model`` on the test set.

    ``curvature_model``: the model whose curvature is measured (default ``model``; the softplus(1e3) twin of a
    ReLU model)."""
    x, y = test
    out: dict[str, Any] = {"accuracy": _accuracy(model, x, y)}
    ng = min(s.n_geometry, len(y))
    c = curvature(curvature_model or model, x[:ng], y[:ng], iters=s.lanczos_iters,
                  generator=torch.Generator().manual_seed(seed))
    out["curvature_median"] = float(c.curvature.median())
    out["curvature_mean"] = float(c.curvature.mean())
    out["grad_norm_mean"] = float(c.grad_norm.mean())
    npgd = min(s.n_pgd, len(y))
    rob = robust_accuracy(model, (x[:npgd], y[:npgd]), s.eps, steps=s.pgd_steps, progress=False,
                          generator=torch.Generator().manual_seed(seed + 1))
    out["pgd_accuracy"] = {str(k): v for k, v in rob.items()}
    out.update(_lcnn_summary(model))
    return out


class _Scale(nn.Module):
    def __init__(self, k: float) -> None:
        super().__init__()
        self.k = float(k)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.k


# ------------------------------------------------------------------------------------------------ one seed
def _fit(model: nn.Module, train: Any, test: Any, s: Settings, seed: int, **kwargs: Any):
    return fit(model, train, test, batch_size=s.batch_size, progress=False, seed=seed, eval_every=10_000, **kwargs)


def run_seed(seed: int, s: Settings = Settings(), *, log=print) -> dict[str, Any]:
    """The whole experiment for one seed: a dict ``{row: {accuracy, curvature_*, pgd_accuracy, seconds, ...}}``
    plus ``"preservation"`` (accuracy before/after, agreement, logit scale)."""
    train, test = digits(seed=0)
    xtr = train.tensors[0]
    te = test.tensors
    rows: dict[str, dict[str, Any]] = {}
    ex = xtr[:s.n_example]

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    trained = _fit(SmallCNN(), train, test, s, seed, method="standard", prepare=False, epochs=s.epochs).model
    t_std = time.perf_counter() - t0
    rows["standard"] = measure(trained, te, s, seed=seed, curvature_model=softplus_model(trained, 1e3))
    rows["standard"]["seconds"] = t_std
    log(f"seed {seed}: standard trained in {t_std:.1f}s, accuracy {rows['standard']['accuracy']:.4f}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        converted = lcnnify(trained, example_inputs=ex)
        t_conv = time.perf_counter() - t0
        t0 = time.perf_counter()
        preserved = lcnnify(trained, example_inputs=ex, preserve_function=True)
        t_pres = time.perf_counter() - t0
    rows["converted"] = measure(converted, te, s, seed=seed) | {"seconds": t_conv}
    rows["preserved"] = measure(preserved, te, s, seed=seed) | {"seconds": t_pres}
    info = preserved.lcnn_preservation
    x, y = te
    with torch.no_grad():
        ref, out = trained(x), preserved.eval()(x)
    preservation = {
        "accuracy_before": rows["standard"]["accuracy"], "accuracy_after": rows["preserved"]["accuracy"],
        "accuracy_plain_conversion": rows["converted"]["accuracy"],
        "agreement": _agreement(trained, preserved, x), "agreement_plain_conversion": _agreement(trained, converted, x),
        "logit_scale": info.output_scale, "exact": info.exact,
        "logit_relative_error": float((out - info.output_scale * ref).norm() / (info.output_scale * ref).norm()),
        "betas": info.betas,
    }
    # the same function at the same temperature: the ReLU model's softplus(1e3) twin with its logits x k. The
    # normalized curvature of the cross-entropy depends on the logit scale, so this, not the standard row, is
    # what the preserved conversion is to be compared with.
    ng = min(s.n_geometry, len(y))
    twin = nn.Sequential(softplus_model(trained, 1e3), _Scale(info.output_scale))
    c = curvature(twin, x[:ng], y[:ng], iters=s.lanczos_iters, generator=torch.Generator().manual_seed(seed))
    preservation["curvature_median_standard_logits_times_k"] = float(c.curvature.median())
    log(f"seed {seed}: preserved conversion in {t_pres:.1f}s: accuracy {preservation['accuracy_before']:.4f} -> "
        f"{preservation['accuracy_after']:.4f}, agreement {preservation['agreement']:.4f} "
        f"(plain lcnnify: {preservation['accuracy_plain_conversion']:.4f}); logits x {info.output_scale:.4f}; "
        f"standard model with logits x k: curvature "
        f"{preservation['curvature_median_standard_logits_times_k']:.3g}")

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ft = _fit(trained, train, test, s, seed, method="lcnn", recipe="finetune", epochs=s.finetune_epochs,
                  example_inputs=ex).model
    rows["finetuned"] = measure(ft, te, s, seed=seed) | {"seconds": t_std + time.perf_counter() - t0,
                                                          "seconds_own": time.perf_counter() - t0}
    log(f"seed {seed}: fine-tuned in {rows['finetuned']['seconds_own']:.1f}s, accuracy "
        f"{rows['finetuned']['accuracy']:.4f}")

    for name, epochs in (("scratch", s.epochs), ("scratch_short", s.finetune_epochs)):
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = _fit(SmallCNN(), train, test, s, seed, method="lcnn", epochs=epochs).model
        rows[name] = measure(m, te, s, seed=seed) | {"seconds": time.perf_counter() - t0}
        log(f"seed {seed}: {name} ({epochs} epochs) in {rows[name]['seconds']:.1f}s, accuracy "
            f"{rows[name]['accuracy']:.4f}")
    return {"seed": seed, "rows": rows, "preservation": preservation}


# ------------------------------------------------------------------------------------------------ all seeds
def run(s: Settings = Settings(), *, log=print) -> dict[str, Any]:
    """Every seed, and the per-row medians over seeds (``summary``)."""
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    t0 = time.perf_counter()
    seeds = [run_seed(k, s, log=log) for k in range(s.seeds)]
    summary: dict[str, dict[str, Any]] = {}
    for row in ROWS:
        vals = [r["rows"][row] for r in seeds]
        entry = {k: statistics.median(v[k] for v in vals) for k in vals[0] if isinstance(vals[0][k], float)}
        entry["pgd_accuracy"] = {e: statistics.median(v["pgd_accuracy"][e] for v in vals)
                                 for e in vals[0]["pgd_accuracy"]}
        summary[row] = entry
    import platform

    return {"settings": dataclasses.asdict(s), "seeds": seeds, "summary": summary,
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")},
            "total_seconds": time.perf_counter() - t0}


def table(result: dict[str, Any]) -> str:
    """The markdown table of the per-row medians (over seeds), with the per-seed range where seeds > 1."""
    s = result["settings"]
    eps = [str(e) for e in s["eps"]]
    head = ("| model | test acc. | norm. curvature (median) | " + " | ".join(f"PGD acc. eps={e}" for e in eps)
            + " | training time (s) | median beta |")
    lines = [head, "|" + "---|" * (6 + len(eps) - 1)]
    for row in ROWS:
        vals = [r["rows"][row] for r in result["seeds"]]

        def cell(key: str, fmt: str, sub: str | None = None) -> str:
            xs = [v[key][sub] if sub else v[key] for v in vals]
            med = statistics.median(xs)
            if len(xs) == 1:
                return format(med, fmt)
            return f"{format(med, fmt)} ({format(min(xs), fmt)}-{format(max(xs), fmt)})"

        secs = cell("seconds", ".1f") if row not in ("converted", "preserved") else cell("seconds", ".2f") + " (conv.)"
        beta = cell("beta_median", ".3g") if "beta_median" in vals[0] else "-"
        lines.append(f"| {LABELS[row]} | {cell('accuracy', '.3f')} | {cell('curvature_median', '.3g')} | "
                     + " | ".join(cell("pgd_accuracy", ".3f", e) for e in eps) + f" | {secs} | {beta} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ figure
def figure(result: dict[str, Any], path: str | Path) -> None:
    """Two panels: PGD accuracy vs eps per model; normalized curvature vs training wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = result["summary"]
    eps = [0.0] + [float(e) for e in result["settings"]["eps"]]
    colors = {"standard": "tab:gray", "converted": "tab:red", "preserved": "tab:orange", "finetuned": "tab:blue",
              "scratch": "tab:green", "scratch_short": "tab:olive"}
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for row in ROWS:
        accs = [summ[row]["accuracy"]] + [summ[row]["pgd_accuracy"][str(e)] for e in eps[1:]]
        a.plot(eps, accs, "o-", color=colors[row], label=LABELS[row])
    a.set_xlabel("l2 PGD radius eps (images in [0, 1])")
    a.set_ylabel("test accuracy under attack")
    a.set_title("Robustness: accuracy vs attack radius")
    a.set_ylim(0, 1.02)
    a.grid(alpha=0.3)
    a.legend(fontsize=7, loc="lower left", bbox_to_anchor=(0.0, 0.12))  # between the red line and the rest
    for row in ROWS:
        t = max(summ[row]["seconds"], 0.05)
        b.scatter([t], [summ[row]["curvature_median"]], s=60, color=colors[row], label=LABELS[row], zorder=3)
        b.annotate(f"acc {summ[row]['accuracy']:.3f}", (t, summ[row]["curvature_median"]), fontsize=7,
                   textcoords="offset points", xytext=(6, 4))
    b.set_xscale("log")
    b.set_yscale("log")
    b.set_xlabel("wall time to obtain the model (s, log; fine-tuned: incl. the standard training)")
    b.set_ylabel("normalized curvature ||H|| / ||g|| (median, log)")
    b.set_title("Curvature vs cost")
    b.grid(alpha=0.3, which="both")
    fig.suptitle(f"SmallCNN on digits: median over {result['settings']['seeds']} seed(s)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=Settings.seeds)
    p.add_argument("--epochs", type=int, default=Settings.epochs)
    p.add_argument("--finetune-epochs", type=int, default=Settings.finetune_epochs)
    p.add_argument("--quick", action="store_true", help="a smoke run (seconds); writes nothing into docs/")
    p.add_argument("--no-docs", action="store_true", help="do not write docs/fig_pretrained.png")
    p.add_argument("--out", default=str(HERE / "pretrained_digits.json"))
    a = p.parse_args(argv)
    s = Settings.quick() if a.quick else Settings(seeds=a.seeds, epochs=a.epochs, finetune_epochs=a.finetune_epochs)
    result = run(s, log=lambda m: print(m, flush=True))
    print()
    print(table(result))
    print(f"\ntotal {result['total_seconds']:.0f}s")
    if not a.quick:
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {a.out}")
        if not a.no_docs:
            figure(result, ROOT / "docs" / "fig_pretrained.png")
            print(f"wrote {ROOT / 'docs' / 'fig_pretrained.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
