"""Shared model factories for the tests (small, fast, CPU)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
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
