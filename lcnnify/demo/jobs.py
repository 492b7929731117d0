"""The demo's jobs: one training run and its measurements each (digits: Tables 1-3 and Fig. 2; two moons:
Fig. 1), and the interleaved timing of one training step per method. Each job is a plain function of
(config, method, seed) that returns JSON-ready numbers, so it runs the same in a worker process or in-process.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable

from .config import DemoConfig
from .report import mean_std

__all__ = ["digits_job", "moons_job", "pretrained_part", "time_methods", "threads", "job_units"]


def job_units(cfg: DemoConfig, kind: str, method: str) -> int:
    """Progress units a job reports: one per epoch and two evaluations (digits; + 1 for the pretrained part of
    the standard run), one for a two-moons run."""
    if kind == "moons":
        return 1
    return cfg.epochs + 2 + (1 if cfg.pretrained and method == "standard" else 0)


@contextlib.contextmanager
def threads(n: int):
    """Run the body with ``n`` intra-op torch threads (restored afterwards)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)



def _lcnn_parameters(model: Any) -> dict[str, list[float]]:
    from ..nn import CenteredSoftplus, LipschitzBatchNorm

    betas = [float(m.beta.detach().mean()) for m in model.modules() if isinstance(m, CenteredSoftplus)]
    gammas = [float(m.gamma.detach()) for m in model.modules() if isinstance(m, LipschitzBatchNorm)]
    lips = [float(m.lipschitz_constant().detach()) for m in model.modules() if isinstance(m, LipschitzBatchNorm)]
    return {"beta": betas, "gamma": gammas, "bn_lipschitz": lips} if betas or gammas else {}


def digits_job(cfg: DemoConfig, method: str, seed: int, report: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from ..data import digits
    from ..metrics import evaluate_geometry, gradient_robustness, robust_accuracy, train_test_discrepancy
    from ..models import SmallCNN
    from ..train import fit

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
        for _ in range(job_units(cfg, "digits", method) - epochs_done[0]):
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
            from ..bounds import bound

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
    extra: dict[str, Any] = {}
    if cfg.pretrained and method == "standard":
        extra["pretrained"] = pretrained_part(cfg, model, train, test, seed)
        report("eval")
    return {
        **extra,
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


def pretrained_part(cfg: DemoConfig, trained: Any, train: Any, test: Any, seed: int) -> dict[str, Any]:
    """From the trained standard model to an LCNN, measured like the demo's own runs.

    The standard run trains a softplus(beta = 1e3) copy of the base ReLU ``SmallCNN``; its weights are loaded
    into the base ReLU model (the model a user has), which is converted with
    ``lcnnify(model, example_inputs=<cfg.n_example training images>, preserve_function=True)`` (accuracy and
    argmax agreement with the trained model) and fine-tuned into an LCNN with
    ``fit(method="lcnn", recipe="finetune", epochs=cfg.finetune_epochs)``. The fine-tuned model's geometry and
    PGD accuracy use the same test images, Lanczos / PGD settings and random generators as the seed's other
    runs, so it pairs with the LCNN trained from scratch in the same seed.
    """
    import warnings

    import torch

    from .. import lcnnify
    from ..metrics import evaluate_geometry, robust_accuracy
    from ..models import SmallCNN
    from ..train import fit

    xt, yt = test.tensors
    ex = train.tensors[0][: cfg.n_example]
    relu = SmallCNN(num_classes=10, in_channels=1, width=cfg.width)
    relu.load_state_dict(trained.state_dict())  # same parameters: only the activations differ
    relu.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        preserved = lcnnify(relu, example_inputs=ex, preserve_function=True).eval()
        convert_seconds = time.perf_counter() - t0
    with torch.no_grad():
        ref, pre = trained.eval()(xt).argmax(1), preserved(xt).argmax(1)
    out: dict[str, Any] = {
        "n_example": len(ex), "finetune_epochs": cfg.finetune_epochs,
        "accuracy_before": float((ref == yt).double().mean()),
        "accuracy_preserved": float((pre == yt).double().mean()),
        "agreement": float((pre == ref).double().mean()),
        "logit_scale": float(preserved.lcnn_preservation.output_scale),
        "convert_seconds": convert_seconds,
    }
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = fit(relu, train, test, method="lcnn", recipe="finetune", epochs=cfg.finetune_epochs,
                  batch_size=cfg.batch_size, progress=False, seed=seed, eval_every=cfg.finetune_epochs,
                  example_inputs=ex)
    out["finetune_wall_seconds"] = time.perf_counter() - t0  # conversion included
    ft = res.model.eval()
    ng = min(cfg.n_geometry, len(yt))
    gen = lambda k: torch.Generator().manual_seed(1000 * seed + k)  # noqa: E731  (as in digits_job)
    geo = evaluate_geometry(ft, (xt[:ng], yt[:ng]), iters=cfg.lanczos_iters, progress=False, generator=gen(1))
    npgd = min(cfg.n_pgd, len(yt))
    robust = robust_accuracy(ft, (xt[:npgd], yt[:npgd]), (0.0, *cfg.eps, *cfg.extra_eps), steps=cfg.pgd_steps,
                             progress=False, generator=gen(3))
    with torch.no_grad():
        out["accuracy_finetuned"] = float((ft(xt).argmax(1) == yt).double().mean())
    out["geometry_finetuned"] = {k: geo[k] for k in ("grad_norm", "hessian_norm", "curvature")}
    out["robust_accuracy_finetuned"] = {str(k): v for k, v in robust.items()}
    return out


def moons_job(cfg: DemoConfig, method: str, seed: int, report: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from ..data import two_moons
    from ..metrics import curvature
    from ..models import MLP
    from ..train import fit

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


def time_methods(cfg: DemoConfig) -> dict[str, Any]:
    """Seconds per training step of every method, measured side by side in this process (1 thread): ``rounds``
    rounds, each timing ``steps`` steps of every method in turn (A B C ... A B C ...), on the same batch and the
    same initial model. Interleaving makes the ratios fair on a machine whose load changes over time; the
    per-epoch times of the parallel training runs are not (two runs share the cores, and other jobs come and go).
    """
    import torch

    from ..data import digits
    from ..models import SmallCNN
    from ..train import prepare_model, recipe_optimizer, train_step

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
    with threads(1):
        for _ in range(cfg.timing_rounds):
            for m, (net, opt, kw) in setups.items():
                t0 = time.perf_counter()
                for _ in range(cfg.timing_steps):
                    train_step(net, opt, x, y, m, **kw)
                per_round[m].append((time.perf_counter() - t0) / cfg.timing_steps)
    out: dict[str, Any] = {"batch_size": cfg.batch_size, "rounds": cfg.timing_rounds, "steps": cfg.timing_steps,
                           "seconds_per_step": {m: mean_std(v) for m, v in per_round.items()}}
    if "standard" in per_round:
        out["ratio"] = {m: mean_std([a / b for a, b in zip(v, per_round["standard"])])
                        for m, v in per_round.items()}
    return out

