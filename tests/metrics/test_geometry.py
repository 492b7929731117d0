"""lcnnify.metrics.geometry: Table 1 summary and Table 3 train-test discrepancy."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lcnnify.errors import MeasurementError
from lcnnify.metrics import CurvatureStats, curvature, evaluate_geometry, train_test_discrepancy


def data(seed: int, n: int = 10):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g)


def test_evaluate_geometry_summarises_per_sample_curvature_and_accuracy(mx):
    model = mx.make_cnn(3, 6, 4, "softplus", seed=0, batchnorm=True).train()
    x, y = data(0)
    out = evaluate_geometry(model, (x, y), batch_size=4, progress=False, return_samples=True)
    ref = curvature(model, x, y)
    for q in CurvatureStats.FIELDS:
        v = getattr(ref, q).double()
        assert out[q]["mean"] == pytest.approx(v.mean().item(), rel=1e-6)
        assert out[q]["std"] == pytest.approx(v.std().item(), rel=1e-6)
    with torch.no_grad():
        acc = (model.eval()(x).argmax(1) == y).double().mean().item()
    model.train()
    assert out["accuracy"] == pytest.approx(acc) and out["num_samples"] == 10
    assert isinstance(out["samples"], CurvatureStats) and len(out["samples"]) == 10
    assert model.training


def test_evaluate_geometry_dataloader_equals_tensor_pair_and_max_samples_truncates(mx):
    model = mx.make_cnn(3, 6, 4, "tanh", seed=1)
    x, y = data(1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    a = evaluate_geometry(model, loader, progress=False)
    b = evaluate_geometry(model, (x, y), batch_size=3, progress=False)
    assert a == b
    part = evaluate_geometry(model, loader, max_samples=4, progress=False, return_samples=True)
    assert part["num_samples"] == 4
    ref = curvature(model, x[:4], y[:4])
    assert torch.allclose(part["samples"].curvature, ref.curvature, rtol=1e-6)


def test_evaluate_geometry_shows_a_progress_bar(mx, capsys):
    model = mx.make_mlp(4, 8, 3, "tanh", 1, seed=0)
    xy = (torch.randn(6, 4, dtype=torch.float64), torch.arange(6) % 3)
    evaluate_geometry(model, xy, iters=2, batch_size=2, progress=True)
    assert "geometry" in capsys.readouterr().err
    evaluate_geometry(model, xy, iters=2, batch_size=2, progress=False)
    assert "geometry" not in capsys.readouterr().err


def test_train_test_discrepancy_is_relative_difference_of_means():
    train = {"grad_norm": {"mean": 1.0, "std": 0.1}, "hessian_norm": {"mean": 10.0, "std": 1.0},
             "curvature": {"mean": 5.0, "std": 1.0}, "accuracy": 1.0}
    test = {"grad_norm": {"mean": 4.0, "std": 0.1}, "hessian_norm": {"mean": 8.0, "std": 1.0},
            "curvature": {"mean": 5.0, "std": 2.0}, "accuracy": 0.9}
    d = train_test_discrepancy(train, test)
    assert d == {"grad_norm": 0.75, "hessian_norm": 0.25, "curvature": 0.0}
    d = train_test_discrepancy(train, test, denominator="train")
    assert d == {"grad_norm": 3.0, "hessian_norm": 0.2, "curvature": 0.0}
    zero = {"grad_norm": 0.0, "hessian_norm": 0.0, "curvature": 0.0}
    assert train_test_discrepancy(zero, zero) == zero
    assert math.isinf(train_test_discrepancy(train, zero)["grad_norm"])


def test_train_test_discrepancy_accepts_curvature_stats_and_geometry_dicts(mx):
    model = mx.make_mlp(5, 8, 3, "softplus", 1, seed=2)
    xtr, xte = torch.randn(6, 5, dtype=torch.float64), 3 * torch.randn(6, 5, dtype=torch.float64)
    y = torch.arange(6) % 3
    s_tr, s_te = curvature(model, xtr, y), curvature(model, xte, y)
    g_tr = evaluate_geometry(model, (xtr, y), progress=False)
    g_te = evaluate_geometry(model, (xte, y), progress=False)
    a, b = train_test_discrepancy(s_tr, s_te), train_test_discrepancy(g_tr, g_te)
    assert a.keys() == b.keys() == {"grad_norm", "hessian_norm", "curvature"}
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-6)
        m_tr, m_te = getattr(s_tr, k).double().mean(), getattr(s_te, k).double().mean()
        assert a[k] == pytest.approx((abs(m_te - m_tr) / m_te).item(), rel=1e-9)


@pytest.mark.parametrize("call, match", [
    (lambda m, x, y: evaluate_geometry(m, (x, y), eps=-1.0, progress=False), "eps must be >= 0"),
    (lambda m, x, y: evaluate_geometry(m, (x, y[:3]), progress=False), r"data=\(x, y\)"),
    (lambda m, x, y: evaluate_geometry(m, (x, y + 4), progress=False), "labels out of range"),
    (lambda m, x, y: evaluate_geometry(m, [], progress=False), "no samples"),
    (lambda m, x, y: evaluate_geometry(m, (x, y), max_samples=0, progress=False), "max_samples must be >= 1"),
    (lambda m, x, y: train_test_discrepancy({"grad_norm": 1.0}, {"grad_norm": 1.0}), "no 'hessian_norm'"),
    (lambda m, x, y: train_test_discrepancy(1.0, 2.0), "must be the dict"),
    (lambda m, x, y: train_test_discrepancy({}, {}, denominator="mean"), "denominator"),
])
def test_bad_geometry_input_raises_measurement_error(call, match):
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 4)).double()
    x, y = data(3)
    with pytest.raises(MeasurementError, match=match):
        call(model, x, y)
