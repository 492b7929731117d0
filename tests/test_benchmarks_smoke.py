"""benchmarks/overhead_profile.py: the attribution of profiled time to LCNN parts adds up and lands where it should.

No timing is asserted: only that every event's self time is attributed once (categories sum to the profiler's
own step total), and that known ops land in the category of the part that ran them.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def op():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("overhead_profile", BENCH / "overhead_profile.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(BENCH))


def _categories_of(a, name: str) -> set[str]:
    return {c for c, ops in a.category_ops.items() if ops.get(name, 0.0) > 0 or a.category_calls[c].get(name)}


def test_attribution_by_scope_and_by_backward_node(op):
    """Forward ops go to the innermost scope's category; a backward node goes to its forward op's category (matched
    by sequence number: an ExpBackward0 under a batch-norm label is batch-norm backward, which its name alone would
    not say)."""
    from lcnnify.nn.centered_softplus import centered_softplus

    x = torch.randn(64, 64, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function(op.STEP_LABEL):
            with record_function("lcnnify.spectral_norm.power_iteration"):
                with torch.no_grad():
                    torch.mm(x, x)
            with record_function("lcnnify.lipschitz_batchnorm"):
                h = torch.exp(x)
            y = centered_softplus(h, 3.0)
            y.sum().backward()
    a = op.Attribution(prof.events(), steps=1)
    assert _categories_of(a, "aten::mm") == {"sn_power"}
    assert _categories_of(a, "aten::exp") == {"bn_fwd"}
    assert _categories_of(a, "ExpBackward0") == {"bn_bwd"}
    assert _categories_of(a, "_CenteredSoftplusFn") == {"act_fwd"}
    assert _categories_of(a, "_CenteredSoftplusFnBackward") == {"act_bwd"}
    assert _categories_of(a, "aten::sum") == {"loss"}  # a step-level op outside the model: the loss
    assert sum(a.category_us.values()) == pytest.approx(a.step_us, rel=1e-9)


def test_quick_run_sums_to_the_measured_difference(op, tmp_path):
    """--quick on resnet18: per model the categories add up to the profiled step, their differences to the step
    difference; the main convolutions are the same calls in both models, the spectral norm exists only in the LCNN."""
    out = tmp_path / "profile.json"
    payload = op.main(["--quick", "--out", str(out)])
    res = payload["models"]["resnet18"]
    for mode in ("train", "eval"):
        variants = res["modes"][mode]["variants"]
        for v in variants.values():
            assert v["sum_categories_ms"] == pytest.approx(v["step_ms"], rel=1e-6)
            assert v["outside_step_ms"] == pytest.approx(0.0, abs=0.5)
        base, lc = variants["original"], variants["lcnn"]
        diff = lc["difference"]
        assert diff["sum_categories_ms"] == pytest.approx(lc["step_ms"] - base["step_ms"], rel=1e-6, abs=1e-6)
        assert set(diff["categories_ms"]) == set(op.CATEGORIES)
        for cat in ("sn_power", "sn_normalize", "sn_bookkeeping"):
            assert base["categories_ms"][cat] == 0.0
        assert lc["categories_ms"]["sn_normalize"] > 0
        conv = "aten::convolution"
        assert lc["category_calls"]["conv_fwd"][conv] == base["category_calls"]["conv_fwd"][conv] == 20
        assert "_CenteredSoftplusFn" in lc["category_ops_ms"]["act_fwd"]
        assert set(res["remedies"][mode]) <= set(op.CATEGORIES)
    train = res["modes"]["train"]["variants"]["lcnn"]
    assert train["categories_ms"]["sn_power"] > 0
    assert "_CenteredSoftplusFnBackward" in train["category_ops_ms"]["act_bwd"]
    ns = res["micro"]["ns_per_element"]
    assert all(v == v and v >= 0 for k, v in ns.items() if not k.endswith("_bwd"))
    # the written files: the JSON's differences still add up (rounded), the report has both tables
    written = json.loads(out.read_text())["models"]["resnet18"]["modes"]["train"]["variants"]["lcnn"]
    assert sum(written["difference"]["categories_ms"].values()) == pytest.approx(
        written["difference"]["total_ms"], abs=1e-3 * len(op.CATEGORIES))
    md = out.with_suffix(".md").read_text()
    assert "### training step" in md and "### eval forward" in md
