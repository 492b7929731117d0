"""The zoo: timm and torchvision CNNs convert, train, and keep the LCNN contract (:func:`check_model`).

The fast slice (a few families of the family sweep) runs by default; the curated list with ``pytest -m slow``
(the whole family sweep is in test_families.py).
"""
from __future__ import annotations

import pytest

from lcnnify.testing.zoo import (FAMILY_REPRESENTATIVES, FAST_SLICE, TIMM_MODELS, TORCHVISION_MODELS,
                                 check_model)

CURATED = [f"timm:{n}" for n in TIMM_MODELS] + [f"torchvision:{n}" for n in TORCHVISION_MODELS]
_REPS = {r.spec: r for r in FAMILY_REPRESENTATIVES}


def test_fast_slice_is_part_of_the_family_sweep():
    assert set(FAST_SLICE) <= set(_REPS) and len({_REPS[s].family for s in FAST_SLICE}) == len(FAST_SLICE)


@pytest.mark.parametrize("spec", FAST_SLICE)
def test_zoo_fast_slice_keeps_the_lcnn_contract(spec):
    rep = _REPS[spec]
    res = check_model(spec, size=rep.size, family=rep.family)
    assert res.ok, f"{spec} ({res.status}): {res.reason}"


@pytest.mark.slow
@pytest.mark.parametrize("spec", CURATED)
def test_curated_model_keeps_the_lcnn_contract(spec):
    res = check_model(spec)
    assert res.ok, f"{spec} ({res.status}): {res.reason}"
