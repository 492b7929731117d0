"""Shared model factories and exact references for the tests of lcnnify.metrics."""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "softplus": lambda: nn.Softplus(beta=3.0),
    "tanh": nn.Tanh,
}


def make_mlp(d: int, hidden: int, classes: int, act: str, depth: int, seed: int,
             dtype: torch.dtype = torch.float64, gain: float = 2.0) -> nn.Module:
    """Random smooth MLP; the larger-than-usual init gain makes the curvature terms matter (indefinite Hessians)."""
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    width = d
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), ACTIVATIONS[act]()]
        width = hidden
    layers.append(nn.Linear(width, classes))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * gain / m.in_features ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model.to(dtype).eval()


def make_cnn(channels: int, size: int, classes: int, act: str, seed: int, width: int = 8,
             dtype: torch.dtype = torch.float64, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    out = (size + 1) // 2
    layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(width))
    layers += [ACTIVATIONS[act](), nn.Conv2d(width, width, 3, stride=2, padding=1), ACTIVATIONS[act](),
               nn.Flatten(), nn.Linear(width * out * out, classes)]
    return nn.Sequential(*layers).to(dtype).eval()


def exact_spectra(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Per-sample exact input Hessian eigenvalues and gradients of the cross-entropy (float64 reference)."""
    model = model.eval()
    eigs, grads = [], []
    for i in range(x.shape[0]):
        def f(xi, i=i):
            return F.cross_entropy(model(xi.unsqueeze(0)), y[i:i + 1])
        xi = x[i].detach()
        h = torch.autograd.functional.hessian(f, xi)  # (vectorize=True is slower for convs on CPU)
        d = xi.numel()
        h = h.reshape(d, d).double()
        eigs.append(torch.linalg.eigvalsh((h + h.T) / 2))
        xg = xi.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(xg), xg)
        grads.append(g.flatten().double())
    return eigs, grads


def relerr(est: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (est.double() - ref.double()).abs() / ref.double().abs()


@pytest.fixture(scope="session")
def mx():
    """The helpers as a namespace (usable from hypothesis tests, which dislike function-scoped fixtures)."""
    return types.SimpleNamespace(make_mlp=make_mlp, make_cnn=make_cnn, exact_spectra=exact_spectra, relerr=relerr)
