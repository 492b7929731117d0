"""Centered softplus (paper §3.3, eq. 4): accuracy against a 50-digit reference, invariants, derivatives."""
from __future__ import annotations

import math

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lcnnify.nn import CenteredSoftplus, centered_softplus

mpmath.mp.dps = 50
LOG2 = math.log(2.0)

# beta log-uniform in [1e-4, 1e4]; x = 0 or +-10^[-6, 4]
betas = st.floats(-4.0, 4.0).map(lambda e: 10.0 ** e)
xs_mag = st.floats(-6.0, 4.0).map(lambda e: 10.0 ** e)
x_values = st.one_of(st.just(0.0), xs_mag, xs_mag.map(lambda v: -v))
x_lists = st.lists(x_values, min_size=1, max_size=24)
SETTINGS = settings(max_examples=40, deadline=None)


def ref_s0(x: float, b: float) -> float:
    x, b = mpmath.mpf(x), mpmath.mpf(b)
    return float(mpmath.log((1 + mpmath.exp(b * x)) / 2) / b)


def ref_ds0_dx(x: float, b: float) -> float:
    t = mpmath.mpf(b) * mpmath.mpf(x)
    return float(1 / (1 + mpmath.exp(-t)))


def ref_ds0_dbeta(x: float, b: float) -> float:
    x, b = mpmath.mpf(x), mpmath.mpf(b)
    t = b * x
    return float((t / (1 + mpmath.exp(-t)) - mpmath.log((1 + mpmath.exp(t)) / 2)) / b ** 2)


def _eval(x_list, beta, dtype, create_graph=False):
    """values, d/dx and d/dbeta (per element) of the functional form in `dtype` (beta per element).
    create_graph=True takes the differentiable (double-backward) path of the backward."""
    x = torch.tensor(x_list, dtype=dtype, requires_grad=True)
    b = torch.full_like(x, beta, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    b.requires_grad_(True)
    y = centered_softplus(x, b)
    gx, gb = torch.autograd.grad(y.sum(), (x, b), create_graph=create_graph)
    return y.detach(), gx.detach(), gb.detach()


def _close(got: torch.Tensor, want: list[float], rtol: float, atol: float) -> None:
    want_t = torch.tensor(want, dtype=torch.float64)
    got = got.double()
    err = (got - want_t).abs()
    bad = err > atol + rtol * want_t.abs()
    assert not bad.any(), f"max err {err.max().item()} at {got[bad][:5].tolist()} vs {want_t[bad][:5].tolist()}"


@SETTINGS
@given(x_list=x_lists, beta=betas)
def test_value_matches_50_digit_reference_for_any_beta_float32_and_float64(x_list, beta):
    for dtype, rtol in ((torch.float32, 4e-6), (torch.float64, 1e-13)):
        xq = torch.tensor(x_list, dtype=dtype).double().tolist()  # reference at the representable x
        y, _, _ = _eval(xq, beta, dtype)
        bq = float(torch.tensor(beta, dtype=dtype))
        _close(y, [ref_s0(v, bq) for v in xq], rtol=rtol, atol=0.0)


@SETTINGS
@given(x_list=x_lists, beta=betas)
def test_gradients_wrt_x_and_beta_match_reference_for_any_beta(x_list, beta):
    for dtype, rtol, atol in ((torch.float32, 2e-5, 1e-37), (torch.float64, 1e-11, 1e-300)):
        xq = torch.tensor(x_list, dtype=dtype).double().tolist()
        bq = float(torch.tensor(beta, dtype=dtype))
        want_x = [ref_ds0_dx(v, bq) for v in xq]
        want_b = [ref_ds0_dbeta(v, bq) for v in xq]
        for create_graph in (False, True):  # first-order fast path and differentiable path
            _, gx, gb = _eval(xq, beta, dtype, create_graph)
            _close(gx, want_x, rtol=rtol, atol=atol)
            _close(gb, want_b, rtol=rtol, atol=atol)


@SETTINGS
@given(x_list=x_lists, beta=betas)
def test_invariants_zero_at_origin_slope_in_unit_interval_curvature_and_relu_gap(x_list, beta):
    x = torch.tensor(x_list + [0.0], dtype=torch.float64, requires_grad=True)
    y = centered_softplus(x, beta)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    assert y[-1].item() == 0.0  # s0(0) = 0 exactly
    assert ((g >= 0) & (g <= 1)).all()  # 0 < s0' < 1 (closed in floating point)
    t = (x.detach() * beta).abs()
    assert ((g > 0) & (g < 1))[t < 30].all()  # strictly inside where representable
    assert (h.abs() <= beta / 4 * (1 + 1e-12)).all()  # |s0''| <= beta / 4
    nc = h.abs() / g.detach()
    assert (nc[g.detach() > 0] <= beta * (1 + 1e-12)).all()  # normalized curvature <= beta
    gap = (y.detach() - torch.relu(x.detach())).abs()
    rounding = 4e-16 * x.detach().abs()  # y - relu(x) is computed from two numbers of size |x|
    assert (gap <= LOG2 / beta * (1 + 1e-12) + rounding).all()  # |s0 - relu| <= log 2 / beta


@SETTINGS
@given(x_list=x_lists)
def test_tends_to_half_identity_as_beta_goes_to_zero(x_list):
    x = torch.tensor(x_list, dtype=torch.float64)
    for beta in (1e-2, 1e-3, 1e-4):
        y = centered_softplus(x, beta)
        # s0 - x/2 = logcosh(beta x / 2) / beta in [0, beta x^2 / 8]
        dev = y - x / 2
        assert (dev >= -1e-12 * x.abs()).all()
        assert (dev <= beta * x * x / 8 * (1 + 1e-9) + 1e-12 * x.abs()).all()
    x_small = x.clamp(-10, 10)
    assert torch.allclose(centered_softplus(x_small, 1e-4), x_small / 2, rtol=0, atol=2e-3)


def test_tends_to_relu_for_large_beta():
    x = torch.linspace(-3, 3, 61, dtype=torch.float64)
    assert torch.allclose(centered_softplus(x, 1e4), torch.relu(x), atol=LOG2 / 1e4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_finite_and_equals_float32_rounded(dtype):
    mags = torch.logspace(-6, 4, 41)
    x = torch.cat([-mags, torch.zeros(1), mags]).to(dtype)
    for beta in (1e-4, 1e-2, 1.0, 5.0, 1e2, 1e4):
        act = CenteredSoftplus(beta)
        xr = x.clone().requires_grad_(True)
        y = act(xr)
        assert y.dtype == dtype
        y.float().sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(xr.grad).all()
        assert torch.isfinite(act.log_beta.grad).all()
        assert y[41].item() == 0.0
        ref = act(x.float()).to(dtype)
        assert torch.equal(y.detach(), ref.detach())


def test_extreme_inputs_are_finite_in_values_and_first_and_second_derivatives():
    x = torch.tensor([-1e4, -1e2, -1.0, -1e-30, 0.0, 1e-30, 1.0, 1e2, 1e4], requires_grad=True)
    for beta in (1e-4, 1.0, 1e4):
        act = CenteredSoftplus(beta)
        y = act(x)
        gx, gb = torch.autograd.grad(y.sum(), (x, act.log_beta), create_graph=True)
        hxx, hxb = torch.autograd.grad(gx.sum(), (x, act.log_beta), create_graph=True)
        (hbb,) = torch.autograd.grad(gb, act.log_beta)
        for t in (y, gx, gb, hxx, hxb, hbb):
            assert torch.isfinite(t).all()


@pytest.mark.parametrize("beta", [1e-3, 0.3, 5.0, 80.0])
def test_gradcheck_and_gradgradcheck_in_float64(beta):
    torch.manual_seed(0)
    # x spans both branches of the beta-derivative (|beta x| below and above 2)
    x = (torch.randn(12, dtype=torch.float64) * 4.0 / beta).requires_grad_(True)
    b = torch.tensor(beta, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(centered_softplus, (x, b))
    assert torch.autograd.gradgradcheck(centered_softplus, (x, b))


def test_module_double_backward_through_log_beta_matches_functional():
    torch.manual_seed(0)
    act = CenteredSoftplus(2.0).double()
    x = torch.randn(7, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(act(x).pow(2).sum(), x, create_graph=True)
    (gl,) = torch.autograd.grad(gx.pow(2).sum(), act.log_beta)

    def f(lb):
        xx = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(centered_softplus(xx, lb.exp()).pow(2).sum(), xx, create_graph=True)
        return g.pow(2).sum()

    assert torch.autograd.gradcheck(f, (act.log_beta.detach().clone().requires_grad_(True),))
    lb = act.log_beta.detach().clone().requires_grad_(True)
    (gl_ref,) = torch.autograd.grad(f(lb), lb)
    assert torch.allclose(gl, gl_ref)


def test_beta_property_and_log_parametrization():
    act = CenteredSoftplus(5.0)
    assert act.log_beta.shape == ()
    assert math.isclose(act.beta.item(), 5.0, rel_tol=1e-6)
    assert act.beta.requires_grad
    assert "beta=5" in repr(act)
    with pytest.raises(ValueError):
        CenteredSoftplus(0.0)
    with pytest.raises(ValueError):
        CenteredSoftplus(-1.0)


@pytest.mark.parametrize("channel_dim,shape", [(1, (2, 3, 4, 5)), (-1, (2, 5, 3)), (1, (4, 3))])
def test_per_channel_beta_broadcasts_along_channel_dim(channel_dim, shape):
    torch.manual_seed(0)
    act = CenteredSoftplus(1.0, num_channels=3, channel_dim=channel_dim)
    with torch.no_grad():
        act.log_beta.copy_(torch.tensor([0.1, 1.0, 7.0]).log())
    x = torch.randn(*shape) * 3
    y = act(x)
    xm = x.movedim(channel_dim, 0)
    ym = y.movedim(channel_dim, 0)
    for c, b in enumerate((0.1, 1.0, 7.0)):
        assert torch.allclose(ym[c], centered_softplus(xm[c], b), rtol=1e-6, atol=1e-7)
    y.sum().backward()
    assert act.log_beta.grad.shape == (3,) and (act.log_beta.grad != 0).all()
    assert "num_channels=3" in repr(act)


def test_per_channel_beta_rejects_wrong_channel_count():
    act = CenteredSoftplus(1.0, num_channels=3)
    with pytest.raises(ValueError, match="channels"):
        act(torch.randn(2, 4, 5))
