"""lcnnify.metrics.robustness: l2 PGD (vs torchattacks), robust accuracy, gradient robustness."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchattacks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lcnnify.errors import MeasurementError
from lcnnify.metrics import curvature, gradient_robustness, pgd_l2, robust_accuracy

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


def small_cnn(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Softplus(beta=2.0), nn.Flatten(),
                          nn.Linear(6 * 6 * 6, 4))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 1.5)
    return model


def batch(seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


@pytest.fixture(scope="module")
def blobs_model():
    """A tiny MLP trained on two separable Gaussian blobs inside [0, 1]^10."""
    g = torch.Generator().manual_seed(0)
    n = 200
    y = torch.arange(n) % 2
    x = (0.35 + 0.3 * y[:, None].float() + 0.08 * torch.randn(n, 10, generator=g)).clamp(0, 1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Softplus(beta=5.0), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


# ------------------------------------------------------------------------------------------ PGD
@settings(max_examples=10, **SETTINGS)
@given(eps=st.floats(0.01, 3.0), alpha=st.floats(0.01, 1.0), steps=st.integers(1, 6), seed=st.integers(0, 1000))
def test_pgd_iterates_identical_to_torchattacks_pgdl2_without_random_start(eps, alpha, steps, seed):
    model = small_cnn(seed).train()  # both measure in eval mode
    x, y = batch(seed)
    theirs = torchattacks.PGDL2(model, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
    ours = pgd_l2(model, x, y, eps, steps=steps, step_size=alpha, random_start=False)
    assert torch.equal(ours, theirs)
    assert model.training


def test_pgd_random_start_identical_to_torchattacks_with_the_same_seed():
    model = small_cnn(1)
    x, y = batch(1)
    torch.manual_seed(123)
    theirs = torchattacks.PGDL2(model, eps=0.7, alpha=0.2, steps=4, random_start=True)(x, y)
    torch.manual_seed(123)
    ours = pgd_l2(model, x, y, 0.7, steps=4, step_size=0.2)
    assert torch.equal(ours, theirs)


def test_pgd_generator_makes_the_random_start_reproducible():
    model = small_cnn(2)
    x, y = batch(2)
    a = pgd_l2(model, x, y, 0.5, steps=0, generator=torch.Generator().manual_seed(7))
    b = pgd_l2(model, x, y, 0.5, steps=0, generator=torch.Generator().manual_seed(7))
    c = pgd_l2(model, x, y, 0.5, steps=0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, x)


@settings(max_examples=15, **SETTINGS)
@given(eps=st.floats(0.001, 5.0), steps=st.integers(0, 5), rel_step=st.one_of(st.none(), st.floats(0.05, 3.0)),
       random_start=st.booleans(), seed=st.integers(0, 1000))
def test_pgd_stays_in_the_l2_ball_and_in_the_unit_box(eps, steps, rel_step, random_start, seed):
    model = small_cnn(seed)
    x, y = batch(seed)
    step_size = None if rel_step is None else rel_step * eps
    adv = pgd_l2(model, x, y, eps, steps=steps, step_size=step_size, random_start=random_start)
    assert adv.shape == x.shape and not adv.requires_grad
    assert adv.min() >= 0 and adv.max() <= 1
    assert ((adv - x).flatten(1).norm(dim=1) <= eps * (1 + 1e-5)).all()


def test_pgd_increases_the_loss_and_eps_zero_returns_x():
    model = small_cnn(3)
    x, y = batch(3, n=16)
    adv = pgd_l2(model, x, y, 1.0, random_start=False)
    with torch.no_grad():
        model.eval()
        assert F.cross_entropy(model(adv), y, reduction="none").gt(F.cross_entropy(model(x), y, reduction="none")).all()
    assert torch.equal(pgd_l2(model, x, y, 0.0), x)
    # default step size 2.5 eps / steps reaches the boundary of the ball (no clamping at these inputs)
    adv = pgd_l2(model, x * 0.5 + 0.25, y, 0.1, random_start=False)
    assert torch.allclose((adv - (x * 0.5 + 0.25)).flatten(1).norm(dim=1), torch.full((16,), 0.1), rtol=1e-4)


def test_robust_accuracy_decreases_with_eps_on_a_trained_tiny_model(blobs_model):
    model, x, y = blobs_model
    eps_list = [0.0, 0.1, 0.3, 0.5, 1.0]
    acc = robust_accuracy(model, (x, y), eps_list, batch_size=64, random_start=False, progress=False)
    values = [acc[e] for e in eps_list]
    assert list(acc) == eps_list
    assert values[0] >= 0.95  # trained
    assert all(a >= b for a, b in zip(values, values[1:])), values
    assert values[-1] < 0.5 * values[0], values


def test_robust_accuracy_dataloader_and_tensor_pair_agree(blobs_model):
    model, x, y = blobs_model
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=50)
    a = robust_accuracy(model, loader, [0.0, 0.3], random_start=False, progress=False)
    b = robust_accuracy(model, (x, y), [0.0, 0.3], batch_size=50, random_start=False, progress=False)
    assert a == b
    clean = (model(x).argmax(1) == y).float().mean().item()
    assert a[0.0] == pytest.approx(clean)
    half = robust_accuracy(model, loader, 0.0, max_samples=75, progress=False)
    assert half[0.0] == pytest.approx((model(x[:75]).argmax(1) == y[:75]).float().mean().item())


def test_robust_accuracy_shows_a_progress_bar(blobs_model, capsys):
    model, x, y = blobs_model
    robust_accuracy(model, (x, y), [0.1], steps=1, progress=True)
    assert "robust accuracy" in capsys.readouterr().err
    robust_accuracy(model, (x, y), [0.1], steps=1, progress=False)
    assert "robust accuracy" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ gradient robustness
def smooth_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 32), nn.Softplus(beta=2.0), nn.Linear(32, 3)).double().eval()


def test_gradient_robustness_scales_linearly_with_small_noise():
    model = smooth_mlp(0)
    x = torch.randn(8, 20, dtype=torch.float64)
    y = torch.arange(8) % 3
    norms = [1e-5, 1e-4, 1e-3]
    r = gradient_robustness(model, x, y, norms, n_draws=2, generator=torch.Generator().manual_seed(0))
    assert list(r) == norms and r[1e-4].shape == (8,)
    assert torch.allclose(r[1e-4] / r[1e-5], torch.full((8,), 10.0, dtype=torch.float64), rtol=0.01)
    assert torch.allclose(r[1e-3] / r[1e-4], torch.full((8,), 10.0, dtype=torch.float64), rtol=0.02)


def test_gradient_robustness_is_bounded_by_the_quadratic_approximation():
    """Proposition 1 (quadratic approximation): ||grad f(x+e) - grad f(x)|| / ||grad f(x)|| <= ||e|| C(x)."""
    model = smooth_mlp(1)
    x = torch.randn(8, 20, dtype=torch.float64)
    y = torch.arange(8) % 3
    c = curvature(model, x, y, eps=0.0).curvature
    r = gradient_robustness(model, x, y, 1e-4, n_draws=3)[1e-4]
    assert (r <= 1e-4 * c * 1.01).all()
    assert (r > 0).all()


def test_gradient_robustness_zero_noise_mean_reduction_and_draws():
    model = smooth_mlp(2)
    x = torch.randn(5, 20, dtype=torch.float64)
    y = torch.arange(5) % 3
    per = gradient_robustness(model, x, y, [0.0, 0.01], generator=torch.Generator().manual_seed(1))
    mean = gradient_robustness(model, x, y, [0.0, 0.01], reduction="mean",
                               generator=torch.Generator().manual_seed(1))
    assert torch.equal(per[0.0], torch.zeros(5, dtype=torch.float64))
    assert mean[0.01].ndim == 0 and torch.allclose(mean[0.01], per[0.01].mean())
    two = gradient_robustness(model, x, y, 0.01, n_draws=2, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(two[0.01], per[0.01])  # averaged over a second direction


# ------------------------------------------------------------------------------------------ state and bad input
def test_robustness_functions_restore_modes_and_grads():
    model = small_cnn(4).train()
    params = list(model.parameters())
    grads = [torch.ones_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    x, y = batch(4)
    pgd_l2(model, x, y, 0.5, steps=2)
    robust_accuracy(model, (x, y), [0.0, 0.5], steps=2, progress=False)
    gradient_robustness(model, x, y, [0.1])
    assert all(m.training for m in model.modules())
    for p, g in zip(params, grads):
        assert p.grad is g and torch.equal(g, torch.ones_like(p)) and p.requires_grad


@pytest.mark.parametrize("call, match", [
    (lambda m, x, y: pgd_l2(m, x * 2, y, 0.5), r"\[0, 1\].*normalization inside the model"),
    (lambda m, x, y: pgd_l2(m, x - 1, y, 0.5), r"\[0, 1\]"),
    (lambda m, x, y: pgd_l2(m, x, y, -0.1), "eps must be >= 0"),
    (lambda m, x, y: pgd_l2(m, x, y, float("nan")), "eps must be finite"),
    (lambda m, x, y: pgd_l2(m, x, y, 0.5, steps=-1), "steps must be >= 0"),
    (lambda m, x, y: pgd_l2(m, x, y, 0.5, step_size=0.0), "step_size must be > 0"),
    (lambda m, x, y: pgd_l2(m, x, y + 4, 0.5), "labels out of range"),
    (lambda m, x, y: pgd_l2(m, x.flatten(), y, 0.5), "batched"),
    (lambda m, x, y: robust_accuracy(m, (x, y), [], progress=False), "eps_list is empty"),
    (lambda m, x, y: robust_accuracy(m, (x, y), [0.1, -0.1], progress=False), "eps must be >= 0"),
    (lambda m, x, y: robust_accuracy(m, x, [0.1], progress=False), "pair of tensors or an iterable"),
    (lambda m, x, y: robust_accuracy(m, [x, x, y], [0.1], progress=False), "expected an \\(x, y\\) pair"),
    (lambda m, x, y: robust_accuracy(m, torch.utils.data.TensorDataset(x, y), [0.1], progress=False),
     "DataLoader"),
    (lambda m, x, y: robust_accuracy(m, (x, y), [0.1], stepz=3, progress=False), "unknown keyword"),
    (lambda m, x, y: gradient_robustness(m, x, y, [0.1, -1.0]), "noise norm must be >= 0"),
    (lambda m, x, y: gradient_robustness(m, x, y, []), "noise_norms is empty"),
    (lambda m, x, y: gradient_robustness(m, x, y, 0.1, n_draws=0), "n_draws must be >= 1"),
    (lambda m, x, y: gradient_robustness(m, x.masked_fill(x > 0.9, float("nan")), y, 0.1), "NaN"),
])
def test_bad_robustness_input_raises_measurement_error(call, match):
    model = small_cnn(5)
    x, y = batch(5)
    with pytest.raises(MeasurementError, match=match):
        call(model, x, y)
