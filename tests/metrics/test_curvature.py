"""lcnnify.metrics.curvature: accuracy against exact Hessians, batching, state restoration, bad input."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lcnnify.errors import MeasurementError
from lcnnify.metrics import CurvatureStats, curvature

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------ exactness
@settings(max_examples=25, **SETTINGS)
@given(d=st.integers(2, 200), hidden=st.integers(4, 32), depth=st.integers(1, 2),
       act=st.sampled_from(["softplus", "tanh"]), classes=st.integers(2, 6), seed=st.integers(0, 10_000))
def test_hessian_norm_within_1pct_of_exact_hessian_on_random_smooth_mlps(mx, d, hidden, depth, act, classes, seed):
    model = mx.make_mlp(d, hidden, classes, act, depth, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, d, generator=g, dtype=torch.float64) * 1.5
    y = torch.randint(0, classes, (3,), generator=g)
    eigs, grads = mx.exact_spectra(model, x, y)
    exact = torch.stack([e.abs().max() for e in eigs])
    stats = curvature(model, x, y)  # default iters=20
    assert (mx.relerr(stats.hessian_norm, exact) <= 0.01).all(), (stats.hessian_norm, exact)
    assert stats.hessian_norm.double().le(exact * (1 + 1e-9)).all()  # Lanczos never overestimates


@settings(max_examples=15, **SETTINGS)
@given(channels=st.integers(1, 3), size=st.integers(3, 8), act=st.sampled_from(["softplus", "tanh"]),
       seed=st.integers(0, 10_000))
def test_hessian_norm_within_1pct_of_exact_hessian_on_tiny_convnets(mx, channels, size, act, seed):
    model = mx.make_cnn(channels, size, 4, act, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(3, channels, size, size, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (3,), generator=g)
    eigs, _ = mx.exact_spectra(model, x, y)
    exact = torch.stack([e.abs().max() for e in eigs])
    stats = curvature(model, x, y)
    assert (mx.relerr(stats.hessian_norm, exact) <= 0.01).all(), (stats.hessian_norm, exact)


def test_hessian_norm_within_1pct_in_float32(mx):
    model = mx.make_cnn(3, 6, 5, "softplus", seed=3, dtype=torch.float32)
    x = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 4])
    stats = curvature(model, x, y)
    eigs, _ = mx.exact_spectra(model.double(), x.double(), y)
    exact = torch.stack([e.abs().max() for e in eigs])
    assert stats.hessian_norm.dtype == torch.float32
    assert (mx.relerr(stats.hessian_norm, exact) <= 0.01).all()


def test_lanczos_beats_rayleigh_power_iteration_on_indefinite_hessians(mx):
    """Random conv nets whose exact Hessians have eigenvalues of both signs with similar magnitude: the paper's
    power iteration + |u'Hu| is off by a lot at the same number of Hessian-vector products; Lanczos is not."""
    ratios = []
    errs = {(m, k): [] for m in ("lanczos", "power") for k in (10, 20)}
    for seed in range(2):
        model = mx.make_cnn(3, 6, 5, "softplus", seed)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64)
        y = torch.randint(0, 5, (4,), generator=g)
        eigs, _ = mx.exact_spectra(model, x, y)
        exact = torch.stack([e.abs().max() for e in eigs])
        ratios += [(-e.min() / e.max()).item() for e in eigs]
        for (method, iters), out in errs.items():
            out.append(mx.relerr(curvature(model, x, y, iters=iters, method=method).hessian_norm, exact))
    # the test really is about indefinite spectra with +- pairs of similar size
    assert sum(0.5 < r < 2.0 for r in ratios) >= len(ratios) // 2, ratios
    err = {k: torch.cat(v) for k, v in errs.items()}
    assert err["lanczos", 20].max() <= 0.01
    for iters in (10, 20):
        pw, lan = err["power", iters], err["lanczos", iters]
        assert pw.mean() > 0.05 and pw.max() > 0.2, pw  # the paper's estimator underestimates badly
        assert lan.mean() < pw.mean() / 10 and lan.max() < pw.max()


class SignSymmetric(nn.Module):
    """logits = (s (u.x)(w.x), 0) with u orthogonal to w: at x ~ 0 the input Hessian has eigenvalues ~ +-lambda."""

    def __init__(self, d: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))
        self.register_buffer("u", q[:, 0])
        self.register_buffer("w", q[:, 1])

    def forward(self, x):
        z0 = 4.0 * (x @ self.u) * (x @ self.w)
        return torch.stack([z0, torch.zeros_like(z0)], dim=1)


def test_sign_symmetric_hessian_norm_is_exact_where_power_rayleigh_fails(mx):
    model = SignSymmetric(50, seed=0)
    x = 1e-3 * torch.randn(16, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.zeros(16, dtype=torch.long)
    eigs, _ = mx.exact_spectra(model, x, y)
    exact = torch.stack([e.abs().max() for e in eigs])
    assert all(e.min() < -0.9 * e.max() for e in eigs)  # +- pairs
    lan = mx.relerr(curvature(model, x, y).hessian_norm, exact)
    pw = mx.relerr(curvature(model, x, y, method="power").hessian_norm, exact)
    assert lan.max() < 1e-6
    assert pw.mean() > 0.2


def test_grad_norm_is_exact_and_curvature_is_hessian_over_grad_plus_eps(mx):
    model = mx.make_mlp(12, 16, 4, "tanh", 2, seed=1)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0])
    _, grads = mx.exact_spectra(model, x, y)
    for eps in (1e-6, 0.5):
        s = curvature(model, x, y, eps=eps)
        assert torch.allclose(s.grad_norm, torch.stack([g.norm() for g in grads]), rtol=1e-10, atol=0)
        assert torch.equal(s.curvature, s.hessian_norm / (s.grad_norm + eps))


# ------------------------------------------------------------------------------------------ batching
def test_batched_chunked_estimate_equals_one_sample_at_a_time(mx):
    model = mx.make_cnn(2, 6, 3, "tanh", seed=4)
    x = torch.rand(7, 2, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    whole = curvature(model, x, y)
    chunked = curvature(model, x, y, chunk_size=3)
    # same start vectors whatever the chunking: equal up to rounding
    for f in CurvatureStats.FIELDS:
        assert torch.allclose(getattr(whole, f), getattr(chunked, f), rtol=1e-10, atol=0)
    single = CurvatureStats.cat([curvature(model, x[i:i + 1], y[i:i + 1]) for i in range(7)])
    for f in CurvatureStats.FIELDS:  # different start vectors, both converged
        assert torch.allclose(getattr(whole, f), getattr(single, f), rtol=1e-6, atol=0)


def test_batchnorm_model_in_train_mode_is_measured_in_eval_mode(mx):
    model = mx.make_cnn(3, 6, 4, "softplus", seed=5, batchnorm=True)
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.rand(6, 3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    reference = curvature(model.eval(), x, y)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    measured = curvature(model, x, y)
    assert model.training and bn.training
    for f in CurvatureStats.FIELDS:
        assert torch.allclose(getattr(measured, f), getattr(reference, f), rtol=1e-10, atol=0)
    # samples are independent (train-mode BN would mix them) and running stats were not updated
    alone = curvature(model, x[:1], y[:1])
    assert torch.allclose(alone.grad_norm, measured.grad_norm[:1], rtol=1e-10)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_modes_requires_grad_and_param_grads_are_restored(mx):
    model = mx.make_cnn(3, 6, 4, "softplus", seed=6, batchnorm=True).train()
    model[0].eval()  # mixed modes must survive
    params = list(model.parameters())
    grads = [torch.randn_like(p) if i % 2 == 0 else None for i, p in enumerate(params)]
    for p, g in zip(params, grads):
        p.grad = g
    params[1].requires_grad_(False)
    modes = [m.training for m in model.modules()]
    flags = [p.requires_grad for p in params]
    copies = [None if g is None else g.clone() for g in grads]
    x = torch.rand(4, 3, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    curvature(model, x, y, iters=3)
    with pytest.raises(MeasurementError):
        curvature(model, x, y + 10)  # restored on the error path too
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in params] == flags
    for p, g, c in zip(params, grads, copies):
        assert p.grad is g
        if g is not None:
            assert torch.equal(g, c)


def test_works_under_no_grad_and_leaves_input_untouched(mx):
    model = mx.make_mlp(5, 8, 3, "softplus", 1, seed=0)
    x = torch.randn(4, 5, dtype=torch.float64)
    x0 = x.clone()
    y = torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        s = curvature(model, x, y)
    assert torch.isfinite(s.curvature).all() and (s.hessian_norm > 0).all()
    assert torch.equal(x, x0) and not x.requires_grad and x.grad is None


def test_zero_gradient_and_zero_hessian_sample_gives_zero_not_nan():
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([1000.0, 0.0]))  # saturated softmax: loss, gradient and Hessian are 0
    x, y = torch.randn(3, 3), torch.zeros(3, dtype=torch.long)
    for eps in (1e-6, 0.0):
        for method in ("lanczos", "power"):
            s = curvature(model, x, y, eps=eps, method=method)
            for f in CurvatureStats.FIELDS:
                assert torch.equal(getattr(s, f), torch.zeros(3)), (f, eps, method)


def test_input_dimension_smaller_than_iters_is_exact(mx):
    model = mx.make_mlp(2, 8, 3, "tanh", 2, seed=7)
    x = torch.randn(5, 2, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    eigs, _ = mx.exact_spectra(model, x, y)
    exact = torch.stack([e.abs().max() for e in eigs])
    s = curvature(model, x, y, iters=50)
    assert mx.relerr(s.hessian_norm, exact).max() < 1e-10


def test_summary_reports_mean_and_std():
    s = CurvatureStats(curvature=torch.tensor([1.0, 3.0]), hessian_norm=torch.tensor([2.0, 2.0]),
                       grad_norm=torch.tensor([5.0]).expand(2))
    summ = s.summary()
    assert summ["curvature"] == {"mean": 2.0, "std": math.sqrt(2.0)}
    assert summ["hessian_norm"]["std"] == 0.0 and len(s) == 2


# ------------------------------------------------------------------------------------------ bad input
class TupleOut(nn.Module):
    def forward(self, x):
        return x.sum(1, keepdim=True).repeat(1, 3), x


class Flat3d(nn.Module):
    def forward(self, x):
        return x.unsqueeze(1)


class Detached(nn.Module):
    def forward(self, x):
        with torch.no_grad():
            return x[:, :3] * 2


@pytest.mark.parametrize("case, match", [
    ("x_1d", "batched"),
    ("x_int", "floating"),
    ("x_empty", "empty"),
    ("y_shape", r"shape \(N,\)"),
    ("y_onehot", r"shape \(N,\)"),
    ("y_float", "integer class labels"),
    ("y_too_big", "labels out of range.*3 classes"),
    ("y_negative", ">= 0"),
    ("x_nan", "NaN"),
    ("x_inf", "NaN or inf"),
    ("eps_negative", "eps must be >= 0"),
    ("eps_nan", "eps must be finite"),
    ("iters_zero", "iters must be >= 1"),
    ("chunk_zero", "chunk_size must be >= 1"),
    ("method", "method must be one of"),
    ("tuple_output", "logits tensor"),
    ("bad_logits_shape", r"logits of shape \(N, num_classes\)"),
    ("not_a_module", "nn.Module"),
    ("detached", "do not depend differentiably"),
])
def test_bad_input_raises_measurement_error_with_a_clear_message(case, match):
    model = nn.Sequential(nn.Linear(4, 3), nn.Softplus())
    x, y = torch.rand(5, 4), torch.tensor([0, 1, 2, 0, 1])
    kw = {}
    if case == "x_1d":
        x = x[0]
    elif case == "x_int":
        x = (x * 10).long()
    elif case == "x_empty":
        x, y = x[:0], y[:0]
    elif case == "y_shape":
        y = y[:3]
    elif case == "y_onehot":
        y = F.one_hot(y, 3)
    elif case == "y_float":
        y = y.float()
    elif case == "y_too_big":
        y = torch.tensor([0, 1, 3, 0, 1])
    elif case == "y_negative":
        y = torch.tensor([0, -1, 2, 0, 1])
    elif case == "x_nan":
        x[2, 1] = float("nan")
    elif case == "x_inf":
        x[0, 0] = float("inf")
    elif case == "eps_negative":
        kw["eps"] = -1e-3
    elif case == "eps_nan":
        kw["eps"] = float("nan")
    elif case == "iters_zero":
        kw["iters"] = 0
    elif case == "chunk_zero":
        kw["chunk_size"] = 0
    elif case == "method":
        kw["method"] = "magic"
    elif case == "tuple_output":
        model = TupleOut()
    elif case == "bad_logits_shape":
        model = Flat3d()
        x = torch.rand(5, 3)
    elif case == "not_a_module":
        model = lambda t: t  # noqa: E731
    elif case == "detached":
        model = Detached()
    with pytest.raises(MeasurementError, match=match):
        curvature(model, x, y, **kw)


def test_hessian_norm_within_1pct_through_lcnnify_centered_softplus(mx):
    """Any classifier works, including one built from lcnnify's own (double-backward capable) layers."""
    nn_mod = pytest.importorskip("lcnnify.nn")
    model = nn.Sequential(nn.Linear(30, 16), nn_mod.CenteredSoftplus(beta=4.0), nn.Linear(16, 16),
                          nn_mod.CenteredSoftplus(beta=4.0), nn.Linear(16, 4)).double().eval()
    x = torch.randn(4, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    eigs, _ = mx.exact_spectra(model, x, y)
    exact = torch.stack([e.abs().max() for e in eigs])
    assert (mx.relerr(curvature(model, x, y).hessian_norm, exact) <= 0.01).all()


def test_metrics_package_never_imports_convert():
    import ast
    import pathlib

    import lcnnify.metrics

    for path in pathlib.Path(lcnnify.metrics.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            assert not any("convert" in n for n in names), (path.name, names)
