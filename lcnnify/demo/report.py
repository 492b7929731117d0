"""The demo's report: per-method aggregates over seeds, the findings (only those that hold in every seed), the
tables (plain text and markdown) and results.md."""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from ..train import METHOD_LABELS
from ..train.tables import PAPER_EPS, format_table
from .config import PAPER, DemoConfig

__all__ = ["aggregate", "findings", "tables", "paper_tables", "markdown", "mean_std", "pretrained_summary",
           "pretrained_table", "pretrained_finding"]


def mean_std(values: Sequence[float]) -> dict[str, float]:
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



def aggregate(cfg: DemoConfig, runs: list[dict[str, Any]], timing: dict[str, Any] | None = None
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
            s[q] = mean_std([r["geometry_test"][q]["mean"] for r in rs])
            s[f"train_{q}"] = mean_std([r["geometry_train"][q]["mean"] for r in rs])
            s[f"discrepancy_{q}"] = mean_std([r["discrepancy"][q] for r in rs])
            s[f"discrepancy_over_train_{q}"] = mean_std([r["discrepancy_over_train"][q] for r in rs])
        s["accuracy"] = mean_std([r["accuracy"] for r in rs])
        s["robust_accuracy"] = {e: mean_std([r["robust_accuracy"][e] for r in rs])
                                for e in rs[0]["robust_accuracy"]}
        s["gradient_robustness"] = {e: mean_std([r["gradient_robustness"][e]["mean"] for r in rs])
                                    for e in rs[0]["gradient_robustness"]}
        s["seconds_per_epoch"] = mean_std([r["seconds_per_epoch"] for r in rs])
        if std_time:  # from the parallel training runs: indicative only (shared cores)
            s["fit_time_ratio"] = mean_std([r["seconds_per_epoch"] / std_time[r["seed"]] for r in rs
                                             if r["seed"] in std_time])
        if timing and m in timing.get("ratio", {}):  # interleaved measurement: the reported ratio
            s["time_ratio"] = timing["ratio"][m]
            s["seconds_per_step"] = timing["seconds_per_step"][m]
        params = [r["lcnn_parameters"] for r in rs if r["lcnn_parameters"]]
        if params:
            s["lcnn_parameters"] = {k: [mean_std([p[k][i] for p in params]) for i in range(len(params[0][k]))]
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


def _paired(runs: list[dict[str, Any]], a: str, b: str, value: Callable[[dict[str, Any]], float],
            combine: Callable[[float, float], float]) -> list[float]:
    """``combine(value(run of a), value(run of b))`` for every seed in which both ``a`` and ``b`` trained (the
    methods of a seed start from the same weights: a paired comparison)."""
    by = {(r["method"], r["seed"]): r for r in runs if r["kind"] == "digits" and not r.get("diverged")}
    return [combine(value(by[(a, s)]), value(r)) for (m, s), r in sorted(by.items(), key=lambda kv: kv[0][1])
            if m == b and (a, s) in by]


def _per_seed_ratios(runs: list[dict[str, Any]], a: str, b: str, q: str) -> list[float]:
    """Per seed: mean ``q`` of method ``a`` / mean ``q`` of method ``b`` (test set)."""
    return _paired(runs, a, b, lambda r: r["geometry_test"][q]["mean"], lambda x, y: x / y if y > 0 else math.inf)


def _lower(ratio: float | None) -> str:
    """``standard / method`` ratio as words: ``2.00x lower`` or ``1.25x HIGHER``."""
    if ratio is None or not math.isfinite(ratio) or ratio <= 0:
        return "n/a"
    return f"{ratio:.2f}x lower" if ratio >= 1 else f"{1 / ratio:.2f}x HIGHER"


#: A per-seed ratio must differ from 1 by this factor to count as an effect in that seed (smaller differences
#: can flip between CPU models; docs/DEMO_RESULTS.md compares the findings on two).
EFFECT_RATIO = 1.1
#: A per-seed accuracy difference must be at least this many points to count (0.5 points = 2 of 450 images).
EFFECT_POINTS = 0.5


def _consistency(ratios: Sequence[float]) -> str:
    """How per-seed ``standard / method`` ratios agree: lower / HIGHER by at least :data:`EFFECT_RATIO` in every
    seed, or no consistent difference."""
    k = len(ratios)
    if k < 2:
        return "1 seed: no claim about consistency"
    if all(r >= EFFECT_RATIO for r in ratios):
        return f"lower in all {k} seeds"
    if all(r <= 1 / EFFECT_RATIO for r in ratios):
        return f"HIGHER in all {k} seeds"
    lo, hi = sum(r >= EFFECT_RATIO for r in ratios), sum(r <= 1 / EFFECT_RATIO for r in ratios)
    return (f"no consistent difference: {lo} of {k} seeds lower, {hi} higher, {k - lo - hi} within "
            f"{round(100 * (EFFECT_RATIO - 1))}%")


def _seeds(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    return ", ".join(fmt.format(v) for v in values)


def _accuracy_words(diffs: Sequence[float]) -> str:
    """Per-seed accuracy differences (points): their mean and whether their sign agrees across seeds."""
    if not diffs:
        return "accuracy n/a"
    mean = sum(diffs) / len(diffs)
    same_sign = len(diffs) >= 2 and (all(d >= EFFECT_POINTS for d in diffs) or all(d <= -EFFECT_POINTS for d in diffs))
    words = (f"{'higher' if mean > 0 else 'lower'} in all {len(diffs)} seeds" if same_sign
             else "no consistent difference" if len(diffs) >= 2 else "1 seed")
    return f"accuracy {mean:+.1f} points ({words}; per seed {_seeds(diffs, '{:+.1f}')})"


def findings(cfg: DemoConfig, summary: dict[str, Any], runs: list[dict[str, Any]]) -> list[str]:
    """The demo's findings. Every comparison with the standard model is paired by seed and stated as an effect
    only where it holds in every seed by at least :data:`EFFECT_RATIO` (ratios) or :data:`EFFECT_POINTS`
    (accuracy); otherwise it says "no consistent difference"."""
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
    acc = lambda r: 100 * r["accuracy"]  # noqa: E731
    for m in ("lcnn", "lcnn+gradreg"):
        r = _ratio(summary, "standard", m, "curvature")
        if r is None:
            continue
        per_seed = _per_seed_ratios(runs, "standard", m, "curvature")
        rh = _ratio(summary, "standard", m, "hessian_norm")
        diffs = _paired(runs, "standard", m, acc, lambda a, b: b - a)
        every = len(per_seed) >= 2
        verdict = ("clearly lowers" if every and min(per_seed) >= 1.5 and r >= 2 else
                   "lowers" if every and min(per_seed) >= EFFECT_RATIO else
                   "lowers (1 seed only)" if not every and r > 1 else "does NOT consistently lower")
        out.append(f"{METHOD_LABELS[m]} {verdict} the normalized curvature: standard / {METHOD_LABELS[m]} = "
                   f"{r:.2f}x ({_consistency(per_seed)}: {_seeds(per_seed)}; paper, ResNet-18 on CIFAR-100: "
                   f"{PAPER['curvature_ratio'][m]:.1f}x); Hessian norm {_lower(rh)}; {_accuracy_words(diffs)}.")
    for m in ("gradreg", "cure", "softplus+wd", "adversarial"):
        if _ratio(summary, "standard", m, "curvature") is None:
            continue
        rc = _per_seed_ratios(runs, "standard", m, "curvature")
        rg = _per_seed_ratios(runs, "standard", m, "grad_norm")
        diffs = _paired(runs, "standard", m, acc, lambda a, b: b - a)
        out.append(f"{METHOD_LABELS[m]} vs standard: curvature {_consistency(rc)} (standard / {METHOD_LABELS[m]} "
                   f"per seed: {_seeds(rc)}); gradient norm {_consistency(rg)} ({_seeds(rg)}); "
                   f"{_accuracy_words(diffs)}.")
    for m in ("lcnn", "lcnn+gradreg"):
        bs = [(r["bound"]["loss_hessian"], r["hessian_norm_max_test"], r["bound"]["certified"]) for r in runs
              if r["method"] == m and not r.get("diverged") and "loss_hessian" in r.get("bound", {})]
        if bs:
            ok = all(b >= h for b, h, _ in bs)
            cert = "certified" if all(c for _, _, c in bs) else "NOT certified"
            out.append(f"Data-free bound (lcnnify.bound, {cert}) of the trained {METHOD_LABELS[m]} models on "
                       "sup ||Hess_x loss||: "
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
    k = max((len(s.get("seeds", [])) for s in summary.values()), default=0)
    out.append(f"How to read these numbers: {k} seed(s) per method; every comparison above is paired by seed (the "
               "methods of a seed start from the same weights) and called an effect only where it holds in every "
               f"seed by at least {EFFECT_RATIO:g}x ({EFFECT_POINTS:g} points of accuracy). A run is reproducible "
               "on one machine and torch build, but floating-point results differ between CPU models (different "
               "vector kernels), so individual numbers move from machine to machine on about the scale of the "
               "spread over seeds (the ± columns); smaller differences are not findings.")
    return out


# ------------------------------------------------------------------------------- the pretrained-model part
def pretrained_summary(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Per seed, the pretrained part of the standard run (preserved conversion, fine-tuned LCNN) next to the LCNN
    trained from scratch in the same seed (same initial weights, same test images and attack generators), and
    their means ± std over those seeds. ``None`` when no standard run has the part."""
    by = {(r["method"], r["seed"]): r for r in runs if r.get("kind") == "digits" and not r.get("diverged")}
    per_seed = []
    for (m, seed), r in sorted(by.items(), key=lambda kv: kv[0][1]):
        if m != "standard" or "pretrained" not in r:
            continue
        p = r["pretrained"]
        row = {"seed": seed, **{k: p[k] for k in ("accuracy_before", "accuracy_preserved", "agreement",
                                                   "accuracy_finetuned", "finetune_wall_seconds")},
               "curvature_finetuned": p["geometry_finetuned"]["curvature"]["mean"],
               "robust_finetuned": p["robust_accuracy_finetuned"],
               "curvature_standard": r["geometry_test"]["curvature"]["mean"],
               "robust_standard": r["robust_accuracy"], "wall_standard": r["train_wall_seconds"]}
        s = by.get(("lcnn", seed))
        if s is not None:
            row.update(accuracy_scratch=s["accuracy"], curvature_scratch=s["geometry_test"]["curvature"]["mean"],
                       robust_scratch=s["robust_accuracy"], wall_scratch=s["train_wall_seconds"])
        per_seed.append(row)
    if not per_seed:
        return None
    out: dict[str, Any] = {"per_seed": per_seed}
    for k in ("accuracy_before", "accuracy_preserved", "agreement", "accuracy_finetuned", "finetune_wall_seconds",
              "curvature_finetuned", "curvature_standard", "wall_standard", "accuracy_scratch",
              "curvature_scratch", "wall_scratch"):
        vals = [r[k] for r in per_seed if k in r]
        if vals:
            out[k] = mean_std(vals)
    for k in ("robust_finetuned", "robust_standard", "robust_scratch"):
        rows = [r[k] for r in per_seed if k in r]
        if rows:
            out[k] = {e: mean_std([x[e] for x in rows]) for e in rows[0]}
    return out


def pretrained_table(cfg: DemoConfig, ps: dict[str, Any], markdown: bool) -> str:
    """Standard model, its preserved conversion, the fine-tuned LCNN and the LCNN from scratch (mean ± std)."""
    eps_keys = [str(float(e)) for e in (*cfg.eps, *cfg.extra_eps)]
    dash = "–"

    def cells(acc: str, agree: str, curv: str, robust: str, wall: str) -> list[str]:
        acc_c = _pm(ps[acc], 100, _pct) if acc in ps else "n/a"
        agree_c = _pm(ps[agree], 100, _pct) if agree in ps else agree
        curv_c = _pm(ps[curv]) if curv in ps else (dash if curv == dash else "n/a")
        rob = ([_pm(ps[robust][k], 100, _pct) for k in eps_keys] if robust in ps
               else [dash if robust == dash else "n/a"] * len(eps_keys))
        wall_c = _pm(ps[wall], 1, lambda x: f"{x:.1f}") if wall in ps else (dash if wall == dash else "n/a")
        return [acc_c, agree_c, curv_c, *rob, wall_c]

    rows = [
        ["Standard (trained)", *cells("accuracy_before", "100 (reference)", "curvature_standard", "robust_standard",
                                      "wall_standard")],
        ["preserve_function conversion (no training)", *cells("accuracy_preserved", "agreement", dash, dash, dash)],
        [f"LCNN fine-tuned ({cfg.finetune_epochs} epochs, recipe finetune)",
         *cells("accuracy_finetuned", dash, "curvature_finetuned", "robust_finetuned", "finetune_wall_seconds")],
        [f"LCNN from scratch ({cfg.epochs} epochs)",
         *cells("accuracy_scratch", dash, "curvature_scratch", "robust_scratch", "wall_scratch")],
    ]
    return format_table(["Model", "Acc. (%)", "argmax agreement with standard (%)", "E C_f",
                         *[f"PGD eps={float(e):g}" for e in (*cfg.eps, *cfg.extra_eps)], "training wall (s)"],
                        rows, markdown=markdown)


def pretrained_finding(cfg: DemoConfig, ps: dict[str, Any]) -> str:
    """One line: the preserved conversion's accuracy and agreement, and the fine-tuned LCNN vs the LCNN from
    scratch paired by seed (an effect only where it holds in every seed, as in :func:`findings`)."""
    per = ps["per_seed"]
    k = len(per)
    acc_drop = [100 * (r["accuracy_preserved"] - r["accuracy_before"]) for r in per]
    kept = all(abs(d) < EFFECT_POINTS for d in acc_drop)
    line = (f"From a trained model ({k} seed(s)): lcnnify(..., preserve_function=True) "
            + ("keeps" if kept else "CHANGES") + " the standard model's accuracy "
            f"({100 * ps['accuracy_before']['mean']:.1f}% -> {100 * ps['accuracy_preserved']['mean']:.1f}%; "
            f"change per seed {_seeds(acc_drop, '{:+.1f}')} points) and agrees with its argmax on at least "
            f"{100 * min(r['agreement'] for r in per):.1f}% of the test images in every seed")
    pair = [r for r in per if "accuracy_scratch" in r]
    if not pair:
        return line + "; no LCNN from scratch to compare the fine-tuned model with."
    curv = [r["curvature_scratch"] / r["curvature_finetuned"] if r["curvature_finetuned"] > 0 else math.inf
            for r in pair]
    wall = [r["wall_scratch"] / r["finetune_wall_seconds"] if r["finetune_wall_seconds"] > 0 else math.inf
            for r in pair]
    acc = _accuracy_words([100 * (r["accuracy_finetuned"] - r["accuracy_scratch"]) for r in pair])
    e = str(float(max((*cfg.eps, *cfg.extra_eps))))
    pgd = _accuracy_words([100 * (r["robust_finetuned"][e] - r["robust_scratch"][e]) for r in pair])
    return (line + f". Fine-tuned into an LCNN ({cfg.finetune_epochs} epochs) vs the LCNN trained from scratch "
            f"({cfg.epochs} epochs), paired by seed: normalized curvature {_consistency(curv)} (scratch / "
            f"fine-tuned per seed: {_seeds(curv)}); {acc}; PGD at eps={float(e):g} "
            f"{pgd.removeprefix('accuracy ')}; training wall time (not counting the standard model's training; "
            f"parallel runs, indicative only) {_consistency(wall)} (scratch / fine-tuned per seed: "
            f"{_seeds(wall)}).")


def tables(cfg: DemoConfig, summary: dict[str, Any], markdown: bool,
           pretrained: dict[str, Any] | None = None) -> dict[str, str]:
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
    out = {"table1": t1, "table2": t2, "table3": t3, "time": tt}
    if pretrained is not None:
        out["pretrained"] = pretrained_table(cfg, pretrained, markdown)
    return out


def paper_tables(markdown: bool) -> dict[str, str]:
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



def markdown(cfg: DemoConfig, results: dict[str, Any], t: dict[str, str]) -> str:
    paper = paper_tables(markdown=True)
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
        *([f"## From a trained model to an LCNN (preserved conversion, {cfg.finetune_epochs}-epoch fine-tuning)",
           "",
           "Per seed, the trained standard model's weights in the base ReLU model, converted with "
           f"`lcnnify(model, example_inputs=<{cfg.n_example} training images>, preserve_function=True)` (no "
           "training; argmax agreement with the trained standard model on all test images), then fine-tuned into an "
           f"LCNN with `fit(model, ..., method=\"lcnn\", recipe=\"finetune\", epochs={cfg.finetune_epochs})`; "
           "compared with the LCNN trained from scratch in the same seed (same test images, Lanczos and PGD "
           "settings as above). Training wall: measured inside the parallel runs (shared cores), indicative only; "
           "the fine-tuning's does not include training the standard model.",
           "",
           t["pretrained"],
           ""] if "pretrained" in t else []),
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

