"""Shared model factories for the tests (small, fast, CPU)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from hypothesis import HealthCheck, settings

# One intra-op thread for the whole suite: the test models are tiny, and on a 2-core machine OpenMP threads
# only add contention (measured here: 10-100x slower double-backward passes with 2 threads under load).
torch.set_num_threads(1)
settings.register_profile("ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=25)
settings.load_profile("ci")


from lcnnify.testing.models import SharedReluNet, TinyCNN  # noqa: E402


@pytest.fixture
def shared_relu_net() -> nn.Module:
    torch.manual_seed(0)
    return SharedReluNet()


@pytest.fixture
def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return TinyCNN()
