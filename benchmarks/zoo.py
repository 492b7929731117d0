"""Zoo coverage: convert, train 3 SGD steps and check the LCNN contract on one model of every CNN family.

    python benchmarks/zoo.py                      # the family sweep (lcnnify.testing.zoo.FAMILY_REPRESENTATIVES)
    python benchmarks/zoo.py --curated            # the curated list (TIMM_MODELS + TORCHVISION_MODELS)
    python benchmarks/zoo.py --only timm:resnet10t torchvision:googlenet
    python benchmarks/zoo.py --select             # recompute the family representatives and print them

Each model runs in its own process (a crash or a time-out fails that row only) with one intra-op thread.
Writes ``<out>.md`` (a row per family: converted / fallback / failed and why) and ``<out>.json`` after every
model, so a long sweep leaves a partial table. The check is :func:`lcnnify.testing.zoo.check_model`, the same
one the zoo tests use.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_json  # noqa: E402

from lcnnify.testing.zoo import (FAMILY_REPRESENTATIVES, TIMM_MODELS, TIMM_NOT_CNN, TORCHVISION_MODELS,  # noqa: E402
                                 TORCHVISION_NOT_CNN, Representative, ZooResult, select_representatives)

_CHILD = """
import json, sys, warnings
warnings.filterwarnings("ignore")
import torch
torch.set_num_threads(1)
from dataclasses import asdict
from lcnnify.testing.zoo import check_model
spec, family, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
r = check_model(spec, size=size or None, family=family)
print("@@RESULT@@" + json.dumps(asdict(r)))
"""


def run_one(rep: Representative, timeout: float) -> ZooResult:
    """:func:`check_model` in a fresh process; a crash or time-out becomes a failed result."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, rep.spec, rep.family, str(rep.size)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ZooResult(rep.spec, family=rep.family, size=rep.size, error=f"timed out after {timeout:.0f} s",
                         seconds_total=time.perf_counter() - t0)
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT@@"):
            return ZooResult(**json.loads(line[len("@@RESULT@@"):]))
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return ZooResult(rep.spec, family=rep.family, size=rep.size, seconds_total=time.perf_counter() - t0,
                     error=f"process died (exit {proc.returncode}): {tail[:300]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--curated", action="store_true", help="the curated list instead of the family sweep")
    p.add_argument("--only", nargs="*", default=None, help="these specs only (timm:NAME / torchvision:NAME)")
    p.add_argument("--select", action="store_true", help="recompute the family representatives and print them")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per model")
    p.add_argument("--out", default=str(Path(__file__).with_name("zoo")))
    args = p.parse_args()
    if args.select:
        for r in select_representatives(progress=lambda s: print(s, file=sys.stderr, flush=True)):
            print(f"    Representative({r.family!r}, {r.spec!r}, {r.parameters}, {r.size}),".replace("'", '"'))
        return
    if args.only:
        known = {r.spec: r for r in FAMILY_REPRESENTATIVES}
        reps = [known.get(s, Representative("", s, 0, 0)) for s in args.only]
    elif args.curated:
        reps = [Representative("", f"timm:{n}", 0, 0) for n in TIMM_MODELS] + \
               [Representative("", f"torchvision:{n}", 0, 0) for n in TORCHVISION_MODELS]
    else:
        reps = FAMILY_REPRESENTATIVES
    params = {r.spec: r.parameters for r in reps}
    results: list[ZooResult] = []
    for i, rep in enumerate(reps):
        res = run_one(rep, args.timeout)
        results.append(res)
        print(f"[{i + 1}/{len(reps)}] {rep.spec}: {res.status} ({res.seconds_total:.0f} s) {res.reason[:200]}",
              flush=True)
        _write(results, params, args)  # after every model, so a long sweep leaves a partial table


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _write(results: list[ZooResult], params: dict[str, int], args: argparse.Namespace) -> None:
    rows = ["| family | model | params (M) | input | status | converted layers | left (voiding ops) | why |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        conv = ", ".join(f"{k} {v}" for k, v in sorted(r.converted.items())) or "-"
        left = ", ".join(f"{k} {v}" for k, v in sorted(r.left.items())) or "-"
        why = r.reason or ("; ".join(r.fallbacks[:2]) if r.fallbacks else "")
        if r.error and not r.clear_error:
            why = "BUG (not an LCNNError): " + why
        rows.append(f"| {r.family.partition(':')[2] or '-'} | {r.spec} | {params.get(r.spec, 0) / 1e6:.1f} | "
                    f"{r.size} | {r.status} | {conv} | {_cell(left)} ({r.voiding}) | {_cell(why)} |")
    parts = []
    for lib in ("timm", "torchvision"):
        rs = [r for r in results if r.spec.startswith(lib + ":")]
        if rs:
            parts.append(f"{lib}: {sum(r.ok for r in rs)}/{len(rs)} pass")
    n_ok = sum(r.ok for r in results)
    summary = (f"{'; '.join(parts)}; total {n_ok}/{len(results)} ({100 * n_ok / max(len(results), 1):.0f}%) "
               f"[converted {sum(r.status == 'converted' for r in results)}, "
               f"fallback {sum(r.status == 'fallback' for r in results)}, "
               f"failed {sum(r.status == 'failed' for r in results)}]; "
               f"{machine()['date']}, torch {machine()['torch']}")
    legend = (
        "Each model: `lcnnify(model, example_inputs=...)` at the smallest input size it accepts (input), 3 SGD "
        "steps at batch 8 on cross-entropy + `curvature_penalty()`, then in eval: only LCNN layers (or ops the "
        "report names) execute, operator norms of every spectrally normalized conv/linear 1 +- 1e-3, two eval "
        "forwards identical, finite; the state dict loads into a fresh conversion with the same output; the "
        "original model (one norm layer frozen in eval) is unchanged. `python benchmarks/zoo.py` regenerates "
        "this file; status `fallback` means some module was converted module by module (not traced).")
    text = ["# lcnnify zoo coverage", "", summary, "", legend, "", *rows, ""]
    if not args.curated and not args.only:
        text += ["## Families that are not CNNs (not in the sweep)", "", "| library | family | why |", "|---|---|---|"]
        text += [f"| timm | {m} | {why} |" for m, why in sorted(TIMM_NOT_CNN.items())]
        text += [f"| torchvision | {m} | {why} |" for m, why in sorted(TORCHVISION_NOT_CNN.items())]
        text.append("")
    Path(args.out + ".md").write_text("\n".join(text))
    write_json(Path(args.out + ".json"), {"machine": machine(), "summary": summary,
                                          "results": [asdict(r) for r in results]})


if __name__ == "__main__":
    main()
