"""Real spectral normalization of convolutions (paper §3.4.1, Ryu et al. 2019)."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize

from lcnnify.errors import ConversionError, ShapeChangeWarning
from lcnnify.nn import (ConvSpectralNorm, conv_operator_norm, conv_spectral_norm, find_conv_spectral_norm,
                        is_lcnn_layer, linear_spectral_norm)

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
FCONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# ---------------------------------------------------------------- helpers (test-only, not in the package)
def conv_apply(conv: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What nn.ConvNd computes (without bias) with `weight`: F.conv with the layer's padding / padding_mode."""
    f = FCONV[len(conv.kernel_size)]
    warnings.filterwarnings("ignore", message="Using padding='same'")  # torch's note on even kernels
    if conv.padding_mode != "zeros":
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
        return f(x, weight, None, conv.stride, 0, conv.dilation, conv.groups)
    return f(x, weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def conv_operator_matrix(conv: nn.Module, input_shape, weight: torch.Tensor) -> torch.Tensor:
    """Dense matrix of x -> conv(x) (no bias) on inputs of shape input_shape: push an identity basis through."""
    n = math.prod(input_shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *input_shape)
    with torch.no_grad():
        out = conv_apply(conv, basis, weight.detach().double())
    return out.reshape(n, -1).t()


def top_singular_value(m: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(m, 2).item()


@st.composite
def conv_configs(draw):
    nd = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 1, 2]))
    cin = groups * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 3))
    kmax = {1: 5, 2: 4, 3: 3}[nd]
    kernel = tuple(draw(st.integers(1, kmax)) for _ in range(nd))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(nd))
    padding_kind = draw(st.sampled_from(["int", "int", "same", "valid"]))
    if padding_kind == "same":
        stride = (1,) * nd
        padding = "same"
    else:
        stride = tuple(draw(st.integers(1, 3)) for _ in range(nd))
        padding = "valid" if padding_kind == "valid" else tuple(draw(st.integers(0, 2)) for _ in range(nd))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    smax = {1: 16, 2: 7, 3: 4}[nd]
    spatial = tuple(draw(st.integers(2, smax)) for _ in range(nd))
    conv = CONV[nd](cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                    padding_mode=mode, bias=draw(st.booleans()))
    # validity: reflect needs pad < size, circular pad <= size; non-empty output
    rp = conv._reversed_padding_repeated_twice
    pads = [(rp[2 * (nd - 1 - i)], rp[2 * (nd - 1 - i) + 1]) for i in range(nd)]
    for (l, r), s in zip(pads, spatial):
        if mode == "reflect":
            assume(max(l, r) < s)
        if mode == "circular":
            assume(max(l, r) <= s)
    for (l, r), s, d, k in zip(pads, spatial, dilation, kernel):
        assume(s + l + r - d * (k - 1) >= 1)
    assume(cin * math.prod(spatial) <= 200)
    return conv, (cin, *spatial)


SETTINGS = settings(max_examples=50, deadline=None)


# ---------------------------------------------------------------- operator norm and adjoint
@SETTINGS
@given(cfg=conv_configs(), lazy=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_conv_operator_norm_is_one_after_warmup_for_any_configuration(cfg, lazy, seed):
    conv, shape = cfg
    # a configuration whose outputs only read padding is the zero operator: nothing to normalize
    assume(top_singular_value(conv_operator_matrix(conv, shape, conv.weight)) > 1e-6)
    torch.manual_seed(seed)
    if lazy:
        conv_spectral_norm(conv)
        with torch.no_grad():
            conv(torch.randn(2, *shape))  # learns the shape, warms up, then one training iteration
    else:
        conv_spectral_norm(conv, input_shape=shape)
    assert find_conv_spectral_norm(conv).input_shape == shape
    conv.eval()
    s = top_singular_value(conv_operator_matrix(conv, shape, conv.weight))
    # sigma is estimated from below, so the normalized norm is >= 1 (up to float32 rounding); DESIGN §2: 1e-3
    assert 1 - 1e-4 <= s <= 1 + 1e-3, s
    # and the same holds with the estimate the layer keeps in training mode
    conv.train()
    s_train = top_singular_value(conv_operator_matrix(conv, shape, conv.weight))
    assert 1 - 1e-4 <= s_train <= 1 + 1e-3, s_train


@SETTINGS
@given(cfg=conv_configs(), seed=st.integers(0, 2 ** 16))
def test_conv_adjoint_is_exact_and_forward_is_the_layer_itself(cfg, seed):
    conv, shape = cfg
    conv = conv.double()
    torch.manual_seed(seed)
    conv_spectral_norm(conv, input_shape=shape, warmup_iterations=0)
    sn = find_conv_spectral_norm(conv)
    op = sn._op
    w = conv.parametrizations.weight.original.detach()
    v = torch.randn(1, *shape, dtype=torch.float64)
    av = op.forward(v, w)
    assert torch.allclose(av, conv_apply(conv, v, w), rtol=0, atol=1e-12)  # A is the conv the layer applies
    u = torch.randn_like(av)
    atu = op.adjoint(u, w)
    assert atu.shape == v.shape
    lhs, rhs = (av * u).sum().item(), (v * atu).sum().item()
    scale = av.norm().item() * u.norm().item() + 1e-300
    assert abs(lhs - rhs) <= 1e-10 * scale, (lhs, rhs)
    # adjoint equals the transpose of the dense operator matrix
    m = conv_operator_matrix(conv, shape, w)
    assert torch.allclose(atu.reshape(-1), m.t() @ u.reshape(-1), rtol=0, atol=1e-10 * (1 + u.norm().item()))


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_sigma_matches_dense_norm_of_raw_weight(mode):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, padding_mode=mode, groups=1)
    raw = conv.weight.detach().clone()
    conv_spectral_norm(conv, input_shape=(3, 8, 9))
    true = top_singular_value(conv_operator_matrix(conv, (3, 8, 9), raw))
    sigma = find_conv_spectral_norm(conv).sigma.item()
    assert true * (1 - 1e-4) <= sigma <= true * (1 + 1e-5)
    assert conv_operator_norm(conv).item() == pytest.approx(1.0, abs=2e-3)


def test_warmup_reaches_1e4_on_a_wide_spectrum_where_power_iteration_does_not():
    # a near-continuum at the top of the spectrum (long 1d input): 15 power iterations stay ~3 % below ||A||;
    # the adaptive Lanczos warm-up gets within 1e-4
    torch.manual_seed(0)
    conv = nn.Conv1d(4, 4, 5, padding=2)
    raw = conv.weight.detach().clone()
    true = top_singular_value(conv_operator_matrix(conv, (4, 64), raw))
    conv_spectral_norm(conv, input_shape=(4, 64))
    sn = find_conv_spectral_norm(conv)
    err = 1 - sn.sigma.item() / true
    assert -1e-5 <= err <= 1e-4
    v = torch.randn(1, 4, 64)
    for _ in range(15):
        v = sn._op.adjoint(sn._op.forward(v, raw), raw)
        v = v / v.norm()
    assert 1 - sn._op.forward(v, raw).norm().item() / true > 1e-2


# ---------------------------------------------------------------- state, modes, shapes
def _trained_conv(seed=0, shape=(3, 8, 8)):
    torch.manual_seed(seed)
    conv = conv_spectral_norm(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    for _ in range(3):
        conv.zero_grad()
        conv(torch.randn(2, *shape)).square().mean().backward()
        with torch.no_grad():
            for p in conv.parameters():
                p -= 0.1 * p.grad
    return conv


def test_state_dict_round_trip_into_fresh_lazy_conv():
    conv = _trained_conv()
    sd = conv.state_dict()
    assert sd["parametrizations.weight.0.v"].shape == (1, 3, 8, 8)
    assert sd["parametrizations.weight.0.u"].shape == (1, 4, 8, 8)
    torch.manual_seed(123)
    fresh = conv_spectral_norm(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    assert find_conv_spectral_norm(fresh).input_shape is None
    fresh.load_state_dict(sd, strict=True)
    sn = find_conv_spectral_norm(fresh)
    assert sn.input_shape == (3, 8, 8)
    conv.eval(), fresh.eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShapeChangeWarning)
        assert torch.equal(conv(x), fresh(x))
    assert torch.equal(sn.v, find_conv_spectral_norm(conv).v)
    # and a never-run (still lazy) checkpoint loads into another lazy layer
    lazy_sd = conv_spectral_norm(nn.Conv2d(3, 4, 3)).state_dict()
    other = conv_spectral_norm(nn.Conv2d(3, 4, 3))
    other.load_state_dict(lazy_sd)
    assert find_conv_spectral_norm(other).input_shape is None


def test_remove_parametrizations_bakes_normalized_weight():
    conv = _trained_conv().eval()
    w = conv.weight.detach().clone()
    x = torch.randn(2, 3, 8, 8)
    y = conv(x)
    parametrize.remove_parametrizations(conv, "weight")
    assert type(conv) is nn.Conv2d and not is_lcnn_layer(conv)
    assert torch.equal(conv.weight.detach(), w)
    assert torch.allclose(conv(x), y)
    conv(torch.randn(1, 3, 5, 5))  # the left-over pre-hook is a no-op


def test_new_input_shape_reinitializes_and_warns_once():
    torch.manual_seed(0)
    conv = conv_spectral_norm(nn.Conv2d(2, 3, 3, stride=2, padding=1))
    sn = find_conv_spectral_norm(conv)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShapeChangeWarning)
        conv(torch.randn(1, 2, 6, 6))  # the first shape is learned silently
    assert sn.input_shape == (2, 6, 6) and sn.v.shape == (1, 2, 6, 6) and sn.u.shape == (1, 3, 3, 3)
    conv.eval()  # re-initialisation happens in any mode
    with pytest.warns(ShapeChangeWarning):
        conv(torch.randn(1, 2, 10, 7))
    assert sn.input_shape == (2, 10, 7) and sn.v.shape == (1, 2, 10, 7) and sn.u.shape == (1, 3, 5, 4)
    s = top_singular_value(conv_operator_matrix(conv, (2, 10, 7), conv.weight))
    assert 1 - 1e-4 <= s <= 1 + 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error", ShapeChangeWarning)
        conv(torch.randn(1, 2, 5, 5))  # warned once per layer
        conv(torch.randn(2, 5, 5))  # unbatched input: shape (C, H, W)
    assert sn.input_shape == (2, 5, 5)


def test_eval_mode_does_not_change_u_v_and_training_mode_does():
    conv = _trained_conv()
    sn = find_conv_spectral_norm(conv)
    u, v = sn.u.clone(), sn.v.clone()
    conv.eval()
    for _ in range(3):
        conv(torch.randn(2, 3, 8, 8))
    assert torch.equal(sn.u, u) and torch.equal(sn.v, v)
    conv.train()
    conv(torch.randn(2, 3, 8, 8))
    assert not torch.equal(sn.v, v)


def test_gradient_flows_to_raw_weight_through_sigma():
    torch.manual_seed(0)
    conv = conv_spectral_norm(nn.Conv2d(2, 3, 3, padding=1).double(), input_shape=(2, 5, 5)).eval()
    sn = find_conv_spectral_norm(conv)
    raw = conv.parametrizations.weight.original
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64)
    conv(x).square().sum().backward()
    g = raw.grad.clone()
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    # reference: W / ||A_W v|| with the converged v of eval mode, sigma differentiated (Miyato)
    w = raw.detach().clone().requires_grad_(True)
    wn = w / conv_apply(conv, sn._converged.v, w).norm()
    F.conv2d(x, wn, conv.bias, padding=1).square().sum().backward()
    assert torch.allclose(g, w.grad, rtol=1e-10, atol=1e-12)
    # training mode: one power iteration, then sigma = ||A_W v|| with the new v (stored afterwards), differentiated
    conv.train()
    raw.grad = None
    conv(x).square().sum().backward()
    w = raw.detach().clone().requires_grad_(True)
    wn = w / conv_apply(conv, sn.v, w).norm()
    F.conv2d(x, wn, conv.bias, padding=1).square().sum().backward()
    assert torch.allclose(raw.grad, w.grad, rtol=1e-10, atol=1e-12)


def test_eval_graph_survives_a_later_training_forward():
    conv = conv_spectral_norm(nn.Conv2d(2, 3, 3), input_shape=(2, 6, 6)).eval()
    y = conv(torch.randn(1, 2, 6, 6)).sum()
    conv.train()
    conv(torch.randn(1, 2, 6, 6))  # updates u, v in place
    y.backward()  # the eval-mode graph must not depend on the (modified) buffers
    assert torch.isfinite(conv.parametrizations.weight.original.grad).all()


def test_power_iteration_runs_in_float32_under_autocast():
    torch.manual_seed(0)
    conv = conv_spectral_norm(nn.Conv2d(3, 4, 3, padding=1), input_shape=(3, 8, 8))
    sn = find_conv_spectral_norm(conv)
    conv.eval()
    w_ref = conv.weight.detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w = conv.weight
        y = conv(torch.randn(1, 3, 8, 8))
    assert w.dtype == torch.float32 and torch.equal(w, w_ref)
    assert y.dtype == torch.bfloat16
    assert sn.u.dtype == sn.v.dtype == torch.float32


def test_deepcopy_keeps_independent_state():
    conv = _trained_conv()
    clone = copy.deepcopy(conv)
    with pytest.warns(ShapeChangeWarning):
        clone(torch.randn(1, 3, 6, 6))
    assert find_conv_spectral_norm(clone).input_shape == (3, 6, 6)
    assert find_conv_spectral_norm(conv).input_shape == (3, 8, 8)


def test_refuses_non_convs_and_double_registration():
    with pytest.raises(ConversionError):
        conv_spectral_norm(nn.Linear(3, 4))
    with pytest.raises(ConversionError):
        conv_spectral_norm(nn.ConvTranspose2d(3, 4, 3))
    conv = conv_spectral_norm(nn.Conv2d(3, 4, 3))
    with pytest.raises(ConversionError, match="already"):
        conv_spectral_norm(conv)
    with pytest.raises(ValueError):
        conv_spectral_norm(nn.Conv2d(3, 4, 3), input_shape=(5, 8, 8))  # wrong channel count


def test_linear_spectral_norm_is_exact_and_detected():
    torch.manual_seed(0)
    lin = linear_spectral_norm(nn.Linear(7, 5))
    assert torch.linalg.matrix_norm(lin.weight.detach(), 2).item() == pytest.approx(1.0, abs=1e-3)
    assert is_lcnn_layer(lin)
    assert is_lcnn_layer(conv_spectral_norm(nn.Conv1d(2, 2, 3)))
    assert not is_lcnn_layer(nn.Conv1d(2, 2, 3)) and not is_lcnn_layer(nn.Linear(2, 2))
    with pytest.raises(ConversionError):
        linear_spectral_norm(lin)
    assert isinstance(lin.parametrizations.weight[0], nn.Module)
    assert not isinstance(lin.parametrizations.weight[0], ConvSpectralNorm)


def test_eval_cache_follows_weight_updates_and_checkpoint_loads():
    """Inference caches W / sigma; an in-place weight update or a loaded state must invalidate it."""
    from lcnnify.nn import conv_spectral_norm

    torch.manual_seed(0)
    conv = conv_spectral_norm(torch.nn.Conv2d(2, 3, 3, padding=1), input_shape=(2, 6, 6)).eval()
    x = torch.randn(1, 2, 6, 6)
    with torch.no_grad():
        y0 = conv(x)
        assert torch.equal(conv(x), y0)  # served from the cache
        conv.parametrizations.weight.original.mul_(-1.0)  # in-place change of the raw weight
        torch.testing.assert_close(conv(x) - conv.bias.view(1, -1, 1, 1), -(y0 - conv.bias.view(1, -1, 1, 1)))
        other = conv_spectral_norm(torch.nn.Conv2d(2, 3, 3, padding=1), input_shape=(2, 6, 6)).eval()
        other.load_state_dict(conv.state_dict())
        torch.testing.assert_close(other(x), conv(x))
        conv.load_state_dict({k: v * (2.0 if k.endswith("original") else 1.0) for k, v in conv.state_dict().items()})
        torch.testing.assert_close(conv(x), other(x) - other.bias.view(1, -1, 1, 1) + conv.bias.view(1, -1, 1, 1))


# ---------------------------------------------------------------- zero and degenerate weights
from lcnnify.nn import DEFAULT_MIN_SIGMA, LinearSpectralNorm, find_spectral_norm  # noqa: E402


def _unit(t: torch.Tensor) -> float:
    return t.double().norm().item()


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_zero_weight_is_finite_with_the_plain_gradient_and_recovers_normalization(kind):
    torch.manual_seed(0)
    if kind == "conv":
        layer, shape = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (3, 6, 6)
        nn.init.zeros_(layer.weight)
        conv_spectral_norm(layer, input_shape=shape)
        dense = lambda w: conv_operator_matrix(layer, shape, w)  # noqa: E731
        apply = lambda x, w: conv_apply(layer, x, w) + layer.bias.view(1, -1, 1, 1)  # noqa: E731
    else:
        layer, shape = nn.Linear(5, 4), (5,)
        nn.init.zeros_(layer.weight)
        linear_spectral_norm(layer)
        dense = lambda w: w.detach().double()  # noqa: E731
        apply = lambda x, w: F.linear(x, w, layer.bias)  # noqa: E731
    sn = find_spectral_norm(layer)
    raw = layer.parametrizations.weight.original
    x = torch.randn(2, *shape)
    for training in (True, False):
        layer.train(training)
        raw.grad = None
        y = layer(x)
        assert torch.equal(y, apply(x, torch.zeros_like(raw)))  # W = 0 -> output = bias, exactly
        y.square().sum().backward()
        # below min_sigma the layer is W / min_sigma: gradient = (gradient w.r.t. the normalized weight) / min_sigma
        w0 = torch.zeros_like(raw, requires_grad=True)
        apply(x, w0).square().sum().backward()
        torch.testing.assert_close(raw.grad, w0.grad / DEFAULT_MIN_SIGMA)
        assert abs(_unit(sn.u) - 1) < 1e-6 and abs(_unit(sn.v) - 1) < 1e-6  # never a collapsed (zero) vector
    # the weight becomes non-zero (an optimizer step): normalization recovers at once in training and in eval
    with torch.no_grad():
        raw.copy_(torch.randn_like(raw))
    layer.train()
    for _ in range(30):
        layer(x)
    s_train = top_singular_value(dense(layer.weight))
    assert 0.9 <= s_train <= 1 + 1e-3, s_train
    layer.eval()
    assert top_singular_value(dense(layer.weight)) == pytest.approx(1.0, abs=1e-3)


@settings(max_examples=30, deadline=None)
@given(log_scale=st.one_of(st.just(None), st.floats(-30, 6)), seed=st.integers(0, 2 ** 16),
       training=st.booleans())
def test_any_weight_scale_is_finite_and_normalized_down_to_min_sigma(log_scale, seed, training):
    """W * s for s in {0} U [1e-30, 1e6]: finite values and gradients; eval operator norm exactly
    min(1, sigma / min_sigma) (the layer is scale invariant above min_sigma, linear below)."""
    torch.manual_seed(seed)
    conv, shape = nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 7, 7)
    base = conv.weight.detach().clone()
    scale = 0.0 if log_scale is None else 10.0 ** log_scale
    with torch.no_grad():
        conv.weight.mul_(scale)
    true = top_singular_value(conv_operator_matrix(conv, shape, conv.weight))
    conv_spectral_norm(conv, input_shape=shape).train(training)
    raw = conv.parametrizations.weight.original
    x = torch.randn(2, *shape)
    y = conv(x)
    y.square().sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(raw.grad).all()
    assert raw.grad.abs().max().item() <= 1e4 * (1 + y.abs().max().item()) ** 2 * 50  # O(1 / min_sigma)
    conv.eval()
    s = top_singular_value(conv_operator_matrix(conv, shape, conv.weight))
    expected = min(1.0, true / DEFAULT_MIN_SIGMA)
    assert s == pytest.approx(expected, rel=1e-3, abs=1e-30), (s, expected, true)
    # and the raw weight's direction is what is applied (scale invariance)
    if true >= DEFAULT_MIN_SIGMA:
        torch.testing.assert_close(conv.weight / conv.weight.norm(), base / base.norm())


# ---------------------------------------------------------------- inference_mode
def test_lazy_first_forward_under_inference_mode_then_training():
    torch.manual_seed(0)
    conv = conv_spectral_norm(nn.Conv2d(2, 3, 3, padding=1))
    lin = linear_spectral_norm(nn.Linear(3 * 5 * 5, 4))
    model = nn.Sequential(conv, nn.Flatten(), lin).eval()
    x = torch.randn(2, 2, 5, 5)
    with torch.inference_mode():
        y_inf = model(x)  # learns the conv's shape, warms up, converges both layers (eval)
    sn = find_conv_spectral_norm(conv)
    for t in (sn.u, sn.v, find_spectral_norm(lin).u, find_spectral_norm(lin).v):
        assert not t.is_inference()
    torch.testing.assert_close(model(x), y_inf)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_new_resolution_under_inference_mode_then_training():
    torch.manual_seed(0)
    conv = conv_spectral_norm(nn.Conv2d(2, 3, 3, padding=1), input_shape=(2, 6, 6)).eval()
    sn = find_conv_spectral_norm(conv)
    with torch.inference_mode(), pytest.warns(ShapeChangeWarning):
        conv(torch.randn(1, 2, 9, 9))
    assert sn.input_shape == (2, 9, 9) and not sn.v.is_inference() and not sn.u.is_inference()
    assert top_singular_value(conv_operator_matrix(conv, (2, 9, 9), conv.weight)) == pytest.approx(1, abs=1e-3)
    conv.train()
    conv(torch.randn(2, 2, 9, 9)).sum().backward()  # power iteration updates u, v in place: normal tensors
    assert torch.isfinite(conv.parametrizations.weight.original.grad).all()


# ---------------------------------------------------------------- eval: converged, never stale
def _lagging(layer, x, steps=6, lr=0.6):
    """Large random weight moves in training mode: the 1-iteration estimate falls behind the weights."""
    raw = layer.parametrizations.weight.original
    layer.train()
    for _ in range(steps):
        with torch.no_grad():
            raw.add_(lr * raw.abs().mean() * torch.randn_like(raw))
        layer(x)


@settings(max_examples=30, deadline=None)
@given(cfg=conv_configs(), seed=st.integers(0, 2 ** 16))
def test_eval_operator_norm_is_converged_after_the_weights_moved(cfg, seed):
    conv, shape = cfg
    torch.manual_seed(seed)
    assume(top_singular_value(conv_operator_matrix(conv, shape, conv.weight)) > 1e-3)
    conv_spectral_norm(conv, input_shape=shape)
    _lagging(conv, torch.randn(2, *shape))
    # the random walk can end near W = 0 (a one-weight conv): below min_sigma the layer is W / min_sigma by design
    assume(top_singular_value(conv_operator_matrix(conv, shape, conv.parametrizations.weight.original)) > 1e-3)
    sn = find_conv_spectral_norm(conv)
    u, v = sn.u.clone(), sn.v.clone()
    conv.eval()
    s = top_singular_value(conv_operator_matrix(conv, shape, conv.weight))
    assert 1 - 1e-4 <= s <= 1 + 1e-3, s
    # the converged estimate is kept apart: evaluating never changes the training iteration's state
    assert torch.equal(sn.u, u) and torch.equal(sn.v, v)


@pytest.mark.parametrize("shape", [(7, 5), (64, 300), (10, 1)])
def test_linear_eval_norm_is_converged_after_the_weights_moved(shape):
    torch.manual_seed(0)
    lin = linear_spectral_norm(nn.Linear(shape[1], shape[0]))
    assert torch.linalg.matrix_norm(lin.weight.detach(), 2).item() == pytest.approx(1.0, abs=1e-3)
    _lagging(lin, torch.randn(4, shape[1]))
    lin.eval()
    assert torch.linalg.matrix_norm(lin.weight.detach().double(), 2).item() == pytest.approx(1.0, abs=1e-3)
    sigma = torch.linalg.matrix_norm(lin.parametrizations.weight.original.detach().double(), 2).item()
    assert find_spectral_norm(lin).sigma.item() == pytest.approx(sigma, rel=1e-3)


def test_eval_is_not_stale_after_data_mul_and_copy():
    """``p.data`` updates (EMA, momentum encoders) do not bump ``p._version``: the eval cache must see them."""
    torch.manual_seed(0)
    conv = conv_spectral_norm(nn.Conv2d(2, 3, 3, padding=1), input_shape=(2, 6, 6)).eval()
    sn = find_conv_spectral_norm(conv)
    raw = conv.parametrizations.weight.original
    x = torch.randn(1, 2, 6, 6)

    def reference():
        w = raw.detach()
        return conv_apply(conv, x, w / top_singular_value(conv_operator_matrix(conv, (2, 6, 6), w)))

    def check():
        with torch.no_grad():
            y = conv(x) - conv.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(y, reference(), rtol=1e-3, atol=1e-5)
        true = top_singular_value(conv_operator_matrix(conv, (2, 6, 6), raw))
        assert sn.sigma.item() == pytest.approx(true, rel=1e-3)

    check()
    sigma0 = sn.sigma.item()
    raw.data.mul_(0.5)  # scale: same normalized weight, half the sigma
    check()
    assert sn.sigma.item() == pytest.approx(sigma0 / 2, rel=1e-3)
    raw.data[:1].mul_(-3.0)  # a change of direction
    check()
    raw.data.copy_(torch.randn_like(raw))
    check()


def test_custom_gradient_equals_autograd_of_w_over_uTAv_first_and_second_order():
    """Miyato: sigma = <u, A_W v> with u, v held fixed; the Function's backward (and double backward) must equal
    plain autograd of W / <u, A_W v>."""
    torch.manual_seed(0)
    conv = conv_spectral_norm(nn.Conv2d(2, 3, 3, stride=2, padding=1, padding_mode="circular").double(),
                              input_shape=(2, 7, 7))
    sn = find_conv_spectral_norm(conv)
    raw = conv.parametrizations.weight.original
    x = torch.randn(2, 2, 7, 7, dtype=torch.float64)
    for training in (True, False):
        conv.train(training)
        y = conv(x)
        u, v = (sn.u, sn.v) if training else (sn._converged.u, sn._converged.v)
        (g,) = torch.autograd.grad(y.square().sum(), raw, create_graph=True)
        (h,) = torch.autograd.grad(g.square().sum(), raw)
        w = raw.detach().clone().requires_grad_(True)
        wn = w / (u * conv_apply(conv, v, w)).sum()
        y_ref = F.conv2d(F.pad(x, conv._reversed_padding_repeated_twice, mode="circular"), wn, conv.bias, stride=2)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
        (g_ref,) = torch.autograd.grad(y_ref.square().sum(), w, create_graph=True)
        (h_ref,) = torch.autograd.grad(g_ref.square().sum(), w)
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(h, h_ref, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- linear layers: our parametrization
def test_linear_spectral_norm_loads_a_torch_spectral_norm_checkpoint():
    torch.manual_seed(0)
    old = torch.nn.utils.parametrizations.spectral_norm(nn.Linear(6, 4))
    sd = old.state_dict()
    assert "parametrizations.weight.0._u" in sd
    new = linear_spectral_norm(nn.Linear(6, 4))
    new.load_state_dict(sd)
    new.eval()
    w = sd["parametrizations.weight.original"]
    torch.testing.assert_close(new.weight, w / torch.linalg.matrix_norm(w, 2), rtol=1e-4, atol=1e-6)
    assert isinstance(find_spectral_norm(new), LinearSpectralNorm) and is_lcnn_layer(new)


# ---------------------------------------------------------------- NF-nets (zero-initialised gains)
def _skipinit_net():
    from timm.layers import ScaledStdConv2d

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = ScaledStdConv2d(4, 4, 3, padding=1)
            self.conv2 = ScaledStdConv2d(4, 4, 3, padding=1, gain_init=0.0)  # NF-ResNet: zero gain, last conv
            self.act = nn.ReLU()

        def forward(self, x):
            return x + self.conv2(self.act(self.conv1(x)))

    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), Block(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))


def _train_steps(model, x, y, steps, lr=0.1):
    import lcnnify

    opt = torch.optim.SGD(lcnnify.param_groups(model, 5e-4), lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + model.curvature_penalty()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_zero_gain_weight_standardized_block_trains():
    import lcnnify

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lcnnify.lcnnify(_skipinit_net(), example_inputs=torch.randn(1, 1, 8, 8))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    losses = _train_steps(model, x, y, 5)
    assert all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    conv2 = model.get_submodule("1.conv2")
    gain = conv2.parametrizations.weight[0].gain
    assert gain.abs().max() > 0  # the zero gain moved: the branch is on, and normalized
    model.eval()
    s = top_singular_value(conv_operator_matrix(conv2, (4, 8, 8), conv2.weight))
    assert s == pytest.approx(1.0, abs=1e-3)


@pytest.mark.slow
def test_nf_resnet26_trains_after_conversion():
    import lcnnify
    import timm

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lcnnify.lcnnify(timm.create_model("nf_resnet26", num_classes=10),
                                example_inputs=torch.randn(1, 3, 32, 32))
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    losses = _train_steps(model, x, y, 4)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_torchvision_resnet18_eval_norms_are_converged_after_sgd_steps():
    import lcnnify
    import torchvision

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lcnnify.lcnnify(torchvision.models.resnet18(num_classes=10), example_inputs=torch.randn(1, 3, 32, 32))
    _train_steps(model, torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)), 5)
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    for name, m in model.named_modules():
        sn = find_spectral_norm(m)
        if sn is None:
            continue
        if find_conv_spectral_norm(m) is not None:
            s = conv_operator_norm(m, n_iterations=300, generator=torch.Generator().manual_seed(1)).item()
        else:
            s = torch.linalg.matrix_norm(m.weight.detach().double(), 2).item()
        assert s == pytest.approx(1.0, abs=1e-3), (name, s)


@pytest.mark.slow
def test_torch_compile_training_and_eval_match_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.Flatten(),
                          nn.Linear(36, 3))
    conv_spectral_norm(model[0], input_shape=(2, 8, 8))
    conv_spectral_norm(model[2], input_shape=(4, 8, 8))
    linear_spectral_norm(model[4])
    ref = copy.deepcopy(model)
    compiled = torch.compile(model)
    x = torch.randn(4, 2, 8, 8)
    for m in (ref, compiled):
        m(x).square().sum().backward()
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    ref.eval(), compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref(x), rtol=1e-4, atol=1e-6)


def test_eval_norm_of_a_grouped_conv_is_the_largest_over_groups_even_when_two_groups_are_close():
    """A grouped conv is block diagonal; a Lanczos run on the whole operator can stop on another group's top
    eigenpair when two groups' norms are 0.3% apart (timm legacy_xception read 1.0029). Checked against an
    independent 256-step Lanczos on the conv's own forward."""
    from lcnnify.testing.zoo import lanczos_operator_norm

    torch.manual_seed(0)
    conv = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
    conv_spectral_norm(conv, input_shape=(32, 15, 15))
    x = torch.rand(2, 32, 15, 15)
    conv.train()
    for _ in range(50):
        conv(x)
    sn = find_conv_spectral_norm(conv)
    block = sn.v.reshape(32, -1).norm(dim=1)  # where the training iteration put its weight
    with torch.no_grad():
        w = conv.parametrizations.weight.original
        w[int(block.argmin())] = w[int(block.argmax())] * 1.003
    conv.eval()
    conv(x)
    assert abs(float(lanczos_operator_norm(conv, (32, 15, 15), steps=256)) - 1.0) <= 1e-4


# ---------------------------------------------------------------- the training step against dense references
@SETTINGS
@given(cfg=conv_configs(), seed=st.integers(0, 2 ** 16))
def test_training_step_update_rule_and_first_order_gradient_match_dense_reference(cfg, seed):
    """One training forward: v <- N(M^T u), u <- N(M v), sigma = ||M v|| with the dense operator matrix M of the
    raw weight; the (first-order, no create_graph) gradient equals autograd of W / <u, A_W v> with the new u, v."""
    conv, shape = cfg
    conv = conv.double()
    m = conv_operator_matrix(conv, shape, conv.weight)
    assume(top_singular_value(m) > 1e-6)
    torch.manual_seed(seed)
    conv_spectral_norm(conv, input_shape=shape, warmup_iterations=0)
    sn = find_conv_spectral_norm(conv)
    raw = conv.parametrizations.weight.original
    with torch.no_grad():  # unrelated unit vectors: the step must use u (not v) first, then the new v
        for t in (sn.u, sn.v):
            t.copy_(torch.randn_like(t)).div_(t.norm())
    u0 = sn.u.reshape(-1).clone()
    conv.train()
    x = torch.randn(2, *shape, dtype=torch.float64)
    out = conv(x)
    r = torch.randn_like(out)
    (g,) = torch.autograd.grad((out * r).sum(), raw)
    v1 = m.t() @ u0
    v1 = v1 / v1.norm()
    av = m @ v1
    torch.testing.assert_close(sn.v.reshape(-1), v1, rtol=0, atol=1e-10)
    torch.testing.assert_close(sn.u.reshape(-1), av / av.norm(), rtol=0, atol=1e-10)
    torch.testing.assert_close(sn.sigma, av.norm(), rtol=1e-12, atol=0)
    w = raw.detach().clone().requires_grad_(True)
    wn = w / (sn.u * conv_apply(conv, sn.v, w)).sum()
    bias = 0 if conv.bias is None else conv.bias.detach().view(1, -1, *([1] * (x.dim() - 2)))
    (g_ref,) = torch.autograd.grad(((conv_apply(conv, x, wn) + bias) * r).sum(), w)
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-12)


@SETTINGS
@given(cfg=conv_configs(), batch=st.sampled_from([1, 1, 3]), channels_last=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_operator_weight_grad_and_its_accumulation_equal_autograd_of_the_conv(cfg, batch, channels_last, seed):
    """ConvOperator.weight_grad(x, y) = d<y, conv(x, W)>/dW, axpby_weight_grad = beta g + alpha times it (with
    and without the im2col matrix from forward_and_cols), forward_and_cols is the conv: against autograd of the
    layer's own conv, for every geometry, batch sizes 1 (matrix path of 2-d convs) and 3, both weight layouts."""
    conv, shape = cfg
    conv = conv.double()
    torch.manual_seed(seed)
    conv_spectral_norm(conv, input_shape=shape, warmup_iterations=0)
    op = find_conv_spectral_norm(conv).operator
    w = torch.randn(op.weight_shape, dtype=torch.float64)
    if channels_last and w.dim() == 4:
        w = w.contiguous(memory_format=torch.channels_last)
    x = torch.randn(batch, *shape, dtype=torch.float64)
    y = torch.randn(batch, *op.output_shape, dtype=torch.float64)
    wr = w.detach().clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad((y * conv_apply(conv, x, wr)).sum(), wr)
    torch.testing.assert_close(op.weight_grad(x, y, w), g_ref, rtol=1e-10, atol=1e-12)
    ax, cols = op.forward_and_cols(x, w)
    torch.testing.assert_close(ax, conv_apply(conv, x, w), rtol=1e-10, atol=1e-12)
    alpha = torch.tensor(-0.7, dtype=torch.float64)
    base = torch.randn_like(w)  # the layout of w (a channels-last gradient takes the conv path)
    beta = torch.tensor(1.9, dtype=torch.float64)
    kept = base.clone()
    for c in (cols, None):
        for buffer in (None, lambda: torch.empty_like(base)):
            acc = op.axpby_weight_grad(base, beta, x, y, alpha, c, buffer)
            torch.testing.assert_close(acc, beta * base + alpha * g_ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(base, kept)  # g is not modified


@pytest.mark.parametrize("shape", [(7, 5), (1, 4)])
def test_linear_operator_weight_grad_accumulation_and_first_order_gradient(shape):
    """MatrixOperator.axpby_weight_grad = beta g + alpha y^T x; the Linear layer's first-order gradient equals
    autograd of W / <u, W v> with the new u, v."""
    torch.manual_seed(0)
    lin = linear_spectral_norm(nn.Linear(shape[1], shape[0]).double())
    sn = lin.parametrizations.weight[0]
    op = sn.operator
    x, y = torch.randn(3, shape[1], dtype=torch.float64), torch.randn(3, shape[0], dtype=torch.float64)
    base = torch.randn(shape, dtype=torch.float64)
    alpha = torch.tensor(1.3, dtype=torch.float64)
    beta = torch.tensor(0.4, dtype=torch.float64)
    for buffer in (None, lambda: torch.empty_like(base)):
        torch.testing.assert_close(op.axpby_weight_grad(base, beta, x, y, alpha, None, buffer),
                                   beta * base + alpha * y.t() @ x)
    raw = lin.parametrizations.weight.original
    lin.train()
    out = lin(x)
    (g,) = torch.autograd.grad((out * y).sum(), raw)
    w = raw.detach().clone().requires_grad_(True)
    wn = w / (sn.u @ w @ sn.v.t()).squeeze()
    (g_ref,) = torch.autograd.grad(((F.linear(x, wn, lin.bias.detach())) * y).sum(), w)
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_reused_output_memory_is_never_shared_with_a_live_tensor():
    """The training step reuses the memory of W / sigma and of the raw weight's gradient from the previous step,
    but only once nothing references it: a kept normalized weight (detached alias), a kept .grad, a view and a
    graph that saved the weight keep their values; with nothing kept, the memory is reused."""
    torch.manual_seed(0)
    conv = conv_spectral_norm(nn.Conv2d(64, 128, 3, padding=1), input_shape=(64, 6, 6)).train()  # 288 KiB weight
    raw = conv.parametrizations.weight.original
    x = torch.randn(2, 64, 6, 6)

    def step():
        raw.grad = None
        conv(x).square().sum().backward()

    step()
    step()
    w1 = conv.weight
    ptr = w1.data_ptr()
    del w1
    w2 = conv.weight
    kept_buf = conv.parametrizations.weight[0]._scratch._bufs["weight"][0]
    assert w2.data_ptr() == ptr == kept_buf.data_ptr()  # nothing kept it: reused
    for keep in (lambda t: t.detach(), lambda t: t.view(-1), lambda t: t * 1.0):
        kept = keep(conv.weight)  # the product's graph saves the normalized weight
        before = kept.detach().clone()
        with torch.no_grad():
            raw.add_(torch.randn_like(raw))
        out = conv.weight  # another training forward with a different weight
        assert torch.equal(kept.detach(), before)
        assert out.data_ptr() != kept.data_ptr()
    step()
    g = raw.grad
    g_before = g.clone()
    step()  # sets raw.grad = None first; g is still referenced here
    assert torch.equal(g, g_before) and raw.grad.data_ptr() != g.data_ptr()
    step()
    g3 = raw.grad.clone()
    twin = copy.deepcopy(conv)  # same weight, u, v: the gradient the next step adds
    twin(x).square().sum().backward()
    conv(x).square().sum().backward()  # accumulates into the kept .grad
    torch.testing.assert_close(raw.grad, g3 + twin.parametrizations.weight.original.grad)
    sn = conv.parametrizations.weight[0]
    assert copy.deepcopy(conv).parametrizations.weight[0]._scratch is not sn._scratch
    conv.eval()  # eval (also with gradients) never uses it, and leaving training gives the memory back
    assert not sn._scratch._bufs
    conv(x).sum().backward()
    assert not sn._scratch._bufs
    small = conv_spectral_norm(nn.Conv2d(3, 4, 3), input_shape=(3, 6, 6)).train()
    small(torch.randn(1, 3, 6, 6)).sum().backward()  # small weights: the allocator serves them well
    assert not small.parametrizations.weight[0]._scratch._bufs


@pytest.mark.parametrize("kernel,stride,padding,dilation", [(3, 1, 1, 1), (3, 2, 1, 1), (1, 1, 0, 1), (5, 1, 2, 2),
                                                            (3, 1, 0, 1), (7, 2, 3, 1), (2, 1, 1, 1)])
def test_float32_batch1_matrix_path_matches_the_float64_dense_operator(kernel, stride, padding, dilation):
    """The batch-1 float32 matrix path (im2col products) on a larger input: forward, adjoint, forward_and_cols
    and the weight-gradient accumulation against the float64 dense operator, within float32 rounding."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel, stride=stride, padding=padding, dilation=dilation, bias=False)
    shape = (3, 20, 19)
    op = conv_spectral_norm(conv, input_shape=shape).parametrizations.weight[0].operator
    w = torch.randn(op.weight_shape)
    m = conv_operator_matrix(conv, shape, w)  # float64
    v, u = torch.randn(1, *shape), torch.randn(1, *op.output_shape)
    vd, ud = v.double().reshape(-1), u.double().reshape(-1)
    # float32 rounding: within a few ulp of the sum of |terms| per entry
    assert ((op.forward(v, w).double().reshape(-1) - m @ vd).abs() <= 1e-6 * (m.abs() @ vd.abs())).all()
    assert ((op.adjoint(u, w).double().reshape(-1) - m.t() @ ud).abs() <= 1e-6 * (m.abs().t() @ ud.abs())).all()
    wd = w.double().requires_grad_(True)
    (g_ref,) = torch.autograd.grad((u.double() * conv_apply(conv, v.double(), wd)).sum(), wd)
    ax, cols = op.forward_and_cols(v, w)
    torch.testing.assert_close(ax, op.forward(v, w))
    base = torch.randn_like(w)
    acc = op.axpby_weight_grad(base, torch.tensor(2.0), v, u, torch.tensor(0.5), cols)
    torch.testing.assert_close(acc.double(), 2 * base.double() + 0.5 * g_ref, rtol=0,
                               atol=1e-5 * (g_ref.abs().max().item() + base.abs().max().item()))


def test_training_step_is_labelled_in_the_profiler():
    """torch.profiler attributes the spectral norm's share of a step to three named ranges (entered only while a
    profiler records)."""
    conv = conv_spectral_norm(nn.Conv2d(3, 4, 3), input_shape=(3, 8, 8)).train()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        conv(torch.randn(1, 3, 8, 8)).sum().backward()
    names = {e.key for e in prof.key_averages()}
    assert {"lcnnify.spectral_norm.power_iteration", "lcnnify.spectral_norm.sigma",
            "lcnnify.spectral_norm.sigma_backward"} <= names


@pytest.mark.parametrize("block_bytes", [1, 200, 1 << 30])
def test_weight_grad_axpby_in_row_blocks_equals_the_whole(monkeypatch, block_bytes):
    """Large weights are scaled and accumulated in row blocks (one row, ragged blocks, one block): the same
    beta g + alpha G as autograd of the conv."""
    from lcnnify.nn import conv_operator
    monkeypatch.setattr(conv_operator, "_BLOCKED_MIN_BYTES", 0)
    monkeypatch.setattr(conv_operator, "_ROW_BLOCK_BYTES", block_bytes)
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 7, 3, padding=1).double()
    op = conv_spectral_norm(conv, input_shape=(3, 5, 5)).parametrizations.weight[0].operator
    x, y = torch.randn(1, 3, 5, 5, dtype=torch.float64), torch.randn(1, 7, 5, 5, dtype=torch.float64)
    w = torch.randn(op.weight_shape, dtype=torch.float64, requires_grad=True)
    (g_ref,) = torch.autograd.grad((y * conv_apply(conv, x, w)).sum(), w)
    g = torch.randn(op.weight_shape, dtype=torch.float64)
    alpha, beta = torch.tensor(-0.3, dtype=torch.float64), torch.tensor(1.7, dtype=torch.float64)
    out = op.axpby_weight_grad(g, beta, x, y, alpha, op.forward_and_cols(x, w.detach())[1])
    torch.testing.assert_close(out, beta * g + alpha * g_ref, rtol=1e-12, atol=1e-12)
