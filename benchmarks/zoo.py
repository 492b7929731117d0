"""Zoo coverage table: convert + one training step + execution check for every curated timm/torchvision CNN.

    python benchmarks/zoo.py [--size 32] [--only timm:resnet18 ...]

Writes benchmarks/zoo.md (markdown table) and benchmarks/zoo.json. The check is
:func:`lcnnify.testing.zoo.check_model` (the same one the zoo test uses).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_json  # noqa: E402

from lcnnify.testing.zoo import TIMM_MODELS, TORCHVISION_MODELS, check_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--out", default=str(Path(__file__).with_name("zoo")))
    args = p.parse_args()
    specs = args.only or [f"timm:{n}" for n in TIMM_MODELS] + [f"torchvision:{n}" for n in TORCHVISION_MODELS]
    results = []
    warnings.filterwarnings("ignore")
    for spec in tqdm(specs, desc="zoo"):
        results.append(check_model(spec, size=args.size))
        _write(results, args)  # after every model, so a long sweep leaves a partial table


def _write(results, args) -> None:
    rows = ["| model | traced | converted | left | voiding ops | train step | check | convert (s) |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        conv = ", ".join(f"{k} {v}" for k, v in sorted(r.converted.items()))
        left = ", ".join(f"{k} {v}" for k, v in sorted(r.left.items())) or "-"
        status = "ok" if r.ok else (r.error or "; ".join(r.problems[:2]))
        rows.append(f"| {r.spec} | {'yes' if r.traced else 'fallback'} | {conv} | {left} | {r.voiding} | "
                    f"{'ok' if r.train_step_ok else 'FAIL'} | {status} | {r.seconds_convert:.1f} |")
    n_timm = [r for r in results if r.spec.startswith("timm:")]
    n_tv = [r for r in results if r.spec.startswith("torchvision:")]
    summary = (f"timm: {sum(r.ok for r in n_timm)}/{len(n_timm)} ok; "
               f"torchvision: {sum(r.ok for r in n_tv)}/{len(n_tv)} ok; input 3x{args.size}x{args.size}; "
               f"{machine()['date']}, torch {machine()['torch']}")
    text = "# lcnnify zoo coverage\n\n" + summary + "\n\n" + "\n".join(rows) + "\n"
    Path(args.out + ".md").write_text(text)
    write_json(Path(args.out + ".json"), {"machine": machine(), "summary": summary,
                                          "results": [asdict(r) for r in results]})


if __name__ == "__main__":
    main()
