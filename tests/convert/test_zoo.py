"""The zoo: timm and torchvision CNNs convert, train one step, and execute only LCNN layers (issue: zoo).

The fast slice runs by default; the whole curated list with ``pytest -m slow``.
"""
from __future__ import annotations

import pytest

from lcnnify.testing.zoo import FAST_SLICE, TIMM_MODELS, TORCHVISION_MODELS, check_model

ALL = [f"timm:{n}" for n in TIMM_MODELS] + [f"torchvision:{n}" for n in TORCHVISION_MODELS]


def _assert_ok(spec: str) -> None:
    res = check_model(spec)
    assert not res.error, f"{spec}: {res.error}"
    assert res.train_step_ok, f"{spec}: {res.problems}"
    assert res.ok, f"{spec}: {res.problems}"


def test_zoo_lists_are_large_enough():
    assert len(TIMM_MODELS) >= 40 and len(TORCHVISION_MODELS) >= 12


@pytest.mark.parametrize("spec", FAST_SLICE)
def test_zoo_fast_slice_converts_trains_and_runs_only_lcnn_layers(spec):
    _assert_ok(spec)


@pytest.mark.slow
@pytest.mark.parametrize("spec", [s for s in ALL if s not in FAST_SLICE])
def test_zoo_model_converts_trains_and_runs_only_lcnn_layers(spec):
    _assert_ok(spec)
