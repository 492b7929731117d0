"""Runs the demo: its jobs in single-threaded worker processes (two cores run two trainings at once), then
the timing, the aggregation, the figures and the report; :func:`run_demo` is the entry point of
``lcnnify demo``."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from ..train import METHOD_LABELS
from .config import PAPER, DemoConfig, eps_note
from .figures import fig1_two_moons, fig2_gradient_robustness
from .jobs import digits_job, job_units, moons_job, threads, time_methods
from .report import aggregate, findings as make_findings, markdown, pretrained_finding, pretrained_summary, tables

__all__ = ["run_demo", "check_output_dir", "machine_info"]


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
    fn = moons_job if kind == "moons" else digits_job
    return fn(cfg, method, seed, report)


def _job_units(cfg: DemoConfig, job: tuple[str, str, int]) -> int:
    return job_units(cfg, job[0], job[1])


# Rough relative cost per epoch of each method on a CPU (a scheduling hint): the most expensive runs start first.
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
    """Run ``jobs`` (in ``cfg.workers`` processes). Progress: a live bar when stderr is a terminal, else one
    plain line per finished run (no carriage returns or escape codes in log files)."""
    from tqdm.auto import tqdm

    total = sum(_job_units(cfg, j) for j in jobs)
    live = progress and bool(getattr(sys.stderr, "isatty", lambda: False)())
    bar = tqdm(total=total, desc="demo", unit="step", disable=not live, dynamic_ncols=True, file=sys.stderr)
    results: list[dict[str, Any]] = []
    done_runs = 0
    t0 = time.perf_counter()

    def _postfix(last: str) -> None:
        if live:
            bar.set_postfix_str(f"runs {done_runs}/{len(jobs)}, last: {last}", refresh=False)
        elif progress:
            print(f"demo: run {done_runs}/{len(jobs)} done ({last}), {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)

    if cfg.workers <= 1:
        global _QUEUE

        class _Direct:
            def put(self, item: Any) -> None:
                bar.update(1)

        _QUEUE = _Direct()
        try:
            with threads(1):
                for job in jobs:
                    bar.set_description(f"demo [{job[0]}: {job[1]}, seed {job[2]}]")
                    results.append(_run_job(cfg, job))
                    done_runs += 1
                    _postfix(f"{job[0]} {job[1]} seed {job[2]}")
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
                    _postfix(f"{job[0]} {job[1]} seed {job[2]}")
            _drain(queue, bar)
    finally:
        bar.close()
        queue.close()
    return results



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


def run_demo(out: str | os.PathLike = "runs/demo", *, quick: bool = False, config: DemoConfig | None = None,
             progress: bool = True, echo: Callable[[str], None] | None = None, **overrides: Any) -> dict[str, Any]:
    """Run the demo, write ``results.json``, ``results.md`` and the two figures to ``out``; return the results.

    ``overrides`` replace :class:`DemoConfig` fields (``seeds=2``, ``epochs=5``, ``workers=1``...).
    ``echo`` prints the tables (default: ``print``).
    """
    from .. import __version__
    from ..data import digits

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
    ft_cost = cfg.finetune_epochs / cfg.epochs * _COST["lcnn"] if cfg.pretrained else 0.0  # the standard runs'
    cost = lambda j: _COST.get(j[1], 1) + (ft_cost if j[1] == "standard" else 0.0)  # noqa: E731
    jobs.sort(key=lambda j: -cost(j))
    jobs = [("moons", "standard", 0), ("moons", "lcnn", 0)] + jobs
    if cfg.workers > 1:  # expensive first, so that the two workers finish together
        jobs = sorted(jobs, key=lambda j: -(cost(j) if j[0] == "digits" else 0.5 * _COST.get(j[1], 1)))
    runs = _run_jobs(cfg, jobs, progress)
    moons = {r["method"]: r for r in runs if r["kind"] == "moons"}
    digit_runs = sorted((r for r in runs if r["kind"] == "digits"),
                        key=lambda r: (cfg.methods.index(r["method"]), r["seed"]))

    if progress:
        print(f"timing one training step of each method, interleaved ({cfg.timing_rounds} rounds)...",
              file=sys.stderr, flush=True)
    timing = time_methods(cfg)
    summary = aggregate(cfg, digit_runs, timing)
    findings = make_findings(cfg, summary, digit_runs)
    pretrained = pretrained_summary(digit_runs) if cfg.pretrained else None
    if pretrained is not None:
        findings.insert(len(findings) - 1, pretrained_finding(cfg, pretrained))  # before "How to read"
    fig1, fig2 = out_dir / "fig1_two_moons.png", out_dir / "fig2_gradient_robustness.png"
    fig1_two_moons(fig1, moons)
    fig2_gradient_robustness(fig2, cfg, summary)
    runtime = time.perf_counter() - t0
    with contextlib.suppress(OSError, AttributeError):
        machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]

    text_tables = tables(cfg, summary, markdown=False, pretrained=pretrained)
    md_tables = tables(cfg, summary, markdown=True, pretrained=pretrained)
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
        "pretrained": pretrained,
        "findings": findings,
        "tables": text_tables,
        "two_moons": {m: {k: v for k, v in r.items() if k not in ("prob", "x_train", "y_train")}
                      for m, r in moons.items()},
        "runs": digit_runs,
        "paper": PAPER,
        "figures": {"fig1": fig1.name, "fig2": fig2.name},
    }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=float))
    md = markdown(cfg, results, md_tables)
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
    if "pretrained" in text_tables:
        echo(f"From a trained model to an LCNN -- preserved conversion and {cfg.finetune_epochs}-epoch fine-tuning "
             "vs the LCNN trained from scratch (mean ± std over seeds)")
        echo(text_tables["pretrained"])
        echo("")
    echo("Findings:")
    for f in findings:
        echo(f"- {f}")
    echo("")
    echo(f"wrote {out_dir / 'results.json'}, {out_dir / 'results.md'}, {fig1}, {fig2}")
    echo(f"total time {runtime:.0f} s")
    return results

