"""Optional compiled centered-softplus kernels: where they apply, fallback when the compiler fails, and
(opt-in, slow: a real inductor compile) accuracy against float64 references.

The fast tests use a stand-in "compiler" (the identity, or one that records or fails), so they exercise the
dispatch, reshaping and fallback logic without compile time.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from lcnnify.errors import LCNNWarning
from lcnnify.nn import CenteredSoftplus, centered_softplus
from lcnnify.nn.fused_softplus import disable_fused_kernels, enable_fused_kernels, fused_kernels_enabled

csp_mod = importlib.import_module("lcnnify.nn.centered_softplus")
LOG2 = math.log(2.0)


@pytest.fixture(autouse=True)
def _eager_afterwards():
    yield
    disable_fused_kernels()


class _Recorder:
    """A stand-in compiler: returns the function itself and counts the calls of each compiled function."""

    def __init__(self):
        self.calls: dict[str, int] = {}

    def __call__(self, fn, **kwargs):
        assert kwargs.get("dynamic") is True and kwargs.get("fullgraph") is True

        def wrapped(*args):
            assert all(a.dim() <= 1 and not a.requires_grad for a in args)  # flat, detached inputs
            self.calls[fn.__name__] = self.calls.get(fn.__name__, 0) + 1
            return fn(*args)
        return wrapped


def _run(x, beta, create_graph=False, channels=None):
    act = CenteredSoftplus(beta, num_channels=channels)
    xr = x.clone().requires_grad_(True)
    y = act(xr)
    g = torch.randn_like(y)
    gx, gl = torch.autograd.grad(y, (xr, act.log_beta), g, create_graph=create_graph)
    return y.detach(), gx.detach(), gl.detach(), g


def test_identity_compiler_gives_the_eager_results_and_is_used_only_where_it_applies():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8) * 3
    torch.manual_seed(1)
    eager = _run(x, 2.5)
    rec = _Recorder()
    assert enable_fused_kernels(min_numel=0, warm_up=False, compile_fn=rec) and fused_kernels_enabled()
    torch.manual_seed(1)
    fused = _run(x, 2.5)
    assert rec.calls == {"_fwd": 1, "_bwd_xb": 1}
    assert torch.allclose(fused[0], eager[0], rtol=2.4e-7, atol=0)
    # d/dx is absolute-accurate (~1e-7 |grad|) where beta x << 0: both paths are within that of each other
    assert ((fused[1] - eager[1]).abs() <= 2.4e-7 * eager[1].abs() + 2e-7 * eager[3].abs()).all()
    assert torch.allclose(fused[2], eager[2], rtol=1e-5, atol=0)
    # not applicable: per-channel beta, float64, double backward (the backward), small tensors
    _run(x, 2.5, channels=3)
    _run(x.double(), 2.5)
    _run(x, 2.5, create_graph=True)
    assert rec.calls == {"_fwd": 2, "_bwd_xb": 1}  # only the create_graph forward used the kernel
    enable_fused_kernels(min_numel=10_000, warm_up=False, compile_fn=rec)
    _run(x, 2.5)
    assert rec.calls == {"_fwd": 2, "_bwd_xb": 1}


def test_identity_compiler_handles_frozen_beta_inplace_and_noncontiguous_grad():
    torch.manual_seed(0)
    rec = _Recorder()
    enable_fused_kernels(min_numel=0, warm_up=False, compile_fn=rec)
    x = torch.randn(5, 7) * 2
    xr = x.clone().requires_grad_(True)
    act = CenteredSoftplus(1.5).requires_grad_(False)
    act(xr).sum().backward()  # expanded (stride-0) grad, beta frozen: d/dx only
    assert rec.calls.get("_bwd_x") == 1
    assert torch.allclose(xr.grad, torch.sigmoid(1.5 * x), rtol=4e-7, atol=2e-7)
    h = x.clone()
    y = centered_softplus(h, 1.5, inplace=True)
    assert y.data_ptr() == h.data_ptr()
    assert torch.allclose(y, centered_softplus(x, 1.5), rtol=2.4e-7, atol=0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "channels_last_3d", "strided"])
def test_identity_compiler_channels_last_and_inplace_keep_layout_and_values(layout):
    """Channels-last inputs run through the kernels on their memory order (no copy), in-place activations
    through the in-place kernel (the input's storage is the output); other strides take the eager path."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 4, 3) if layout == "channels_last_3d" else torch.randn(2, 6, 5, 4)
    x = x * 3
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    elif layout == "strided":
        x = x.transpose(1, 2)
    g = torch.randn(x.shape)  # contiguous: a different layout than a channels-last y
    want = []
    for fused in (False, True):
        rec = _Recorder()
        if fused:
            enable_fused_kernels(min_numel=0, warm_up=False, compile_fn=rec)
        xr = x.clone().requires_grad_(True)
        act = CenteredSoftplus(2.0)
        y = act(xr)
        gx, gl = torch.autograd.grad(y, (xr, act.log_beta), g)
        h = x.clone()
        yi = centered_softplus(h, 2.0, inplace=True)
        assert yi.data_ptr() == h.data_ptr() and yi.stride() == x.stride()
        assert y.stride() == x.stride() and gx.stride() == x.stride()
        want.append((y.detach(), gx, gl, yi))
        if fused:
            used = layout != "strided"
            assert rec.calls == ({"_fwd": 1, "_bwd_xb": 1, "_fwd_inplace": 1} if used else {})
    (y0, gx0, gl0, yi0), (y1, gx1, gl1, yi1) = want
    assert torch.allclose(y1, y0, rtol=2.4e-7, atol=0) and torch.allclose(yi1, y0, rtol=2.4e-7, atol=0)
    assert ((gx1 - gx0).abs() <= 2.4e-7 * gx0.abs() + 2e-7 * g.abs()).all()
    assert torch.allclose(gl1, gl0, rtol=1e-5, atol=0)


def test_failing_compiler_falls_back_to_eager_with_a_warning():
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler")
        return run

    with pytest.warns(LCNNWarning, match="eager"):
        assert enable_fused_kernels(min_numel=0, compile_fn=broken) is False
    assert not fused_kernels_enabled()
    # failing only at the first real call (no warm-up): warn once, fall back, results still correct
    enable_fused_kernels(min_numel=0, warm_up=False, compile_fn=broken)
    x = torch.randn(3, 4)
    with pytest.warns(LCNNWarning, match="eager"):
        y = centered_softplus(x, 2.0)
    assert not fused_kernels_enabled()
    disable_fused_kernels()
    assert torch.equal(y, centered_softplus(x, 2.0))


@pytest.mark.slow
def test_inductor_kernels_match_float64_references():
    """Real torch.compile (inductor): values and first derivatives within the eager tolerances (x2 for the
    compiler's reordering) over beta in [1e-4, 1e4] and |x| <= 1e4."""
    if not enable_fused_kernels(min_numel=0):
        pytest.skip("no working torch.compile backend here")
    from tests.nn.test_centered_softplus import TOL, ref_dbeta, ref_slope, ref_value

    rv, rs, sa, rb_hi, rb_lo = TOL[torch.float32]
    mags = torch.logspace(-8, 4, 1201, dtype=torch.float64)
    xs = torch.cat([-mags, torch.zeros(1, dtype=torch.float64), mags])
    for beta in (1e-4, 3e-3, 0.1, 1.0, 5.0, 37.0, 1e3, 1e4):
        x = xs.float().requires_grad_(True)
        b = torch.tensor(beta, dtype=torch.float32, requires_grad=True)
        y = centered_softplus(x, b)
        gx, _ = torch.autograd.grad(y.sum(), (x, b))
        xd, bd = x.detach().double(), b.detach().double()
        assert ((y.detach().double() - ref_value(xd, bd)).abs() <= 2 * rv * ref_value(xd, bd).abs()).all()
        s = ref_slope(xd, bd)
        assert ((gx.double() - s).abs() <= 2 * (rs * s + sa)).all()
        for k in (0, 600, 1200, 1800, 2400):  # per-element beta-gradients through the scalar-beta kernel
            xk = x.detach()[k:k + 1].requires_grad_(True)
            bk = torch.tensor(beta, dtype=torch.float32, requires_grad=True)
            (gb,) = torch.autograd.grad(centered_softplus(xk, bk).sum(), bk)
            want = ref_dbeta(xk.detach().double(), bk.detach().double())
            rtol = rb_hi if float(xk.detach()) * beta > -6 else rb_lo
            assert abs(gb.double() - want).item() <= 2 * rtol * abs(want).item()
    # in place on a channels-last tensor: the in-place kernel, layout kept
    x = (torch.randn(4, 8, 6, 5) * 3).contiguous(memory_format=torch.channels_last)
    h = x.clone()
    y = centered_softplus(h, 2.0, inplace=True)
    assert y.data_ptr() == h.data_ptr() and y.is_contiguous(memory_format=torch.channels_last)
    want = ref_value(x.double(), torch.tensor(2.0, dtype=torch.float64))
    assert ((y.double() - want).abs() <= 2 * rv * want.abs()).all()
