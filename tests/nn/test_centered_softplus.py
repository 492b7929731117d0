"""Centered softplus (paper §3.3, eq. 4): accuracy against float64 references, invariants, derivatives,
output-only saving.

References are computed in float64 with formulas other than the implementation's (expm1/log1p/sinh forms,
free of cancellation), and are themselves checked against the definitions in numpy extended precision.

Tolerances (float32). Values: 4 ulp. d/dx = sigmoid(beta x) is recovered from the output y, which holds it
only to an absolute precision of about one ulp of log 2: the test allows |err| <= 4e-7 s + 2e-7 (relative
where s is not small, absolute where beta x < -6). d/dbeta: 1.2e-6 relative where beta x > -6 and 6e-6 below,
which is the accuracy that the rounded output allows (its float64 evaluation from y has errors of the same
size: ``test_beta_gradient_error_is_at_the_floor_set_by_the_rounded_output``).
"""
from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lcnnify.nn import CenteredSoftplus, centered_softplus

csp_mod = importlib.import_module("lcnnify.nn.centered_softplus")  # the module (the package exports the function)

LOG2 = math.log(2.0)

# beta log-uniform in [1e-4, 1e4]; x = 0 or +-10^[-6, 4]
betas = st.floats(-4.0, 4.0).map(lambda e: 10.0 ** e)
xs_mag = st.floats(-6.0, 4.0).map(lambda e: 10.0 ** e)
x_values = st.one_of(st.just(0.0), xs_mag, xs_mag.map(lambda v: -v))
x_lists = st.lists(x_values, min_size=1, max_size=24)
SETTINGS = settings(max_examples=40, deadline=None)

# (value rtol, slope rtol, slope atol, dbeta rtol for beta x > -6, dbeta rtol below)
TOL = {torch.float32: (4.8e-7, 4e-7, 2e-7, 1.2e-6, 6e-6),
       torch.float64: (1e-15, 1e-15, 5e-16, 2e-14, 1e-13)}


# ---------------------------------------------------------------- float64 references (not the implementation)
def ref_value(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """s0 = relu(x) + log1p(expm1(-|beta x|) / 2) / beta (float64, accurate expm1/log1p)."""
    return torch.relu(x) + torch.log1p(torch.expm1(-(x * b).abs()) / 2) / b


def ref_slope(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x * b)


def ref_q(t: torch.Tensor) -> torch.Tensor:
    """q(t) = t sigmoid(t) - log((1 + e^t)/2) = u tanh u - logcosh u (u = t/2), even in t, no cancellation:
    |u| < 1: logcosh u = log1p(2 sinh(u/2)^2); |u| >= 1: q = log 2 - log1p(e^-2|u|) - 2|u| / (e^2|u| + 1)."""
    u = (t / 2).abs()
    us, ul = u.clamp(max=1.0), u.clamp(min=1.0)
    small = us * torch.tanh(us) - torch.log1p(2 * torch.sinh(us / 2) ** 2)
    large = LOG2 - torch.log1p(torch.exp(-2 * ul)) - 2 * ul / (torch.exp(2 * ul) + 1)
    return torch.where(u < 1, small, large)


def ref_dbeta(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ref_q(x * b) / (b * b)


def test_float64_references_agree_with_the_definitions_in_extended_precision():
    t = np.concatenate([-np.logspace(-2, 1.5, 60), np.logspace(-2, 1.5, 60)]).astype(np.longdouble)
    sig = 1 / (1 + np.exp(-t))
    f = np.log((1 + np.exp(t)) / 2)
    q_def = t * sig - f  # cancellation ~ eps_ld / t^2 <= 1e-15 relative for |t| >= 1e-2
    q = ref_q(torch.tensor(t.astype(np.float64))).numpy()
    assert np.allclose(q, q_def.astype(np.float64), rtol=1e-13, atol=0)
    x = torch.tensor(t.astype(np.float64))
    b = torch.tensor(1.0, dtype=torch.float64)
    assert np.allclose(ref_value(x, b).numpy(), f.astype(np.float64), rtol=1e-14, atol=0)
    small = torch.tensor([1e-8, 1e-5, 1e-3], dtype=torch.float64)  # Taylor: q = t^2/8 - t^4/64 + ...
    assert torch.allclose(ref_q(small), small ** 2 / 8 - small ** 4 / 64, rtol=1e-12, atol=0)


# ---------------------------------------------------------------- helpers
def _eval(x_list, beta, dtype, create_graph=False):
    """values, d/dx and d/dbeta (per element) of the functional form in `dtype` (beta per element).
    create_graph=True takes the differentiable (double-backward) path of the backward."""
    x = torch.tensor(x_list, dtype=dtype, requires_grad=True)
    b = torch.full_like(x, beta).requires_grad_(True)
    y = centered_softplus(x, b)
    gx, gb = torch.autograd.grad(y.sum(), (x, b), create_graph=create_graph)
    return x.detach().double(), b.detach().double(), y.detach().double(), gx.detach().double(), \
        gb.detach().double()


def _assert_close(got, want, rtol, atol, what):
    err = (got - want).abs()
    bad = ~(err <= atol + rtol * want.abs())  # NaN is bad too
    assert not bad.any(), (f"{what}: max rel err {(err / want.abs()).max().item():.3g}, e.g. got "
                           f"{got[bad][:3].tolist()} want {want[bad][:3].tolist()}")


def _check_all(x_list, beta, dtype, create_graph):
    rv, rs, sa, rb_hi, rb_lo = TOL[dtype]
    x, b, y, gx, gb = _eval(x_list, beta, dtype, create_graph)
    _assert_close(y, ref_value(x, b), rv, 0.0, "value")
    _assert_close(gx, ref_slope(x, b), rs, sa, "d/dx")
    t = x * b
    rtol_b = torch.where(t > -6, torch.tensor(rb_hi, dtype=torch.float64), torch.tensor(rb_lo, dtype=torch.float64))
    _assert_close(gb, ref_dbeta(x, b), rtol_b, 0.0, "d/dbeta")


# ---------------------------------------------------------------- accuracy
@SETTINGS
@given(x_list=x_lists, beta=betas)
def test_value_and_first_derivatives_match_float64_reference_for_any_beta(x_list, beta):
    for dtype in (torch.float32, torch.float64):
        for create_graph in (False, True):  # in-place first-order path and differentiable path
            _check_all(x_list, beta, dtype, create_graph)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_grid_over_beta_and_x_matches_reference(dtype):
    mags = torch.logspace(-8, 4, 1201, dtype=torch.float64)
    xs = torch.cat([-mags, torch.zeros(1, dtype=torch.float64), mags]).tolist()
    for beta in (1e-4, 3e-3, 0.1, 1.0, 5.0, 37.0, 1e3, 1e4):
        _check_all(xs, beta, dtype, create_graph=False)


def test_beta_gradient_error_is_at_the_floor_set_by_the_rounded_output():
    """Evaluating q exactly (float64) from the float32 output y already has errors of the size the test
    tolerances allow: the tolerances are the information limit of output-only saving, not slack."""
    mags = torch.logspace(-3, 1.1, 800, dtype=torch.float64)
    x = torch.cat([-mags, mags]).float()
    beta = 1.0
    y = centered_softplus(x, beta).double()
    t_from_y = torch.log(2 * torch.exp(y * beta) - 1)  # beta x recovered exactly from the rounded y
    floor = ((ref_q(t_from_y) - ref_q(x.double())) / ref_q(x.double())).abs()
    assert floor[x.double() > -6].max() > TOL[torch.float32][3] / 8
    assert floor[x.double() < -6].max() > TOL[torch.float32][4] / 8


def test_fast_and_differentiable_backward_formulas_agree():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        y = torch.cat([torch.randn(4000, dtype=dtype) * s for s in (1e-6, 1e-2, 0.3, 3.0, 100.0)])
        y = y.clamp(min=-LOG2 * 0.999)
        beta = torch.tensor(1.0, dtype=dtype)
        z, e = csp_mod._slope_terms(y, beta)
        slow = csp_mod._q2_graph(z, e)
        fast = csp_mod._q2_fast(z.clone(), e)
        assert torch.allclose(fast, slow, rtol=4 * torch.finfo(dtype).eps, atol=0)


def _fwd_bwd(x, b, g):
    x = x.detach().requires_grad_(True)
    b = b.detach().requires_grad_(True)
    y = centered_softplus(x, b)
    gx, gb = torch.autograd.grad(y, (x, b), g)
    return y.detach(), gx, gb


@pytest.mark.parametrize("case", ["scalar", "per_channel", "per_element", "channels_last", "expanded_grad"])
def test_cache_sized_chunks_give_the_same_results_as_one_pass(case, monkeypatch):
    """Large CPU tensors are processed in chunks; force chunking on a small tensor and compare with the
    unchunked computation: element-wise results bit-identical where chunk boundaries fall on multiples of
    the SIMD width (as the real chunk sizes do), within 2 ulp elsewhere (torch's scalar tail loop of
    ``exp2`` differs from its vector loop in the last bit); beta gradients up to summation order."""
    torch.manual_seed(0)
    shape = (8, 4, 8, 16)
    x = torch.randn(shape) * 3
    b = torch.tensor(1.7)
    if case in ("per_channel", "channels_last"):
        b = torch.tensor([0.3, 1.0, 4.0, 20.0]).view(1, 4, 1, 1)
    if case == "per_element":
        b = torch.rand(shape) + 0.5
    if case == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape)
    if case == "expanded_grad":
        g = torch.tensor(0.7).expand(shape)
    whole = _fwd_bwd(x, b, g)
    scale = (g.abs() * LOG2 / (b * b)).sum()  # bound on the sum of |terms| of the beta gradient
    for chunk, exact in ((64, True), (5, False)):
        monkeypatch.setattr(csp_mod, "_CHUNK_PER_THREAD", chunk)
        chunks = csp_mod._Chunks(x, b)
        assert len(chunks) > 1 or case == "per_element"
        chunked = _fwd_bwd(x, b, g)
        for w, c, floor in zip(whole[:2], chunked[:2], (0.0, g.abs())):
            if exact:
                assert torch.equal(w, c)
            else:  # values: relative; slopes: also absolute (1 - e/2 is absolute-accurate, module docstring)
                assert ((w - c).abs() <= 2.5e-7 * (w.abs() + floor)).all()
        assert ((whole[2] - chunked[2]).abs() <= 1e-6 * scale).all()
        if case == "channels_last":
            assert chunked[0].is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------- invariants
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
@given(x_list=x_lists, beta=betas)
def test_float32_slope_stays_in_unit_interval_and_value_at_zero_is_zero(x_list, beta):
    x = torch.tensor(x_list + [0.0], dtype=torch.float32, requires_grad=True)
    act = CenteredSoftplus(beta)
    y = act(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert y[-1].item() == 0.0
    assert ((g >= 0) & (g <= 1)).all()
    gap = (y.detach().double() - torch.relu(x.detach().double())).abs()
    b = float(act.beta.detach())
    assert (gap <= LOG2 / b * (1 + 1e-6) + 1.2e-7 * x.detach().double().abs()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_saturated_negative_side_keeps_slope_nonnegative_for_every_beta(dtype):
    """For beta x -> -inf the output rounds to about -log2/beta, sometimes below it; the slope 1 - e^(-beta y)/2
    computed from it must still be >= 0 (and the beta-gradient finite and close to log2/beta^2)."""
    for create_graph in (False, True):
        b = torch.logspace(-2, 4, 3001, dtype=dtype).requires_grad_(True)
        x = torch.full_like(b, -1e4).requires_grad_(True)
        y = centered_softplus(x, b)  # beta x from -100 to -1e8
        gx, gb = torch.autograd.grad(y.sum(), (x, b), create_graph=create_graph)
        assert (gx >= 0).all() and (gx <= 1e-6).all()
        assert torch.allclose(gb, LOG2 / b.detach() ** 2, rtol=TOL[dtype][4], atol=0)


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


# ---------------------------------------------------------------- second derivatives
@pytest.mark.parametrize("beta", [1e-3, 0.3, 5.0, 80.0])
def test_gradcheck_and_gradgradcheck_in_float64(beta):
    torch.manual_seed(0)
    # beta x spans both branches of the beta-derivative (|w| below 0.5 and above 0.7) and the blend
    x = (torch.randn(12, dtype=torch.float64) * 4.0 / beta).requires_grad_(True)
    b = torch.tensor(beta, dtype=torch.float64, requires_grad=True)
    # at beta = 1e-3 the beta-gradients are ~1e6: finite differences with eps = 1e-6 carry ~1e-4 of rounding
    # noise, so the relative tolerance is set from that (the closed-form Hessian test is the exact check)
    rtol = 5e-3 if beta < 0.01 else 1e-3
    assert torch.autograd.gradcheck(centered_softplus, (x, b), rtol=rtol)
    assert torch.autograd.gradgradcheck(centered_softplus, (x, b), rtol=rtol)


def _analytic_hessian(x: torch.Tensor, b: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Closed forms: y_xx = b s(1-s), y_xb = x s(1-s), y_bb = x^2 s(1-s)/b - 2 q/b^3 (s = sigmoid(bx))."""
    s = torch.sigmoid(x * b)
    ss = s * (1 - s)
    return b * ss, x * ss, x * x * ss / b - 2 * ref_q(x * b) / b ** 3


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
@pytest.mark.parametrize("beta", [0.01, 1.0, 20.0])
def test_hessian_in_x_and_beta_matches_closed_form(dtype, rtol, beta):
    torch.manual_seed(1)
    x0 = torch.cat([torch.randn(6, dtype=torch.float64) * 3 / beta, torch.tensor([0.0, 0.4 / beta],
                                                                                   dtype=torch.float64)])
    xs = x0.to(dtype)

    def f(x, b):
        return centered_softplus(x, b).sum()

    for i in range(len(xs)):
        xi = xs[i:i + 1]
        H = torch.autograd.functional.hessian(f, (xi, torch.tensor(beta, dtype=dtype)))
        hxx, hxb, hbb = _analytic_hessian(xi.double(), float(torch.tensor(beta, dtype=dtype)))
        got = torch.stack([H[0][0].reshape(()), H[0][1].reshape(()), H[1][1].reshape(())]).double()
        want = torch.cat([hxx, hxb, hbb])
        scale = want.abs().max()
        assert torch.allclose(got, want, rtol=rtol, atol=rtol * scale * 1e-2), (i, got, want)


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


# ---------------------------------------------------------------- output-only saving
def test_in_place_update_of_the_input_after_the_call_does_not_change_gradients():
    torch.manual_seed(0)
    act = CenteredSoftplus(3.0)
    x0 = torch.randn(4, 5)
    leaf = x0.clone().requires_grad_(True)
    x = leaf * 1.0
    h = act(x)
    x.add_(1.0)  # h = act(x); x.add_(...) must not break (or change) backward
    h.pow(2).sum().backward()
    ref_leaf = x0.clone().requires_grad_(True)
    ref_act = CenteredSoftplus(3.0)
    ref_act(ref_leaf * 1.0).pow(2).sum().backward()
    assert torch.allclose(leaf.grad, ref_leaf.grad)
    assert torch.allclose(act.log_beta.grad, ref_act.log_beta.grad)


def test_saves_only_its_output_and_beta_for_backward():
    x = torch.randn(8, 16, requires_grad=True)
    act = CenteredSoftplus(2.0, num_channels=16)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = act(x * 1.0)
    big = [t for t in saved if t.numel() == x.numel()]
    # the multiplication x * 1.0 saves nothing tensor-sized; the activation saves its output only
    assert len(big) == 1 and big[0].data_ptr() == y.data_ptr()
    assert all(t.numel() <= 16 for t in saved if t is not big[0])


@pytest.mark.parametrize("channels", [None, 4])
def test_inplace_variant_overwrites_its_input_and_gives_the_same_values_and_gradients(channels):
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4)
    x0 = torch.randn(3, 4, 5, 5) * 2
    results = []
    for inplace in (False, True):
        act = CenteredSoftplus(1.5, num_channels=channels, inplace=inplace)
        x = x0.clone().requires_grad_(True)
        h = bn(x)
        ptr = h.data_ptr()
        y = act(h)
        assert (y.data_ptr() == ptr) == inplace
        y.pow(2).sum().backward()
        results.append((y.detach(), x.grad, act.log_beta.grad))
        bn.zero_grad()
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert "inplace=True" in repr(CenteredSoftplus(1.0, inplace=True))


def test_inplace_functional_keeps_no_extra_tensor_and_low_precision_leaves_input_untouched():
    x = torch.randn(8, 16).mul(3.0).requires_grad_(True)
    h = x * 1.0
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = centered_softplus(h, 2.0, inplace=True)
    assert y.data_ptr() == h.data_ptr()
    assert [t.data_ptr() for t in saved if t.numel() == x.numel()] == [y.data_ptr()]
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(g, torch.sigmoid(2.0 * x.detach()), rtol=1e-6, atol=2e-7)
    xb = torch.randn(10).to(torch.bfloat16)
    xb_copy = xb.clone()
    yb = centered_softplus(xb, 2.0, inplace=True)  # computed in float32: a new bfloat16 tensor
    assert torch.equal(xb, xb_copy) and yb.dtype == torch.bfloat16


# ---------------------------------------------------------------- API
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
    x = (torch.randn(*shape) * 3).requires_grad_(True)
    y = act(x)
    xm = x.detach().movedim(channel_dim, 0)
    ym = y.detach().movedim(channel_dim, 0)
    betas_f32 = act.beta.detach()
    for c in range(3):
        assert torch.allclose(ym[c], centered_softplus(xm[c], betas_f32[c]), rtol=1e-6, atol=1e-7)
    y.sum().backward()
    assert act.log_beta.grad.shape == (3,) and (act.log_beta.grad != 0).all()
    # d/dlog_beta_c = beta_c * sum over channel c of ds0/dbeta (float64 reference)
    xd = x.detach().double().movedim(channel_dim, 0)
    for c in range(3):
        bc = betas_f32[c].double()
        want = bc * ref_dbeta(xd[c], bc).sum()
        assert torch.allclose(act.log_beta.grad[c].double(), want, rtol=1e-5, atol=1e-7)
    assert "num_channels=3" in repr(act)


def test_per_channel_beta_rejects_wrong_channel_count():
    act = CenteredSoftplus(1.0, num_channels=3)
    with pytest.raises(ValueError, match="channels"):
        act(torch.randn(2, 4, 5))


@pytest.mark.slow
def test_outer_torch_compile_matches_eager_in_training():
    """A model that contains CenteredSoftplus (scalar and per-channel beta) compiled by the user: forward and
    all gradients as in eager mode (the chunked CPU path is bypassed while tracing)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), CenteredSoftplus(2.0), torch.nn.Conv2d(8, 4, 3),
                                CenteredSoftplus(3.0, num_channels=4))
    x = torch.randn(2, 3, 70, 70)

    def step(m):
        m.zero_grad()
        xr = x.clone().requires_grad_(True)
        y = m(xr)
        y.pow(2).sum().backward()
        return [y.detach(), xr.grad] + [p.grad.clone() for p in m.parameters()]

    eager = step(model)
    compiled = step(torch.compile(model))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
