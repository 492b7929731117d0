"""``lcnnify demo``: the paper's Fig. 1, Tables 1-3 and Fig. 2 in miniature, on a laptop CPU, with no download.

* **Fig. 1** -- two moons: decision boundaries of a small ReLU MLP trained as the paper's *standard* model
  (softplus, beta = 1e3) and of its LCNN conversion (``lcnnify``), side by side; plus softplus vs centered
  softplus (panel c).
* **Tables 1-3, Fig. 2** -- scikit-learn's handwritten digits (1797 real 8x8 gray images, shipped with
  scikit-learn), a small ReLU + BatchNorm CNN (:class:`lcnnify.models.SmallCNN`) trained with all seven methods
  of the paper's §5 through :func:`lcnnify.train.fit` (the LCNN methods convert it with :func:`lcnnify.lcnnify`),
  several seeds, mean +- std over seeds as in the paper:

  - Table 1: E||grad_x f||, E||Hess_x f|| (Lanczos), E normalized curvature, accuracy, training time per epoch
    relative to standard;
  - Table 2: l2-PGD robust accuracy at the paper's eps 0.05, 0.1, 0.15, 0.2 (plus a stronger 0.5);
  - Table 3: train-test discrepancy of the three geometric quantities;
  - Fig. 2: relative gradient robustness ||grad f(x+e) - grad f(x)|| / ||grad f(x)|| vs ||e||.

Outputs (``--out``): ``results.json`` (every number, per run and aggregated, with the machine, date and
settings), ``results.md`` (the tables), ``fig1_two_moons.png`` and ``fig2_gradient_robustness.png``.

Why 8x8 and not upsampled: the double-backward methods (GradReg, CURE) and the Hessian measurements cost ~4x
more at 16x16 and the whole demo must run in < 10 minutes on 2 CPU cores; upsampling adds no information.
The training runs go to ``workers`` single-threaded processes (tiny models: intra-op threads only add
overhead), so two cores run two trainings at once.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

__all__ = ["DemoConfig", "run_demo", "format_table", "PAPER", "METHOD_LABELS", "EPS_NOTE"]

#: Display names, in the paper's order.
METHOD_LABELS = {
    "standard": "Standard",
    "lcnn": "LCNN",
    "gradreg": "GradReg",
    "lcnn+gradreg": "LCNN + GradReg",
    "cure": "CURE",
    "softplus+wd": "Softplus + Wt. Decay",
    "adversarial": "Adversarial Training",
}

#: The paper's numbers (ResNet-18, CIFAR-100 for Table 1/2; Table 3 as printed; times on a GTX 1080 Ti).
PAPER = {
    "table1": {  # grad, hess, curvature, accuracy (%)
        "standard": (19.66, 6061.96, 270.89, 77.42), "lcnn": (22.04, 1143.62, 69.50, 77.30),
        "gradreg": (8.86, 776.56, 89.47, 77.20), "lcnn+gradreg": (9.87, 154.36, 25.30, 77.29),
        "cure": (8.86, 979.45, 116.31, 76.48), "softplus+wd": (18.08, 1052.84, 70.39, 77.44),
        "adversarial": (7.99, 501.43, 63.79, 76.96),
    },
    "table2": {  # clean, 0.05, 0.1, 0.15, 0.2 (%)
        "standard": (77.42, 59.97, 37.55, 23.41, 16.11), "lcnn": (77.16, 61.17, 39.72, 25.60, 17.66),
        "gradreg": (77.20, 71.90, 61.06, 49.19, 38.09), "lcnn+gradreg": (77.29, 72.68, 63.36, 52.96, 42.70),
        "cure": (76.48, 71.39, 61.28, 49.60, 39.04), "softplus+wd": (77.44, 60.86, 38.04, 23.85, 16.20),
        "adversarial": (76.96, 72.76, 64.70, 54.80, 44.98),
    },
    "table3": {  # grad, hess, curvature
        "standard": (11.75, 12.28, 0.025), "gradreg": (11.33, 11.22, 0.017), "lcnn": (19.99, 11.33, 0.129),
        "lcnn+gradreg": (21.82, 10.43, 0.146),
    },
    "seconds_per_epoch": {"standard": 100, "softplus+wd": 100, "lcnn": 160, "gradreg": 270, "lcnn+gradreg": 350,
                          "cure": 500, "adversarial": 500},
    "curvature_ratio": {"lcnn": 270.89 / 69.50, "lcnn+gradreg": 270.89 / 25.30},
}

PAPER_EPS = (0.05, 0.1, 0.15, 0.2)
CIFAR_DIM = 3 * 32 * 32
CIFAR_MEAN_L2 = 29.0  # approx. mean ||x||_2 of a CIFAR image in [0, 1]^3072 (pixel RMS ~0.52)

EPS_NOTE = (
    "eps is the l2 radius on images in [0, 1], exactly as in the paper, but the paper's images are CIFAR "
    "3x32x32 (d = 3072) and these are 1x{s}x{s} digits (d = {d}). The same l2 radius spread over fewer pixels "
    "is a larger per-pixel change: the RMS change per pixel is eps/sqrt(d) = eps/{sq:.3g} here vs eps/55.4 on "
    "CIFAR, i.e. {f:.2f}x larger (eps = 0.2: {pp:.4f} = {pp255:.1f}/255 per pixel here, 0.0036 = 0.92/255 on "
    "CIFAR); relative to the image norm (mean ||x||_2 = {xn:.2f} here, ~29 on CIFAR) eps is {g:.1f}x larger. "
    "The CIFAR-equivalent per-pixel strength of the paper's eps = 0.05 ... 0.2 would be eps = {e1:.3f} ... "
    "{e4:.3f} here. So the paper's four eps are *stronger* attacks on these images than on CIFAR, yet digits have "
    "wide margins (an easy 10-class problem), so accuracies fall less; eps = 0.5 is added to separate the "
    "methods.")


# ---------------------------------------------------------------------------------------------- config
@dataclass
class DemoConfig:
    """Every setting of the demo (all recorded in results.json)."""

    seeds: int = 3
    epochs: int = 12
    batch_size: int = 64
    lr: float = 0.1
    image_size: int = 8
    width: int = 16
    max_train: int | None = None  # train on the first N training images (None: all 1347)
    n_geometry: int = 300  # test samples for Hessians (and as many train samples for Table 3)
    lanczos_iters: int = 20
    n_pgd: int = 450  # all test images
    pgd_steps: int = 10
    eps: tuple[float, ...] = PAPER_EPS
    extra_eps: tuple[float, ...] = (0.5,)
    noise_norms: tuple[float, ...] = (1e-3, 2.15e-3, 4.64e-3, 1e-2, 2.15e-2, 4.64e-2, 1e-1)
    n_gradrob: int = 200
    moons_n: int = 500
    moons_noise: float = 0.25
    moons_epochs: int = 150
    moons_width: int = 64
    moons_grid: int = 200
    methods: tuple[str, ...] = ("standard", "lcnn", "gradreg", "lcnn+gradreg", "cure", "softplus+wd",
                                "adversarial")
    #: extra ``fit`` arguments per method (deviations from lcnnify.train's defaults; recorded and reported)
    method_options: dict[str, dict[str, Any]] = field(default_factory=lambda: {"cure": {"cure_weight": 0.01}})
    workers: int = 2
    timing_rounds: int = 5  # interleaved timing of one training step per method (A B C ... A B C ...)
    timing_steps: int = 5
    quick: bool = False

    @classmethod
    def quick_config(cls, **overrides: Any) -> "DemoConfig":
        """A tiny version for the test suite (seconds, not minutes): same code paths, numbers meaningless."""
        base = cls(seeds=2, epochs=1, max_train=192, n_geometry=16, lanczos_iters=5, n_pgd=16, pgd_steps=2,
                   noise_norms=(1e-3, 1e-2, 1e-1), n_gradrob=16, moons_n=120, moons_epochs=2, moons_width=16,
                   moons_grid=40, workers=1, timing_rounds=2, timing_steps=1, quick=True)
        return replace(base, **overrides)


# ---------------------------------------------------------------------------------------------- helpers
def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, markdown: bool = False) -> str:
    """A plain-text (aligned) or markdown table."""
    rows = [[str(c) for c in r] for r in rows]
    headers = [str(h) for h in headers]
    if markdown:
        esc = lambda c: c.replace("|", "\\|")  # noqa: E731 - a literal | would split the cell
        lines = ["| " + " | ".join(map(esc, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def fmt(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([fmt(headers), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)])


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    v = [float(x) for x in values]
    n = len(v)
    m = sum(v) / n if n else float("nan")
    s = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1)) if n > 1 else 0.0
    return {"mean": m, "std": s, "n": n}


def _num(x: float) -> str:
    """3 significant digits, no exponent for the usual ranges."""
    if not math.isfinite(x):
        return str(x)
    a = abs(x)
    if a == 0:
        return "0"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    if a >= 1e-3:
        return f"{x:.3g}" if a >= 0.01 else f"{x:.2g}"
    return f"{x:.1e}"


def _pm(ms: dict[str, float], scale: float = 1.0, fmt: Callable[[float], str] | None = None) -> str:
    f = fmt or _num
    return f"{f(ms['mean'] * scale)} ± {f(ms['std'] * scale)}"


def _pct(x: float) -> str:
    return f"{x:.1f}"


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "usable_cpus": usable, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__}
    with contextlib.suppress(OSError, AttributeError):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    return info


@contextlib.contextmanager
def _threads(n: int):
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# ------------------------------------------------------------------------------------------------ jobs
def _lcnn_parameters(model: Any) -> dict[str, list[float]]:
    from .nn import CenteredSoftplus, LipschitzBatchNorm

    betas = [float(m.beta.detach().mean()) for m in model.modules() if isinstance(m, CenteredSoftplus)]
    gammas = [float(m.gamma.detach()) for m in model.modules() if isinstance(m, LipschitzBatchNorm)]
    lips = [float(m.lipschitz_constant().detach()) for m in model.modules() if isinstance(m, LipschitzBatchNorm)]
    return {"beta": betas, "gamma": gammas, "bn_lipschitz": lips} if betas or gammas else {}


def _digits_job(cfg: DemoConfig, method: str, seed: int, report: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from .data import digits
    from .metrics import evaluate_geometry, gradient_robustness, robust_accuracy, train_test_discrepancy
    from .models import SmallCNN
    from .train import fit

    train, test = digits(seed=0, image_size=cfg.image_size)
    if cfg.max_train is not None:
        train = torch.utils.data.TensorDataset(*(t[: cfg.max_train] for t in train.tensors))
    torch.manual_seed(seed)  # the same initial weights for every method of a seed (paired comparison)
    base = SmallCNN(num_classes=10, in_channels=1, width=cfg.width)
    t0 = time.perf_counter()
    epochs_done = [0]

    def on_epoch(rec: dict[str, Any]) -> None:
        epochs_done[0] += 1
        report("epoch")

    try:
        res = fit(base, train, test, method=method, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                  progress=False, seed=seed, eval_every=cfg.epochs, callback=on_epoch,
                  **dict(cfg.method_options.get(method, {})))
    except FloatingPointError as exc:  # the training loss became inf/nan: a result too, report it as such
        for _ in range(cfg.epochs - epochs_done[0] + 2):
            report("skipped")
        return {"kind": "digits", "method": method, "seed": seed, "diverged": True, "error": str(exc),
                "epochs_done": epochs_done[0]}
    train_wall = time.perf_counter() - t0
    model = res.model.eval()
    secs = [h["seconds"] for h in res.history]
    steady = secs[1:] if len(secs) > 1 else secs  # the first epoch pays one-off costs (allocations, warm-up)

    xt, yt = test.tensors
    xtr, ytr = train.tensors
    ng = min(cfg.n_geometry, len(yt), len(ytr))
    gen = lambda k: torch.Generator().manual_seed(1000 * seed + k)  # noqa: E731
    geo_test = evaluate_geometry(model, (xt[:ng], yt[:ng]), iters=cfg.lanczos_iters, progress=False,
                                 generator=gen(1), return_samples=True)
    hess_max = float(geo_test.pop("samples").hessian_norm.max())
    bound_info: dict[str, Any] = {}
    if method in ("lcnn", "lcnn+gradreg"):  # the data-free bound of the trained LCNN vs the measured maximum
        try:
            from .bounds import bound

            b = bound(model, tuple(xt.shape[1:]))
            bound_info = {"loss_hessian": b.loss_hessian, "lipschitz": b.lipschitz, "certified": b.certified}
        except Exception as exc:  # noqa: BLE001 - extra information only
            bound_info = {"error": f"{type(exc).__name__}: {exc}"}
    geo_train = evaluate_geometry(model, (xtr[:ng], ytr[:ng]), iters=cfg.lanczos_iters, progress=False,
                                  generator=gen(2))
    report("eval")
    disc = train_test_discrepancy(geo_train, geo_test)
    disc_train = train_test_discrepancy(geo_train, geo_test, denominator="train")
    npgd = min(cfg.n_pgd, len(yt))
    eps_all = (0.0, *cfg.eps, *cfg.extra_eps)
    robust = robust_accuracy(model, (xt[:npgd], yt[:npgd]), eps_all, steps=cfg.pgd_steps, progress=False,
                             generator=gen(3))
    nr = min(cfg.n_gradrob, len(yt))
    gr = gradient_robustness(model, xt[:nr], yt[:nr], cfg.noise_norms, generator=gen(4))
    report("eval")
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).double().mean())
    return {
        "kind": "digits", "method": method, "seed": seed, "diverged": False,
        "accuracy": acc,
        "epoch_seconds": secs, "seconds_per_epoch": sum(steady) / len(steady), "train_wall_seconds": train_wall,
        "final_train_loss": res.history[-1]["loss"], "final_train_acc": res.history[-1]["train_acc"],
        "geometry_test": {k: geo_test[k] for k in ("grad_norm", "hessian_norm", "curvature", "accuracy",
                                                   "num_samples")},
        "geometry_train": {k: geo_train[k] for k in ("grad_norm", "hessian_norm", "curvature", "accuracy",
                                                     "num_samples")},
        "discrepancy": disc, "discrepancy_over_train": disc_train,
        "robust_accuracy": {str(k): v for k, v in robust.items()},
        "pgd_samples": npgd,
        "gradient_robustness": {str(k): {"mean": float(v.mean()), "median": float(v.median())}
                                for k, v in gr.items()},
        "gradient_robustness_samples": nr,
        "lcnn_parameters": _lcnn_parameters(model),
        "hessian_norm_max_test": hess_max,
        "bound": bound_info,
        "fit_config": res.config,
    }


def _moons_job(cfg: DemoConfig, method: str, seed: int, report: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from .data import two_moons
    from .metrics import curvature
    from .models import MLP
    from .train import fit

    xtr, ytr, xte, yte = two_moons(n=cfg.moons_n, noise=cfg.moons_noise, seed=seed)
    torch.manual_seed(seed)
    base = MLP(in_features=2, num_classes=2, width=cfg.moons_width, depth=3)
    res = fit(base, (xtr, ytr), (xte, yte), method=method, epochs=cfg.moons_epochs, batch_size=cfg.batch_size,
              lr=cfg.lr, progress=False, seed=seed, eval_every=cfg.moons_epochs)
    model = res.model.eval()
    lo, hi = (-2.0, -1.5), (3.0, 2.0)
    g = cfg.moons_grid
    xs, ys = torch.linspace(lo[0], hi[0], g), torch.linspace(lo[1], hi[1], g)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    with torch.no_grad():
        p = model(torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)).softmax(1)[:, 1].reshape(g, g)
    c = curvature(model, xte, yte)
    report("moons")
    return {
        "kind": "moons", "method": method, "seed": seed, "extent": [lo[0], hi[0], lo[1], hi[1]],
        "prob": p.numpy().tolist(), "x_train": xtr.numpy().tolist(), "y_train": ytr.numpy().tolist(),
        "train_acc": res.history[-1]["train_acc"], "test_acc": res.history[-1]["test_acc"],
        "curvature": float(c.curvature.mean()), "grad_norm": float(c.grad_norm.mean()),
        "hessian_norm": float(c.hessian_norm.mean()),
    }


_QUEUE: Any = None


def _worker_init(queue: Any) -> None:
    global _QUEUE
    import warnings

    import torch

    torch.set_num_threads(1)
    _QUEUE = queue
    warnings.filterwarnings("ignore", category=UserWarning)


def _run_job(cfg: DemoConfig, job: tuple[str, str, int]) -> dict[str, Any]:
    """Entry point of a worker process (also called in-process when ``workers == 1``)."""
    kind, method, seed = job
    report = (lambda what: _QUEUE.put((job, what))) if _QUEUE is not None else (lambda what: None)
    fn = _moons_job if kind == "moons" else _digits_job
    return fn(cfg, method, seed, report)


def _job_units(cfg: DemoConfig, job: tuple[str, str, int]) -> int:
    return 1 if job[0] == "moons" else cfg.epochs + 2


# Rough relative cost per epoch (measured on CPU), to start the most expensive runs first.
_COST = {"cure": 8, "adversarial": 4, "lcnn+gradreg": 4, "gradreg": 3, "lcnn": 2.5, "standard": 1,
         "softplus+wd": 1}


def _drain(queue: Any, bar: Any) -> None:
    import queue as _q

    while True:
        try:
            queue.get_nowait()
        except (_q.Empty, EOFError, OSError):
            return
        bar.update(1)


def _run_jobs(cfg: DemoConfig, jobs: list[tuple[str, str, int]], progress: bool) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    total = sum(_job_units(cfg, j) for j in jobs)
    bar = tqdm(total=total, desc="demo", unit="step", disable=not progress, dynamic_ncols=True,
               file=sys.stderr)
    results: list[dict[str, Any]] = []
    done_runs = 0

    def _postfix(last: str) -> None:
        bar.set_postfix_str(f"runs {done_runs}/{len(jobs)}, last: {last}", refresh=False)

    if cfg.workers <= 1:
        global _QUEUE

        class _Direct:
            def put(self, item: Any) -> None:
                bar.update(1)

        _QUEUE = _Direct()
        try:
            with _threads(1):
                for job in jobs:
                    bar.set_description(f"demo [{job[0]}: {job[1]}, seed {job[2]}]")
                    results.append(_run_job(cfg, job))
                    done_runs += 1
                    _postfix(f"{job[1]}/{job[2]}")
        finally:
            _QUEUE = None
        bar.close()
        return results

    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock
    queue = ctx.Queue()  # progress events from the workers (handed over at process start)
    try:
        with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx, initializer=_worker_init,
                                 initargs=(queue,)) as pool:
            pending = {pool.submit(_run_job, cfg, job): job for job in jobs}
            while pending:
                done, _ = wait(list(pending), timeout=0.25, return_when=FIRST_COMPLETED)
                _drain(queue, bar)
                for fut in done:
                    job = pending.pop(fut)
                    results.append(fut.result())
                    done_runs += 1
                    _postfix(f"{job[1]}/{job[2]}")
            _drain(queue, bar)
    finally:
        bar.close()
        queue.close()
    return results


# ------------------------------------------------------------------------------------------- aggregate
def time_methods(cfg: DemoConfig) -> dict[str, Any]:
    """Seconds per training step of every method, measured side by side in this process (1 thread): ``rounds``
    rounds, each timing ``steps`` steps of every method in turn (A B C ... A B C ...), on the same batch and the
    same initial model. Interleaving makes the ratios fair on a machine whose load changes over time; the
    per-epoch times of the parallel training runs are not (two runs share the cores, and other jobs come and go).
    """
    import torch

    from .data import digits
    from .models import SmallCNN
    from .train import prepare_model, recipe_optimizer, train_step

    train, _ = digits(seed=0, image_size=cfg.image_size)
    x, y = (t[: cfg.batch_size] for t in train.tensors)
    setups = {}
    for m in cfg.methods:
        torch.manual_seed(0)
        net = prepare_model(SmallCNN(num_classes=10, in_channels=1, width=cfg.width), m, example_inputs=x[:1])
        net.train()
        opt = recipe_optimizer(net, lr=cfg.lr)
        kw = {k: v for k, v in cfg.method_options.get(m, {}).items()
              if k in ("gradreg_weight", "cure_weight", "cure_h", "adv_eps", "adv_steps")}
        kw["generator"] = torch.Generator().manual_seed(0)
        setups[m] = (net, opt, kw)
        train_step(net, opt, x, y, m, **kw)  # warm-up
    per_round: dict[str, list[float]] = {m: [] for m in cfg.methods}
    with _threads(1):
        for _ in range(cfg.timing_rounds):
            for m, (net, opt, kw) in setups.items():
                t0 = time.perf_counter()
                for _ in range(cfg.timing_steps):
                    train_step(net, opt, x, y, m, **kw)
                per_round[m].append((time.perf_counter() - t0) / cfg.timing_steps)
    out: dict[str, Any] = {"batch_size": cfg.batch_size, "rounds": cfg.timing_rounds, "steps": cfg.timing_steps,
                           "seconds_per_step": {m: _mean_std(v) for m, v in per_round.items()}}
    if "standard" in per_round:
        out["ratio"] = {m: _mean_std([a / b for a, b in zip(v, per_round["standard"])])
                        for m, v in per_round.items()}
    return out


def _aggregate(cfg: DemoConfig, runs: list[dict[str, Any]], timing: dict[str, Any] | None = None
               ) -> dict[str, Any]:
    by_method: dict[str, list[dict[str, Any]]] = {m: [] for m in cfg.methods}
    diverged: dict[str, list[dict[str, Any]]] = {m: [] for m in cfg.methods}
    for r in runs:
        (diverged if r.get("diverged") else by_method)[r["method"]].append(r)
    std_time = {r["seed"]: r["seconds_per_epoch"] for r in by_method.get("standard", [])}
    summary: dict[str, Any] = {}
    for m, rs in by_method.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        s: dict[str, Any] = {"seeds": [r["seed"] for r in rs], "diverged_seeds": [r["seed"] for r in diverged[m]],
                             "diverged_errors": [r["error"] for r in diverged[m]]}
        if not rs:
            summary[m] = s
            continue
        for q in ("grad_norm", "hessian_norm", "curvature"):
            s[q] = _mean_std([r["geometry_test"][q]["mean"] for r in rs])
            s[f"train_{q}"] = _mean_std([r["geometry_train"][q]["mean"] for r in rs])
            s[f"discrepancy_{q}"] = _mean_std([r["discrepancy"][q] for r in rs])
            s[f"discrepancy_over_train_{q}"] = _mean_std([r["discrepancy_over_train"][q] for r in rs])
        s["accuracy"] = _mean_std([r["accuracy"] for r in rs])
        s["robust_accuracy"] = {e: _mean_std([r["robust_accuracy"][e] for r in rs])
                                for e in rs[0]["robust_accuracy"]}
        s["gradient_robustness"] = {e: _mean_std([r["gradient_robustness"][e]["mean"] for r in rs])
                                    for e in rs[0]["gradient_robustness"]}
        s["seconds_per_epoch"] = _mean_std([r["seconds_per_epoch"] for r in rs])
        if std_time:  # from the parallel training runs: indicative only (shared cores)
            s["fit_time_ratio"] = _mean_std([r["seconds_per_epoch"] / std_time[r["seed"]] for r in rs
                                             if r["seed"] in std_time])
        if timing and m in timing.get("ratio", {}):  # interleaved measurement: the reported ratio
            s["time_ratio"] = timing["ratio"][m]
            s["seconds_per_step"] = timing["seconds_per_step"][m]
        params = [r["lcnn_parameters"] for r in rs if r["lcnn_parameters"]]
        if params:
            s["lcnn_parameters"] = {k: [_mean_std([p[k][i] for p in params]) for i in range(len(params[0][k]))]
                                    for k in params[0]}
        summary[m] = s
    return summary


def _ok(summary: dict[str, Any], m: str) -> bool:
    """Whether method ``m`` has at least one run that trained (did not diverge)."""
    return m in summary and bool(summary[m].get("seeds"))


def _ratio(summary: dict[str, Any], a: str, b: str, q: str) -> float | None:
    if _ok(summary, a) and _ok(summary, b) and summary[b][q]["mean"] > 0:
        return summary[a][q]["mean"] / summary[b][q]["mean"]
    return None


def _per_seed_ratios(runs: list[dict[str, Any]], a: str, b: str, q: str) -> list[float]:
    by = {(r["method"], r["seed"]): r for r in runs if r["kind"] == "digits"}
    out = []
    for (m, s), r in by.items():
        if m == b and (a, s) in by and not r.get("diverged") and not by[(a, s)].get("diverged") \
                and r["geometry_test"][q]["mean"] > 0:
            out.append(by[(a, s)]["geometry_test"][q]["mean"] / r["geometry_test"][q]["mean"])
    return out


def _lower(ratio: float | None) -> str:
    """``standard / method`` ratio as words: ``2.00x lower`` or ``1.25x HIGHER``."""
    if ratio is None or not math.isfinite(ratio) or ratio <= 0:
        return "n/a"
    return f"{ratio:.2f}x lower" if ratio >= 1 else f"{1 / ratio:.2f}x HIGHER"


def _findings(cfg: DemoConfig, summary: dict[str, Any], runs: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    if cfg.quick:
        out.append("QUICK RUN (--quick): 1 epoch on a few hundred images, a handful of test samples -- the numbers "
                   "only show that everything runs; run `lcnnify demo` for the real ones.")
    for m, s in summary.items():
        if s.get("diverged_seeds"):
            n = len(s["diverged_seeds"]) + len(s["seeds"])
            out.append(f"{METHOD_LABELS[m]}: training DIVERGED (loss inf/nan) in {len(s['diverged_seeds'])} of {n} "
                       f"seed(s) {s['diverged_seeds']} with the settings used "
                       f"{cfg.method_options.get(m) or '(lcnnify.train defaults)'}; "
                       + ("its numbers are over the other seeds. " if s["seeds"] else "no numbers. ")
                       + f"First error: {s['diverged_errors'][0][:200]}")
    for m, opts in cfg.method_options.items():
        if opts and m in summary:
            out.append(f"{METHOD_LABELS[m]} was trained with {opts} instead of lcnnify.train's defaults (see the "
                       "notes in docs/DEMO_RESULTS.md).")
    if not _ok(summary, "standard"):
        return out
    acc0 = summary["standard"]["accuracy"]["mean"]
    for m in ("lcnn", "lcnn+gradreg"):
        r = _ratio(summary, "standard", m, "curvature")
        if r is None:
            continue
        per_seed = _per_seed_ratios(runs, "standard", m, "curvature")
        rh = _ratio(summary, "standard", m, "hessian_norm")
        dacc = 100 * (summary[m]["accuracy"]["mean"] - acc0)
        paper = PAPER["curvature_ratio"][m]
        verdict = ("clearly lowers" if r >= 2 and min(per_seed, default=r) > 1.5 else
                   "lowers" if r > 1.2 else "does NOT clearly lower")
        out.append(f"{METHOD_LABELS[m]} {verdict} the normalized curvature: standard / {METHOD_LABELS[m]} = "
                   f"{r:.2f}x (per seed: {', '.join(f'{x:.2f}' for x in per_seed)}; paper, ResNet-18 on "
                   f"CIFAR-100: {paper:.1f}x); Hessian norm {rh:.2f}x lower; accuracy {dacc:+.1f} points "
                   f"({100 * summary[m]['accuracy']['mean']:.1f}% vs {100 * acc0:.1f}%).")
    for m in ("gradreg", "cure", "softplus+wd", "adversarial"):
        r = _ratio(summary, "standard", m, "curvature")
        if r is not None:
            rg = _ratio(summary, "standard", m, "grad_norm")
            out.append(f"{METHOD_LABELS[m]}: curvature {_lower(r)} than standard, gradient norm {_lower(rg)}, "
                       f"accuracy {100 * (summary[m]['accuracy']['mean'] - acc0):+.1f} points.")
    for m in ("lcnn", "lcnn+gradreg"):
        bs = [(r["bound"]["loss_hessian"], r["hessian_norm_max_test"], r["bound"]["certified"]) for r in runs
              if r["method"] == m and not r.get("diverged") and "loss_hessian" in r.get("bound", {})]
        if bs:
            ok = all(b >= h for b, h, _ in bs)
            cert = "certified" if all(c for _, _, c in bs) else "NOT certified"
            out.append(f"Data-free bound (lcnnify.bound, {cert}) of the trained {METHOD_LABELS[m]} models on sup ||Hess_x loss||: "
                       + ", ".join(f"{b:.3g}" for b, _, _ in bs) + " vs the largest measured Hessian norm "
                       + ", ".join(f"{h:.3g}" for _, h, _ in bs)
                       + (" -- the bound holds." if ok else " -- VIOLATED (a bug: please report)."))
    if _ok(summary, "lcnn") and "lcnn_parameters" in summary["lcnn"]:
        p = summary["lcnn"]["lcnn_parameters"]
        betas = ", ".join(f"{b['mean']:.2f}" for b in p.get("beta", []))
        gammas = ", ".join(f"{g['mean']:.1f}" for g in p.get("gamma", []))
        out.append(f"Trained LCNN (mean over seeds): centered-softplus beta per layer = {betas} (init 5); "
                   f"BatchNorm gamma = {gammas} (init 10). Convs and the linear layer are spectrally normalized "
                   "(norm 1), so the curvature bound is driven by beta and the BN gains gamma.")
    return out


# --------------------------------------------------------------------------------------------- tables
def _tables(cfg: DemoConfig, summary: dict[str, Any], markdown: bool) -> dict[str, str]:
    ms = [m for m in cfg.methods if m in summary]

    def lab(m: str) -> str:
        s = summary[m]
        k = len(s.get("diverged_seeds", []))
        return METHOD_LABELS.get(m, m) + (f" ({k}/{k + len(s['seeds'])} diverged)" if k else "")

    def row(m: str, cells: Callable[[dict[str, Any]], list[str]], n: int) -> list[str]:
        return [lab(m), *(cells(summary[m]) if _ok(summary, m) else ["diverged"] * n)]

    ratio = lambda s: _pm(s["time_ratio"], 1, lambda x: f"{x:.2f}") if "time_ratio" in s else "n/a"  # noqa: E731
    t1 = format_table(
        ["Model", "E||grad f||", "E||Hess f||", "E C_f", "Accuracy (%)", "Time/epoch (x std)"],
        [row(m, lambda s: [_pm(s["grad_norm"]), _pm(s["hessian_norm"]), _pm(s["curvature"]),
                           _pm(s["accuracy"], 100, _pct), ratio(s)], 5) for m in ms], markdown=markdown)
    eps_keys = [str(float(e)) for e in (*cfg.eps, *cfg.extra_eps)]
    t2 = format_table(
        ["Model", "Acc. (%)", *[f"eps={float(e):g}" + (" (extra)" if float(e) in cfg.extra_eps else "")
                                for e in (*cfg.eps, *cfg.extra_eps)]],
        [row(m, lambda s: [_pm(s["robust_accuracy"]["0.0"], 100, _pct),
                           *[_pm(s["robust_accuracy"][k], 100, _pct) for k in eps_keys]], 1 + len(eps_keys))
         for m in ms], markdown=markdown)
    t3 = format_table(
        ["Model", "Δtt E||grad f||", "Δtt E||Hess f||", "Δtt E C_f", "test/train E||grad f||"],
        [row(m, lambda s: [_pm(s["discrepancy_grad_norm"]), _pm(s["discrepancy_hessian_norm"]),
                           _pm(s["discrepancy_curvature"]),
                           _num(s["grad_norm"]["mean"] / s["train_grad_norm"]["mean"])
                           if s["train_grad_norm"]["mean"] > 0 else "inf"], 4) for m in ms], markdown=markdown)
    tt = format_table(
        ["Model", "ms/step (interleaved)", "x standard", "s/epoch in the runs", "paper x standard (GTX 1080 Ti)"],
        [row(m, lambda s: [_pm(s["seconds_per_step"], 1000, lambda x: f"{x:.1f}") if "seconds_per_step" in s
                           else "n/a", ratio(s), _pm(s["seconds_per_epoch"], 1, lambda x: f"{x:.2f}")], 3)
         + [f"{PAPER['seconds_per_epoch'][m] / 100:.1f}" if m in PAPER["seconds_per_epoch"] else "n/a"]
         for m in ms], markdown=markdown)
    return {"table1": t1, "table2": t2, "table3": t3, "time": tt}


def _paper_tables(markdown: bool) -> dict[str, str]:
    lab = METHOD_LABELS
    t1 = format_table(["Model", "E||grad f||", "E||Hess f||", "E C_f", "Accuracy (%)", "Time/epoch (x std)"],
                      [[lab[m], *[f"{v:g}" for v in vals], f"{PAPER['seconds_per_epoch'][m] / 100:.1f}"]
                       for m, vals in PAPER["table1"].items()], markdown=markdown)
    t2 = format_table(["Model", "Acc. (%)", *[f"eps={e:g}" for e in PAPER_EPS]],
                      [[lab[m], *[f"{v:g}" for v in vals]] for m, vals in PAPER["table2"].items()],
                      markdown=markdown)
    t3 = format_table(["Model", "Δtt E||grad f||", "Δtt E||Hess f||", "Δtt E C_f"],
                      [[lab[m], *[f"{v:g}" for v in vals]] for m, vals in PAPER["table3"].items()],
                      markdown=markdown)
    return {"table1": t1, "table2": t2, "table3": t3}


def eps_note(cfg: DemoConfig, mean_l2: float) -> str:
    d = cfg.image_size ** 2
    sq = math.sqrt(d)
    f = math.sqrt(CIFAR_DIM / d)
    pp = 0.2 / sq
    return EPS_NOTE.format(s=cfg.image_size, d=d, sq=sq, f=f, pp=pp, pp255=pp * 255, xn=mean_l2,
                           g=CIFAR_MEAN_L2 / mean_l2, e1=0.05 / f, e4=0.2 / f)


# --------------------------------------------------------------------------------------------- figures
def _fig1(path: Path, moons: dict[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from .nn import CenteredSoftplus

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), gridspec_kw={"width_ratios": [1, 1, 0.8]})
    for ax, m, title in zip(axes, ("standard", "lcnn"), ("(a) standard NN", "(b) LCNN (lcnnify)")):
        r = moons[m]
        p = np.asarray(r["prob"])
        x0, x1, y0, y1 = r["extent"]
        ax.imshow(p, origin="lower", extent=(x0, x1, y0, y1), cmap="RdBu_r", vmin=0, vmax=1, alpha=0.75,
                  aspect="auto")
        gx = np.linspace(x0, x1, p.shape[1])
        gy = np.linspace(y0, y1, p.shape[0])
        ax.contour(gx, gy, p, levels=[0.5], colors="k", linewidths=1.5)
        xtr, ytr = np.asarray(r["x_train"]), np.asarray(r["y_train"])
        ax.scatter(xtr[:, 0], xtr[:, 1], c=ytr, cmap="RdBu_r", vmin=0, vmax=1, s=8, edgecolors="k",
                   linewidths=0.3)
        ax.set_title(f"{title}\ntest acc {100 * r['test_acc']:.1f}%, mean curvature {r['curvature']:.2f}",
                     fontsize=10)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
    ax = axes[2]
    xs = torch.linspace(-3, 3, 301)
    colors = {0.5: "tab:green", 2.0: "tab:orange", 10.0: "tab:blue"}
    for beta, col in colors.items():
        sp = torch.nn.functional.softplus(xs, beta=beta)
        with torch.no_grad():
            cs = CenteredSoftplus(beta=beta)(xs)
        ax.plot(xs, sp, "--", color=col, label=f"softplus β={beta:g}")
        ax.plot(xs, cs, "-", color=col, label=f"centered softplus β={beta:g}")
    ax.plot(xs, torch.relu(xs), ":", color="gray", label="ReLU")
    ax.set_ylim(-2, 3.5)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("(c) softplus vs centered softplus", fontsize=10)
    fig.suptitle("Fig. 1 (miniature): two moons, a ReLU MLP trained as is (softplus β=1e3) vs converted by lcnnify",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fig2(path: Path, cfg: DemoConfig, summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 5))
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
        c = summary[m]["curvature"]["mean"]
        ax.plot(norms, norms * c, ":", color=col, lw=1, alpha=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("noise norm ||e||_2 (images in [0, 1])")
    ax.set_ylabel("||∇f(x+e) − ∇f(x)|| / ||∇f(x)||  (lower is better)")
    ax.set_title("Fig. 2 (miniature): relative gradient robustness, digits\n"
                 "solid: measured (mean ± std over seeds); dotted: ||e||·E[C_f] (§4.1 quadratic approx.)",
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main
def check_output_dir(out: str | os.PathLike) -> Path:
    """Create ``out`` (and parents) and check a file can be written there. Raises OSError with a clear message."""
    path = Path(out).expanduser()
    for anc in (path, *path.parents):
        if anc.exists():
            if not anc.is_dir():
                raise NotADirectoryError(20, f"cannot write to output directory {str(path)!r}: {str(anc)!r} is a "
                                             "file, not a directory")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".lcnnify-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write to output directory {str(path)!r}: "
                      f"{exc.strerror or exc}") from exc
    return path


def run_demo(out: str | os.PathLike = "lcnnify-demo", *, quick: bool = False, config: DemoConfig | None = None,
             progress: bool = True, echo: Callable[[str], None] | None = None, **overrides: Any) -> dict[str, Any]:
    """Run the demo, write ``results.json``, ``results.md`` and the two figures to ``out``; return the results.

    ``overrides`` replace :class:`DemoConfig` fields (``seeds=2``, ``epochs=5``, ``workers=1``...).
    ``echo`` prints the tables (default: ``print``).
    """
    from . import __version__
    from .data import digits

    echo = echo or (lambda s: print(s, flush=True))
    cfg = config or (DemoConfig.quick_config() if quick else DemoConfig())
    if overrides:
        cfg = replace(cfg, **overrides)
    if cfg.seeds < 1 or cfg.epochs < 1 or cfg.workers < 1:
        raise ValueError("seeds, epochs and workers must all be >= 1")
    unknown = [m for m in cfg.methods if m not in METHOD_LABELS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHOD_LABELS)}")
    out_dir = check_output_dir(out)
    started = datetime.now(timezone.utc).astimezone()
    t0 = time.perf_counter()
    machine = machine_info()
    train, test = digits(seed=0, image_size=cfg.image_size)
    mean_l2 = float(test.tensors[0].flatten(1).norm(dim=1).mean())
    note = eps_note(cfg, mean_l2)

    n_train = len(train) if cfg.max_train is None else min(cfg.max_train, len(train))
    echo(f"lcnnify {__version__} demo{' (--quick)' if cfg.quick else ''} -- {started:%Y-%m-%d %H:%M %Z}")
    echo(f"machine: {machine['cpu']}, {machine['usable_cpus']} usable CPU(s), torch {machine['torch']}; "
         f"{cfg.workers} worker process(es), 1 thread each")
    echo(f"Fig. 1: two moons ({cfg.moons_n} points, noise {cfg.moons_noise}), MLP 3x{cfg.moons_width}, "
         f"{cfg.moons_epochs} epochs, standard vs LCNN")
    echo(f"Tables 1-3, Fig. 2: scikit-learn digits {cfg.image_size}x{cfg.image_size} ({n_train} train / "
         f"{len(test)} test images), SmallCNN (3 conv-BN-ReLU blocks, width {cfg.width}), "
         f"{len(cfg.methods)} methods x {cfg.seeds} seeds, {cfg.epochs} epochs, batch {cfg.batch_size}, "
         f"SGD lr {cfg.lr} (x0.1 at 75%/87.5%), wd 5e-4; Hessians on {cfg.n_geometry} test + {cfg.n_geometry} train "
         f"images, PGD ({cfg.pgd_steps} steps) on {cfg.n_pgd}")
    echo("")

    jobs: list[tuple[str, str, int]] = [("digits", m, s) for s in range(cfg.seeds) for m in cfg.methods]
    jobs.sort(key=lambda j: -_COST.get(j[1], 1))
    jobs = [("moons", "standard", 0), ("moons", "lcnn", 0)] + jobs
    if cfg.workers > 1:  # expensive first, so that the two workers finish together
        jobs = sorted(jobs, key=lambda j: -(_COST.get(j[1], 1) * (1 if j[0] == "digits" else 0.5)))
    runs = _run_jobs(cfg, jobs, progress)
    moons = {r["method"]: r for r in runs if r["kind"] == "moons"}
    digit_runs = sorted((r for r in runs if r["kind"] == "digits"),
                        key=lambda r: (cfg.methods.index(r["method"]), r["seed"]))

    if progress:
        print(f"timing one training step of each method, interleaved ({cfg.timing_rounds} rounds)...",
              file=sys.stderr, flush=True)
    timing = time_methods(cfg)
    summary = _aggregate(cfg, digit_runs, timing)
    findings = _findings(cfg, summary, digit_runs)
    fig1, fig2 = out_dir / "fig1_two_moons.png", out_dir / "fig2_gradient_robustness.png"
    _fig1(fig1, moons)
    _fig2(fig2, cfg, summary)
    runtime = time.perf_counter() - t0
    with contextlib.suppress(OSError, AttributeError):
        machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]

    text_tables = _tables(cfg, summary, markdown=False)
    md_tables = _tables(cfg, summary, markdown=True)
    moons_line = ("Two moons (Fig. 1): " + "; ".join(
        f"{METHOD_LABELS[m]} test acc {100 * r['test_acc']:.1f}%, mean curvature {r['curvature']:.2f}, "
        f"mean ||grad|| {r['grad_norm']:.3f}" for m, r in moons.items()))
    findings.insert(0 if not cfg.quick else 1, moons_line)

    results = {
        "lcnnify_version": __version__,
        "date": started.isoformat(timespec="seconds"),
        "runtime_seconds": runtime,
        "machine": machine,
        "config": asdict(cfg),
        "dataset": {"name": "scikit-learn digits", "image_size": cfg.image_size, "input_dim": cfg.image_size ** 2,
                    "train": n_train, "test": len(test), "mean_test_l2_norm": mean_l2},
        "eps_note": note,
        "methods": list(cfg.methods),
        "summary": summary,
        "timing": timing,
        "findings": findings,
        "tables": text_tables,
        "two_moons": {m: {k: v for k, v in r.items() if k not in ("prob", "x_train", "y_train")}
                      for m, r in moons.items()},
        "runs": digit_runs,
        "paper": PAPER,
        "figures": {"fig1": fig1.name, "fig2": fig2.name},
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=float))
    md = _markdown(cfg, results, md_tables)
    (out_dir / "results.md").write_text(md)

    echo("Table 1 (miniature) -- model geometry on digits test images (mean ± std over seeds)")
    echo(text_tables["table1"])
    echo("")
    echo("Table 2 (miniature) -- l2-PGD robust accuracy (%)")
    echo(text_tables["table2"])
    echo("note: " + note)
    echo("")
    echo("Table 3 (miniature) -- train-test discrepancy |g(test) - g(train)| / g(test)")
    echo(text_tables["table3"])
    echo("")
    echo("Training cost (x standard: one training step of each method timed side by side, interleaved, 1 thread; "
         "s/epoch: the parallel runs, shared cores -- indicative only)")
    echo(text_tables["time"])
    echo("")
    echo("Findings:")
    for f in findings:
        echo(f"- {f}")
    echo("")
    echo(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}, {fig1}, {fig2}")
    echo(f"total time {runtime:.0f} s")
    return results


def _markdown(cfg: DemoConfig, results: dict[str, Any], t: dict[str, str]) -> str:
    paper = _paper_tables(markdown=True)
    m = results["machine"]
    load = m.get("load_average_at_start")
    lines = [
        f"# lcnnify demo results{' (--quick: not meaningful)' if cfg.quick else ''}",
        "",
        f"Generated by `lcnnify demo{' --quick' if cfg.quick else ''}` (lcnnify {results['lcnnify_version']}) on "
        f"{results['date']}; machine: {m['cpu']}, {m['usable_cpus']} usable CPU(s), torch {m['torch']}"
        + (f", load average at start {load}" if load else "") + f"; total run time {results['runtime_seconds']:.0f} s.",
        "",
        f"Data: scikit-learn's handwritten digits ({cfg.image_size}x{cfg.image_size}, "
        f"{results['dataset']['train']} train / {results['dataset']['test']} test images). Model: a small ReLU + "
        f"BatchNorm CNN (3 conv blocks, width {cfg.width}), trained by `lcnnify.train.fit` for {cfg.epochs} epochs "
        f"(batch {cfg.batch_size}, SGD lr {cfg.lr}, momentum 0.9, wd 5e-4, lr x0.1 at 75% and 87.5%) with each "
        f"method; LCNN methods convert it with `lcnnify.lcnnify`. {cfg.seeds} seed(s); ± is the standard "
        f"deviation over seeds. Geometry (Hessian norm by {cfg.lanczos_iters}-step Lanczos) on {cfg.n_geometry} "
        f"test and {cfg.n_geometry} train images; PGD ({cfg.pgd_steps} steps) on {cfg.n_pgd} test images; "
        f"accuracy on all test images.",
        "",
        "## Table 1 (miniature): model geometry",
        "",
        t["table1"],
        "",
        "## Table 2 (miniature): l2-PGD robust accuracy (%)",
        "",
        t["table2"],
        "",
        f"*eps:* {results['eps_note']}",
        "",
        "## Table 3 (miniature): train-test discrepancy",
        "",
        "Δtt g = |g(test) − g(train)| / g(test) (the paper's formula); last column: the ratio of the test and train "
        "means of the gradient norm.",
        "",
        t["table3"],
        "",
        "## Training cost",
        "",
        f"x standard: one training step (batch {cfg.batch_size}) of each method timed side by side in one process, "
        f"1 thread, {cfg.timing_rounds} interleaved rounds of {cfg.timing_steps} steps (mean ± std over rounds); "
        "this is the Time/epoch column of Table 1. s/epoch: measured inside the parallel training runs, where two "
        "runs share the cores -- indicative only.",
        "",
        t["time"],
        "",
        "## The paper's numbers (ResNet-18; Tables 1-2 on CIFAR-100, 200 epochs, 2 runs)",
        "",
        "Table 1:",
        "",
        paper["table1"],
        "",
        "Table 2 (eps on 3x32x32 CIFAR images):",
        "",
        paper["table2"],
        "",
        "Table 3:",
        "",
        paper["table3"],
        "",
        "## Figures",
        "",
        f"![Fig. 1: two moons]({results['figures']['fig1']})",
        "",
        f"![Fig. 2: gradient robustness]({results['figures']['fig2']})",
        "",
        "## Findings",
        "",
        *[f"- {f}" for f in results["findings"]],
        "",
    ]
    return "\n".join(lines)
