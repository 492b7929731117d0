"""The demo's figures: Fig. 1 (two moons: decision boundaries and the activations) and Fig. 2 (relative gradient
robustness against the noise norm, with the first-order upper bound of §4)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..train import METHOD_LABELS
from .config import DemoConfig

__all__ = ["fig1_two_moons", "fig2_gradient_robustness"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fig1_two_moons(path: Path, moons: dict[str, dict[str, Any]]) -> None:
    """(a, b) P(class 1) of the standard model and of its LCNN conversion over the plane, with the decision
    boundary (P = 0.5) and the training points, one shared colour bar; (c) softplus and centered softplus
    (s0(0) = 0 for every beta) at three betas, against ReLU, their beta -> infinity limit."""
    plt = _pyplot()
    import numpy as np
    import torch

    from ..nn import CenteredSoftplus

    fig = plt.figure(figsize=(15, 4.8), layout="constrained")
    grid = fig.add_gridspec(1, 4, width_ratios=[1, 1, 0.05, 0.85])
    axes = [fig.add_subplot(grid[0, i]) for i in (0, 1)]
    image = None
    for ax, m, title in zip(axes, ("standard", "lcnn"), ("(a) standard NN (softplus β = 1e3)",
                                                         "(b) LCNN: the same MLP converted by lcnnify")):
        r = moons[m]
        p = np.asarray(r["prob"])
        x0, x1, y0, y1 = r["extent"]
        image = ax.imshow(p, origin="lower", extent=(x0, x1, y0, y1), cmap="RdBu_r", vmin=0, vmax=1, alpha=0.8,
                          aspect="auto")
        gx, gy = np.linspace(x0, x1, p.shape[1]), np.linspace(y0, y1, p.shape[0])
        ax.contour(gx, gy, p, levels=[0.5], colors="k", linewidths=1.5)
        xtr, ytr = np.asarray(r["x_train"]), np.asarray(r["y_train"])
        ax.scatter(xtr[:, 0], xtr[:, 1], c=ytr, cmap="RdBu_r", vmin=0, vmax=1, s=9, edgecolors="k",
                   linewidths=0.3)
        ax.set_title(f"{title}\ntest acc {100 * r['test_acc']:.1f}%, mean normalized curvature "
                     f"{r['curvature']:.2f}", fontsize=10)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_xlabel("input $x_1$")
        ax.set_ylabel("input $x_2$")
    cbar = fig.colorbar(image, cax=fig.add_subplot(grid[0, 2]))
    cbar.set_label("model's P(class 1)")

    ax = fig.add_subplot(grid[0, 3])
    xs = torch.linspace(-3, 3, 301)
    ax.plot(xs, torch.relu(xs), color="black", lw=5, alpha=0.25, label="ReLU (β → ∞)", zorder=1)
    for beta, col in {0.5: "tab:green", 1.5: "tab:orange", 5.0: "tab:blue"}.items():
        with torch.no_grad():
            cs = CenteredSoftplus(beta=beta)(xs)
        ax.plot(xs, torch.nn.functional.softplus(xs, beta=beta), "--", color=col, lw=1.4, zorder=2,
                label=f"softplus β={beta:g}")
        ax.plot(xs, cs, "-", color=col, lw=1.8, zorder=3, label=f"centered softplus β={beta:g}")
    ax.axhline(0, color="gray", lw=0.5)
    ax.axvline(0, color="gray", lw=0.5)
    ax.set_ylim(-2, 3.5)
    ax.set_xlabel("pre-activation x")
    ax.set_ylabel("activation")
    ax.legend(fontsize=7.5, loc="upper left")
    ax.set_title("(c) softplus vs centered softplus (s₀(0) = 0)", fontsize=10)
    fig.suptitle("Fig. 1 (miniature): two moons, one ReLU MLP trained as the standard model and as an LCNN "
                 "(black line: decision boundary P = 0.5; dots: training points)", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig2_gradient_robustness(path: Path, cfg: DemoConfig, summary: dict[str, Any]) -> None:
    """Relative gradient robustness ||grad f(x+e) - grad f(x)|| / ||grad f(x)|| against ||e|| (log-log), mean
    over seeds with a band of one std; the dotted line of each method is ||e|| * E[C_f] with its measured mean
    normalized curvature C_f, the first-order **upper bound** of §4 (||H e|| <= ||H|| ||e||): it is reached only
    by noise along the Hessian's top eigenvector, so random noise sits below it. Lower is better."""
    plt = _pyplot()
    import numpy as np
    from matplotlib.lines import Line2D

    from .report import _ok

    fig, ax = plt.subplots(figsize=(10.5, 5.4), layout="constrained")
    cmap = plt.get_cmap("tab10")
    for i, m in enumerate(cfg.methods):
        if not _ok(summary, m):
            continue
        gr = summary[m]["gradient_robustness"]
        norms = np.array([float(k) for k in gr])
        mean = np.array([gr[k]["mean"] for k in gr])
        std = np.array([gr[k]["std"] for k in gr])
        col = cmap(i)
        ax.plot(norms, mean, "o-", color=col, label=METHOD_LABELS[m], lw=1.8, ms=4)
        ax.fill_between(norms, np.clip(mean - std, 1e-12, None), mean + std, color=col, alpha=0.15)
        ax.plot(norms, norms * summary[m]["curvature"]["mean"], ":", color=col, lw=1.2, alpha=0.9)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("noise norm ||e||₂ (random direction; images in [0, 1])")
    ax.set_ylabel("||∇f(x+e) − ∇f(x)|| / ||∇f(x)||   (lower is better)")
    ax.set_title("Fig. 2 (miniature): relative gradient robustness on digits -- how much the input gradient\n"
                 "changes under random noise (solid: measured; dotted: first-order upper bound from E[C_f])",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="gray", marker="o", lw=1.8, ms=4),
                Line2D([], [], color="gray", ls=":", lw=1.2)]
    labels += ["measured: mean ± std over seeds", "upper bound ||e||·E[C_f] (§4, worst direction)"]
    ax.legend(handles, labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.savefig(path, dpi=110)
    plt.close(fig)
