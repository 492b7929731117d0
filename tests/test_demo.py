"""`lcnnify demo`: the --quick run writes results.json (all seven methods), the markdown tables and both figures;
the aggregation reports diverged runs instead of crashing; the eps note is right about the dimensions."""
from __future__ import annotations

import json
import math

import pytest

from lcnnify.cli import main
from lcnnify.demo import METHOD_LABELS, DemoConfig, eps_note, format_table
from lcnnify.demo.report import aggregate as _aggregate
from lcnnify.demo.report import findings as _findings
from lcnnify.demo.report import tables as _tables

SEVEN = ("standard", "lcnn", "gradreg", "lcnn+gradreg", "cure", "softplus+wd", "adversarial")
PNG = b"\x89PNG\r\n\x1a\n"


def test_demo_quick_writes_results_tables_and_figures(capsys, tmp_path):
    out = tmp_path / "demo"
    code = main(["demo", "--quick", "--no-progress", "--out", str(out)])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    res = json.loads((out / "results.json").read_text())
    assert tuple(res["methods"]) == SEVEN and set(res["summary"]) == set(SEVEN)
    for m in SEVEN:
        s = res["summary"][m]
        assert len(s["seeds"]) + len(s["diverged_seeds"]) == 2  # quick: 2 seeds, +- over seeds
        if s["seeds"]:
            for q in ("grad_norm", "hessian_norm", "curvature", "accuracy", "time_ratio"):
                assert math.isfinite(s[q]["mean"]) and s[q]["std"] >= 0
            assert set(s["robust_accuracy"]) == {"0.0", "0.05", "0.1", "0.15", "0.2", "0.5"}
            assert set(s["discrepancy_curvature"]) >= {"mean", "std"}
            assert len(s["gradient_robustness"]) == 3
    assert res["summary"]["standard"]["time_ratio"]["mean"] == pytest.approx(1.0)
    assert res["machine"]["cpu"] and res["date"] and res["runtime_seconds"] > 0
    assert "d = 64" in res["eps_note"]
    assert set(res["two_moons"]) == {"standard", "lcnn"}
    for name in ("fig1_two_moons.png", "fig2_gradient_robustness.png"):
        assert (out / name).read_bytes()[:8] == PNG
    md = (out / "results.md").read_text()
    for title in ("Table 1", "Table 2", "Table 3", "fig1_two_moons.png", "| LCNN + GradReg |"):
        assert title in md
    for title in ("Table 1", "Table 2", "Table 3", "Findings", "E||Hess f||"):
        assert title in stdout
    # the pretrained-model part: per seed, the standard run's preserved conversion and fine-tuned LCNN
    assert "## From a trained model to an LCNN" in md and "| preserve_function conversion (no training) |" in md
    assert "preserve_function conversion (no training)" in stdout
    assert any(f.startswith("From a trained model (2 seed(s))") for f in res["findings"])
    per = res["pretrained"]["per_seed"]
    std_runs = {r["seed"]: r for r in res["runs"] if r["method"] == "standard"}
    assert [r["seed"] for r in per] == sorted(std_runs)
    for r in per:
        assert r["accuracy_before"] == std_runs[r["seed"]]["accuracy"]  # the demo's own standard model
        for k in ("accuracy_before", "accuracy_preserved", "agreement", "accuracy_finetuned", "accuracy_scratch"):
            assert 0.0 <= r[k] <= 1.0, (k, r[k])
        # the conversion preserves the function: same predictions, so the same accuracy (up to a few images)
        assert r["agreement"] >= 0.97 and abs(r["accuracy_preserved"] - r["accuracy_before"]) <= 0.03, r
        assert math.isfinite(r["curvature_finetuned"]) and r["curvature_finetuned"] > 0
        assert set(r["robust_finetuned"]) == set(r["robust_scratch"]) == {"0.0", "0.05", "0.1", "0.15", "0.2", "0.5"}


def _fake_run(method, seed, curv=1.0, diverged=False, acc=0.9):
    if diverged:
        return {"kind": "digits", "method": method, "seed": seed, "diverged": True, "error": "loss became nan",
                "epochs_done": 1}
    geo = {q: {"mean": curv, "std": 0.1} for q in ("grad_norm", "hessian_norm", "curvature")}
    return {"kind": "digits", "method": method, "seed": seed, "diverged": False, "accuracy": acc,
            "seconds_per_epoch": 1.0 + seed, "geometry_test": geo, "geometry_train": geo,
            "discrepancy": {q: 0.0 for q in geo}, "discrepancy_over_train": {q: 0.0 for q in geo},
            "robust_accuracy": {"0.0": 0.9, "0.05": 0.8}, "gradient_robustness": {"0.001": {"mean": 0.01}},
            "lcnn_parameters": {}}


def test_diverged_runs_are_reported_not_fatal():
    cfg = DemoConfig(methods=("standard", "lcnn", "cure"), eps=(0.05,), extra_eps=())
    runs = [_fake_run("standard", s, curv=4.0) for s in (0, 1)] + [_fake_run("lcnn", s) for s in (0, 1)] + \
           [_fake_run("cure", 0, diverged=True), _fake_run("cure", 1, diverged=True)]
    summary = _aggregate(cfg, runs)
    assert summary["cure"]["seeds"] == [] and summary["cure"]["diverged_seeds"] == [0, 1]
    tables = _tables(cfg, summary, markdown=False)
    assert "CURE (2/2 diverged)" in tables["table1"] and "diverged" in tables["table2"]
    findings = _findings(cfg, summary, runs)
    assert any("DIVERGED" in f for f in findings)
    assert any("LCNN clearly lowers" in f and "4.00x" in f and "lower in all 2 seeds" in f for f in findings)


def test_findings_claim_an_effect_only_where_it_holds_in_every_seed():
    # LCNN: lower curvature than standard in seed 0 (ratio 2), higher in seed 1 (ratio 0.8): mean ratio > 1,
    # but no consistent effect. Adversarial: higher in both seeds. Accuracy: +1 and -1 points.
    cfg = DemoConfig(methods=("standard", "lcnn", "adversarial"))
    runs = [_fake_run("standard", 0, curv=4.0), _fake_run("standard", 1, curv=1.0),
            _fake_run("lcnn", 0, curv=2.0, acc=0.91), _fake_run("lcnn", 1, curv=1.25, acc=0.89),
            _fake_run("adversarial", 0, curv=5.0), _fake_run("adversarial", 1, curv=2.0)]
    findings = _findings(cfg, _aggregate(cfg, runs), runs)
    lcnn = next(f for f in findings if f.startswith("LCNN "))
    assert "does NOT consistently lower" in lcnn and "1 of 2 seeds lower, 1 higher, 0 within 10%" in lcnn, lcnn
    assert "2.00, 0.80" in lcnn  # the per-seed ratios, in seed order
    assert "no consistent difference; per seed +1.0, -1.0" in lcnn, lcnn
    adv = next(f for f in findings if f.startswith("Adversarial Training vs standard"))
    assert "curvature HIGHER in all 2 seeds" in adv and "0.80, 0.50" in adv, adv
    assert any(f.startswith("How to read these numbers: 2 seed(s)") for f in findings)


def test_small_effects_in_every_seed_are_not_findings():
    # curvature 1.02-1.12x lower in every seed and accuracy +0.2 points in every seed: below the effect sizes
    # (EFFECT_RATIO, EFFECT_POINTS) that survive a change of CPU, so neither is stated as an effect
    from lcnnify.demo.report import EFFECT_POINTS, EFFECT_RATIO

    assert EFFECT_RATIO > 1.06 and EFFECT_POINTS > 0.2
    cfg = DemoConfig(methods=("standard", "adversarial"))
    runs = [_fake_run("standard", s, curv=c, acc=0.900) for s, c in enumerate((1.12, 1.04, 1.02))]
    runs += [_fake_run("adversarial", s, curv=1.0, acc=0.902) for s in range(3)]
    adv = next(f for f in _findings(cfg, _aggregate(cfg, runs), runs) if f.startswith("Adversarial"))
    assert "curvature no consistent difference" in adv and "lower in all" not in adv, adv
    assert "accuracy +0.2 points (no consistent difference" in adv, adv


def test_findings_make_no_consistency_claim_from_one_seed():
    cfg = DemoConfig(methods=("standard", "lcnn"))
    runs = [_fake_run("standard", 0, curv=4.0), _fake_run("lcnn", 0, curv=1.0)]
    lcnn = next(f for f in _findings(cfg, _aggregate(cfg, runs), runs) if f.startswith("LCNN "))
    assert "lowers (1 seed only)" in lcnn and "1 seed: no claim about consistency" in lcnn, lcnn


def test_eps_note_relates_the_paper_eps_to_the_input_dimension():
    note = eps_note(DemoConfig(image_size=8), mean_l2=3.9)
    assert "d = 64" in note and "d = 3072" in note and "6.93x" in note
    note16 = eps_note(DemoConfig(image_size=16), mean_l2=7.0)
    assert "d = 256" in note16 and "3.46x" in note16


def test_format_table_plain_and_markdown():
    rows = [["LCNN", "1.0 ± 0.1"], ["Standard", "2"]]
    md = format_table(["Model", "x"], rows, markdown=True)
    assert md.splitlines()[:2] == ["| Model | x |", "|---|---|"]
    plain = format_table(["Model", "x"], rows)
    assert len({len(line) for line in plain.splitlines()}) == 1  # aligned
    assert set(METHOD_LABELS) == set(SEVEN)


def _fake_pretrained(seed, acc_before=0.9, acc_preserved=0.9, curv_ft=1.0, acc_ft=0.9, rob_ft=0.5, wall_ft=1.0):
    run = _fake_run("standard", seed, curv=4.0, acc=acc_before)
    run["train_wall_seconds"] = 2.0
    run["robust_accuracy"] = {"0.0": acc_before, "0.5": 0.1}
    geo = {q: {"mean": curv_ft, "std": 0.1} for q in ("grad_norm", "hessian_norm", "curvature")}
    run["pretrained"] = {"accuracy_before": acc_before, "accuracy_preserved": acc_preserved, "agreement": 0.99,
                         "accuracy_finetuned": acc_ft, "finetune_wall_seconds": wall_ft,
                         "geometry_finetuned": geo, "robust_accuracy_finetuned": {"0.0": acc_ft, "0.5": rob_ft}}
    return run


def _scratch(seed, curv=2.0, acc=0.9, rob=0.5):
    run = _fake_run("lcnn", seed, curv=curv, acc=acc)
    run["train_wall_seconds"] = 4.0
    run["robust_accuracy"] = {"0.0": acc, "0.5": rob}
    return run


def test_pretrained_finding_is_paired_by_seed_and_claims_only_effects_in_every_seed():
    from lcnnify.demo.report import pretrained_finding, pretrained_summary, pretrained_table

    cfg = DemoConfig(methods=("standard", "lcnn"), eps=(), extra_eps=(0.5,), finetune_epochs=3)
    # fine-tuned vs scratch: curvature 2x lower in seed 0, 1.25x HIGHER in seed 1 (no consistent effect);
    # accuracy +2 points in both seeds; PGD +1 / -1 point; wall time 4x lower in both seeds
    runs = [_fake_pretrained(0, curv_ft=1.0, acc_ft=0.92, rob_ft=0.51), _scratch(0, curv=2.0),
            _fake_pretrained(1, curv_ft=2.5, acc_ft=0.92, rob_ft=0.49), _scratch(1, curv=2.0)]
    ps = pretrained_summary(runs)
    assert [r["seed"] for r in ps["per_seed"]] == [0, 1]
    assert ps["curvature_finetuned"]["mean"] == pytest.approx(1.75) and ps["accuracy_scratch"]["mean"] == 0.9
    line = pretrained_finding(cfg, ps)
    assert "keeps the standard model's accuracy" in line and "at least 99.0%" in line, line
    assert "normalized curvature no consistent difference: 1 of 2 seeds lower, 1 higher" in line, line
    assert "2.00, 0.80" in line, line  # scratch / fine-tuned, in seed order
    assert "accuracy +2.0 points (higher in all 2 seeds" in line, line
    assert "PGD at eps=0.5 +0.0 points (no consistent difference; per seed +1.0, -1.0)" in line, line
    assert "lower in all 2 seeds (scratch / fine-tuned per seed: 4.00, 4.00)" in line, line
    table = pretrained_table(cfg, ps, markdown=True)
    assert "| LCNN fine-tuned (3 epochs, recipe finetune) | 92.0 ± 0.0 |" in table, table
    # a conversion that loses accuracy is reported as such; a seed without an LCNN from scratch is not paired
    runs = [_fake_pretrained(0, acc_preserved=0.85), _fake_pretrained(1, acc_preserved=0.85)]
    line = pretrained_finding(cfg, pretrained_summary(runs))
    assert "CHANGES the standard model's accuracy" in line and "-5.0, -5.0" in line, line
    assert "no LCNN from scratch to compare" in line, line
    assert pretrained_summary([_scratch(0)]) is None
