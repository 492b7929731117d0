"""gamma-Lipschitz batch normalization (paper §3.4.2)."""
from __future__ import annotations

import contextlib
import copy
import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lcnnify.nn.lipschitz_batchnorm as lbn_module
from lcnnify.nn import LipschitzBatchNorm, is_lcnn_layer

SETTINGS = settings(max_examples=40, deadline=None)

SCALAR_PATHS = ["host", "tensor"]


@contextlib.contextmanager
def scalar_path(path: str):
    """Run the training forward on one path: "host" is the CPU's (the clip's scalars and the update factor read
    as Python numbers, one autograd node); "tensor" the one other devices take (the clip as tensor ops under
    autograd), forced on the CPU."""
    saved = lbn_module._reads_host_scalars
    if path == "tensor":
        lbn_module._reads_host_scalars = lambda input: False
    try:
        yield
    finally:
        lbn_module._reads_host_scalars = saved


BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SHAPES = {1: (6, 4, 5), 2: (6, 4, 3, 3), 3: (6, 4, 2, 3, 2)}


def measured_channel_gains(bn: nn.Module, ndim: int = 4) -> torch.Tensor:
    """|d out_c / d in_c| for every channel, by a finite difference of the (affine) eval-mode map."""
    c = bn.num_features
    x = torch.randn(1, c, *([3] * (ndim - 2)), dtype=torch.float64)
    gains = []
    with torch.no_grad():
        base = bn(x)
        for i in range(c):
            xp = x.clone()
            xp[:, i] += 1.0
            gains.append((bn(xp) - base)[:, i].abs().mean())
    return torch.stack(gains)


@st.composite
def bn_states(draw):
    c = draw(st.integers(1, 6))
    affine = draw(st.booleans())
    gamma = draw(st.floats(1.0, 50.0))
    log_var = draw(st.lists(st.floats(-8.0, 5.0), min_size=c, max_size=c))
    weights = draw(st.lists(st.floats(-5.0, 5.0), min_size=c, max_size=c))
    return c, affine, gamma, log_var, weights


@SETTINGS
@given(state=bn_states())
def test_eval_gain_equals_min_of_L_and_gamma_and_never_exceeds_gamma(state):
    c, affine, gamma, log_var, weights = state
    bn = LipschitzBatchNorm(c, affine=affine, gamma=gamma, dtype=torch.float64)
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor(log_var, dtype=torch.float64).exp())
        bn.running_mean.normal_()
        if affine:
            bn.weight.copy_(torch.tensor(weights, dtype=torch.float64))
            bn.bias.normal_()
    bn.eval()
    w = bn.weight.detach().abs() if affine else torch.ones(c, dtype=torch.float64)
    L = (w / (bn.running_var + bn.eps).sqrt()).max().item()
    g = bn.gamma.item()
    gain = measured_channel_gains(bn).max().item()
    assert gain == pytest.approx(min(L, g), rel=1e-9, abs=1e-12)
    assert gain <= g * (1 + 1e-9)
    assert bn.lipschitz_constant().item() == pytest.approx(min(L, g), rel=1e-12)


@SETTINGS
@given(raw=st.floats(-1e4, 1e2))
def test_gamma_is_at_least_one_for_any_raw_parameter(raw):
    bn = LipschitzBatchNorm(3)
    with torch.no_grad():
        bn.log_gamma_minus_1.fill_(raw)
    assert bn.gamma.item() >= 1.0
    assert bn.log_gamma().item() >= 0.0
    assert math.isfinite(bn.log_gamma().item())  # stable even where gamma itself overflows
    raw32 = bn.log_gamma_minus_1.item()
    want = raw32 + math.log1p(math.exp(-raw32)) if raw32 > 0 else math.log1p(math.exp(raw32))  # log(1 + e^raw)
    assert bn.log_gamma().item() == pytest.approx(want, rel=1e-5, abs=1e-30)


@pytest.mark.parametrize("gamma", [1.0, 1.5, 10.0, 1e3])
def test_gamma_initial_value_and_validation(gamma):
    bn = LipschitzBatchNorm(3, gamma=gamma)
    assert bn.gamma.item() == pytest.approx(gamma, rel=1e-6)
    assert bn.log_gamma_minus_1.requires_grad
    with pytest.raises(ValueError):
        LipschitzBatchNorm(3, gamma=0.5)


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("momentum", [0.1, None, 0.5])
@pytest.mark.parametrize("affine", [True, False])
def test_train_mode_running_stats_and_outputs_match_nn_batchnorm(dim, momentum, affine):
    torch.manual_seed(0)
    ref = BN[dim](4, momentum=momentum, affine=affine)
    lbn = LipschitzBatchNorm.from_batchnorm(ref, gamma=10.0)  # L = 1 / 3 <= gamma: no clipping
    lbn.stats_warmup = False  # nn.BatchNorm's update rule exactly
    shapes = [SHAPES[dim]] + ([(6, 4)] if dim == 1 else [])
    for shape in shapes * 2:
        x = torch.randn(*shape) * 3 + 1
        y, y_ref = lbn(x), ref(x)
        # the same statistics kernel; normalization and running-statistics update are written differently
        # (the clip needs the variance first): equal up to float32 rounding
        torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lbn.running_mean, ref.running_mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(lbn.running_var, ref.running_var, rtol=1e-6, atol=1e-7)
        assert torch.equal(lbn.num_batches_tracked, ref.num_batches_tracked)


def test_state_dict_has_batchnorm_keys_plus_gamma():
    bn = nn.BatchNorm2d(4)
    lbn = LipschitzBatchNorm.from_batchnorm(bn)
    assert set(lbn.state_dict()) == set(bn.state_dict()) | {"log_gamma_minus_1"}
    missing, unexpected = lbn.load_state_dict(bn.state_dict(), strict=False)
    assert missing == ["log_gamma_minus_1"] and unexpected == []


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_from_batchnorm_preserves_eval_outputs_when_gamma_exceeds_L(dim):
    torch.manual_seed(dim)
    bn = BN[dim](4).double()
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0)
        bn.running_mean.normal_()
        bn.weight.normal_()
        bn.bias.normal_()
    bn.eval()
    lbn = LipschitzBatchNorm.from_batchnorm(bn, gamma=10.0)
    assert not lbn.training and lbn.dim == dim
    assert lbn.running_var.dtype == torch.float64 and lbn.weight.device == bn.weight.device
    assert lbn.lipschitz_bound_unclipped() < lbn.gamma
    x = torch.randn(*SHAPES[dim], dtype=torch.float64)
    assert torch.allclose(lbn(x), bn(x), rtol=0, atol=1e-12)
    # copies, not shared storage
    assert lbn.weight.data_ptr() != bn.weight.data_ptr()
    # clipping active: only the linear part is scaled, by gamma / L
    lbn2 = LipschitzBatchNorm.from_batchnorm(bn, gamma=1.0)
    L = lbn2.lipschitz_bound_unclipped().item()
    if L > 1.0:
        s = lbn2.gamma.item() / L
        expect = s * (bn(x) - bn.bias.view(1, -1, *([1] * (x.dim() - 2)))) + bn.bias.view(1, -1, *([1] * (x.dim() - 2)))
        assert torch.allclose(lbn2(x), expect, atol=1e-12)


def test_input_dim_is_checked_like_batchnorm():
    lbn2 = LipschitzBatchNorm.from_batchnorm(nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="4D"):
        lbn2(torch.randn(2, 4, 5))
    lbn1 = LipschitzBatchNorm.from_batchnorm(nn.BatchNorm1d(4))
    lbn1(torch.randn(2, 4))
    lbn1(torch.randn(2, 4, 5))
    with pytest.raises(ValueError):
        lbn1(torch.randn(2, 4, 5, 5))
    any_dim = LipschitzBatchNorm(4)
    for shape in [(3, 4), (3, 4, 2), (3, 4, 2, 2), (3, 4, 2, 2, 2)]:
        any_dim(torch.randn(*shape))
    with pytest.raises(ValueError, match="channels"):
        any_dim(torch.randn(3, 5, 2))


def test_frozen_batchnorm2d_conversion_stays_frozen():
    torchvision = pytest.importorskip("torchvision")
    frozen = torchvision.ops.misc.FrozenBatchNorm2d(4, eps=1e-3)
    torch.manual_seed(0)
    for name in ("weight", "bias", "running_mean"):
        getattr(frozen, name).normal_()
    frozen.running_var.uniform_(0.5, 2.0)
    lbn = LipschitzBatchNorm.from_batchnorm(frozen, gamma=100.0)
    assert lbn.frozen and lbn.eps == 1e-3 and not lbn.weight.requires_grad
    x = torch.randn(3, 4, 5, 5)
    rv = lbn.running_var.clone()
    lbn.train()
    assert torch.allclose(lbn(x), frozen(x), atol=1e-5)  # running statistics also in training mode
    assert torch.equal(lbn.running_var, rv)
    assert set(frozen.state_dict()) <= set(lbn.state_dict())


def test_sync_batchnorm_converts_to_synchronized_layer_that_is_local_outside_distributed():
    sbn = nn.SyncBatchNorm(4, momentum=0.3)
    lbn = LipschitzBatchNorm.from_batchnorm(sbn)
    assert type(lbn) is LipschitzBatchNorm and lbn.momentum == 0.3 and lbn.dim is None
    assert lbn.synchronized and lbn.process_group is None and "synchronized=True" in repr(lbn)
    assert is_lcnn_layer(lbn) and not is_lcnn_layer(sbn)
    # torch.distributed not initialized: exactly the local computation (outputs, statistics, gradients)
    local = LipschitzBatchNorm.from_batchnorm(nn.BatchNorm2d(4, momentum=0.3))
    assert not local.synchronized
    torch.manual_seed(0)
    x = torch.randn(3, 4, 2, 2) * 0.05
    for mod in (lbn, local):
        xi = x.clone().requires_grad_(True)
        mod(xi).square().sum().backward()
        mod.grad_x = xi.grad
    assert torch.equal(lbn.grad_x, local.grad_x) and torch.equal(lbn.running_var, local.running_var)
    assert torch.equal(lbn.log_gamma_minus_1.grad, local.log_gamma_minus_1.grad)


def test_convert_sync_batchnorm_marks_every_trainable_layer():
    torchvision = pytest.importorskip("torchvision")
    frozen = LipschitzBatchNorm.from_batchnorm(torchvision.ops.misc.FrozenBatchNorm2d(2))
    model = nn.Sequential(LipschitzBatchNorm(2), nn.Sequential(LipschitzBatchNorm(2)), frozen)
    group = object()  # any handle: stored, used only under torch.distributed
    assert LipschitzBatchNorm.convert_sync_batchnorm(model, group) is model
    assert [m.synchronized for m in model.modules() if isinstance(m, LipschitzBatchNorm)] == [True, True, False]
    assert model[0].process_group is group and model[1][0].process_group is group


@SETTINGS
@given(state=bn_states(), log_scale=st.floats(-6.0, 3.0), running_log_var=st.floats(-8.0, 5.0))
def test_training_map_is_gamma_lipschitz_for_its_batch_and_ignores_running_statistics(state, log_scale,
                                                                                      running_log_var):
    """In training the clip reads the statistics the layer normalizes with (the batch's), so the applied map
    (statistics held fixed) has per-channel gains s * |w_i| / sqrt(var_i + eps) with s = min(1, gamma / L_batch),
    whatever the running statistics are."""
    c, affine, gamma, log_var, weights = state
    gen = torch.Generator().manual_seed(c)
    scales = torch.tensor(log_var, dtype=torch.float64).mul(0.5).exp() * math.exp(log_scale)
    x = torch.randn(8, c, 3, 3, generator=gen, dtype=torch.float64) * scales.view(1, c, 1, 1) + 0.3
    bias = torch.randn(c, generator=gen, dtype=torch.float64)
    outs = []
    for rv in (1.0, math.exp(running_log_var)):
        bn = LipschitzBatchNorm(c, affine=affine, gamma=gamma, dtype=torch.float64)
        with torch.no_grad():
            bn.running_var.fill_(rv)
            if affine:
                bn.weight.copy_(torch.tensor(weights, dtype=torch.float64))
                bn.bias.copy_(bias)
        outs.append(bn(x).detach())
    assert torch.equal(outs[0], outs[1])
    # independent reference: the float64 formula with the biased batch statistics
    mean = x.mean(dim=(0, 2, 3))
    var = ((x - mean.view(1, c, 1, 1)) ** 2).mean(dim=(0, 2, 3))
    w = torch.tensor(weights, dtype=torch.float64) if affine else torch.ones(c, dtype=torch.float64)
    gains = w.abs() / (var + bn.eps).sqrt()
    s = min(1.0, bn.gamma.item() / max(gains.max().item(), 1e-300))
    b = bn.bias.detach() if affine else torch.zeros(c, dtype=torch.float64)
    want = s * (w / (var + bn.eps).sqrt()).view(1, c, 1, 1) * (x - mean.view(1, c, 1, 1)) + b.view(1, c, 1, 1)
    torch.testing.assert_close(outs[1], want, rtol=1e-10, atol=1e-12)
    assert s * gains.max().item() <= bn.gamma.item() * (1 + 1e-12)


@pytest.mark.parametrize("path", SCALAR_PATHS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(6, 3, 4, 4), (9, 3)])
def test_training_gradients_treat_the_batch_variance_in_the_clip_as_a_constant(affine, shape, path):
    """First and second derivatives (GradReg differentiates the input gradient) against a float64 reference
    built from elementary ops: s(w, gamma) at the detached batch variance times an exact batch normalization."""
    torch.manual_seed(0)
    c = 3
    bn = LipschitzBatchNorm(c, gamma=2.0, affine=affine, dtype=torch.float64)
    if affine:
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([1.0, -3.0, 0.5], dtype=torch.float64))
            bn.bias.normal_()
    x0 = torch.randn(*shape, dtype=torch.float64) * 0.2  # L >= 5 > gamma: clipping
    g, h = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    dims = [0] + list(range(2, len(shape)))
    view = (1, c) + (1,) * (len(shape) - 2)
    w_ref = (bn.weight.detach() if affine else torch.ones(c, dtype=torch.float64)).clone().requires_grad_(True)
    b = bn.bias.detach() if affine else torch.zeros(c, dtype=torch.float64)
    raw = bn.log_gamma_minus_1.detach().clone().requires_grad_(True)

    def reference(x):
        var_const = x.detach().var(dim=dims, unbiased=False)
        L = (w_ref.abs() / (var_const + bn.eps).sqrt()).max()
        s = torch.minimum(torch.ones((), dtype=torch.float64), (1 + raw.exp()) / L)
        assert s.item() < 1.0
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
        return s * w_ref.view(view) * (x - mean) / (var + bn.eps).sqrt() + b.view(view)

    grads = []
    for fn, params in ((bn, [bn.log_gamma_minus_1] + ([bn.weight] if affine else [])),
                       (reference, [raw] + ([w_ref] if affine else []))):
        x = x0.clone().requires_grad_(True)
        with scalar_path(path):
            first = torch.autograd.grad((fn(x) * g).sum(), [x] + params, create_graph=True)
            second = torch.autograd.grad((first[0] * h).sum(), [x] + params, allow_unused=True)
        grads.append([t.detach() for t in first] + [t if t is not None else torch.zeros(()) for t in second])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want.expand_as(got), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("path", SCALAR_PATHS)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(5, 2, 3, 3), (7, 3)])
def test_training_mode_gradcheck_and_gradgradcheck_without_clipping(affine, shape, path):
    torch.manual_seed(1)
    bn = LipschitzBatchNorm(shape[1], gamma=1e3, affine=affine, dtype=torch.float64).train()
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 2.0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    with scalar_path(path):
        assert torch.autograd.gradcheck(bn, (x,))
        assert torch.autograd.gradgradcheck(bn, (x,))


@pytest.mark.parametrize("train", [True, False])
def test_gamma_receives_gradient_only_when_clipping_is_active(train):
    torch.manual_seed(0)
    lbn = LipschitzBatchNorm(3, gamma=2.0)
    lbn.train(train)
    x = torch.randn(8, 3, 4, 4)
    lbn(x).square().sum().backward()
    assert lbn.log_gamma_minus_1.grad is None or lbn.log_gamma_minus_1.grad.item() == 0.0  # L = 1 < gamma
    if train:
        x = x * 0.1  # batch variance 0.01: L = 10 > gamma = 2, clipping active
    else:
        with torch.no_grad():
            lbn.running_var.fill_(0.01)  # L = 10 > gamma = 2: clipping active
    lbn.zero_grad()
    lbn(x).square().sum().backward()
    g = lbn.log_gamma_minus_1.grad
    assert g is not None and torch.isfinite(g) and g.item() != 0.0
    assert torch.isfinite(lbn.weight.grad).all()


def test_no_running_stats_bounds_gain_with_current_batch_statistics():
    torch.manual_seed(0)
    lbn = LipschitzBatchNorm(3, track_running_stats=False, gamma=2.0)
    with torch.no_grad():
        lbn.weight.copy_(torch.tensor([1.0, 5.0, 0.5]))
    x = torch.randn(16, 3, 4, 4) * torch.tensor([0.1, 1.0, 3.0]).view(1, 3, 1, 1)
    for mode in (True, False):
        lbn.train(mode)
        y = lbn(x)
        var = x.var(dim=(0, 2, 3), unbiased=False)
        gains = (lbn.weight.detach().abs() / (var + lbn.eps).sqrt())
        scale = min(1.0, 2.0 / gains.max().item())
        # y - b = scale * w (x - mean) / sqrt(var + eps): per-channel slope = scale * gains <= gamma
        slope = ((y - lbn.bias.view(1, 3, 1, 1)) / (x - x.mean(dim=(0, 2, 3), keepdim=True))).detach()
        per_channel = slope.transpose(0, 1).reshape(3, -1).median(dim=1).values
        assert torch.allclose(per_channel, scale * gains, rtol=1e-4)
        assert per_channel.abs().max().item() <= 2.0 * (1 + 1e-5)
    assert lbn.lipschitz_constant().item() == pytest.approx(2.0)


# ------------------------------------------------------------------ the training fast path and the eval cache
@pytest.mark.parametrize("path", SCALAR_PATHS)
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_both_scalar_paths_update_running_statistics_like_the_recurrence_without_bumping_versions(path, momentum):
    """factor a_t = max(momentum, 1/t): the first batch replaces the placeholder (0, 1), then a cumulative
    average until 1/momentum batches, then the exponential average; checked against the recurrence in float64."""
    torch.manual_seed(2)
    bn = LipschitzBatchNorm(3, momentum=momentum, dtype=torch.float64)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    versions = (bn.running_mean._version, bn.running_var._version)
    with scalar_path(path):
        for t in range(1, 14):
            x = torch.randn(5, 3, 2, 2, dtype=torch.float64) * 0.01 * t + t
            bn(x)
            n = x.numel() // 3
            mean = x.sum(dim=(0, 2, 3)) / n
            uvar = ((x - mean.view(1, 3, 1, 1)) ** 2).sum(dim=(0, 2, 3)) / (n - 1)
            a = 1.0 / t if momentum is None else max(momentum, 1.0 / t)
            rm, rv = (1 - a) * rm + a * mean, (1 - a) * rv + a * uvar
            if t == 1:
                torch.testing.assert_close(bn.running_var, uvar, rtol=1e-12, atol=0)  # placeholder (0, 1) gone
            torch.testing.assert_close(bn.running_mean, rm, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(bn.running_var, rv, rtol=1e-12, atol=1e-12)
    assert bn.num_batches_tracked.item() == 13
    # an eval-mode graph that saved the running statistics (CURE's reference pass) stays usable
    assert (bn.running_mean._version, bn.running_var._version) == versions


def _reference_training_bn(x, w, raw, b, eps, dims):
    """s(w, gamma) at the detached batch variance times an exact batch normalization, from elementary ops."""
    c = x.shape[1]
    view = (1, c) + (1,) * (x.dim() - 2)
    var_const = x.detach().var(dim=dims, unbiased=False)
    w_abs = w.abs() if w is not None else torch.ones(c, dtype=x.dtype)
    L = (w_abs / (var_const + eps).sqrt()).max()
    s = torch.minimum(torch.ones((), dtype=x.dtype), (1 + raw.exp()) / L)
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    scaled = s * (w.view(view) if w is not None else 1.0)
    return scaled * (x - mean) / (var + eps).sqrt() + (b.view(view) if b is not None else 0.0)


#: (weights, channel scales, gamma, eps): clip inactive; active; two channels tied for the max (even split);
#: L == gamma exactly (var 1/4, eps 0, w 1, gamma 2: the subgradient halves); a zero weight on the max channel
CLIP_CASES = {
    "inactive": ([1.0, -0.5, 2.0], [1.0, 1.0, 1.0], 10.0, 1e-5),
    "active": ([1.0, -3.0, 0.5], [0.2, 0.2, 0.2], 2.0, 1e-5),
    "tied channels": ([2.0, -2.0, 0.5], "tied", 1.0, 1e-5),
    "L equals gamma": ([1.0, 0.25, 0.5], "quarter", 2.0, 0.0),
}


def _clip_case_input(scales, shape, gen):
    if scales == "tied":  # channels 0 and 1 hold the same values: equal variances, |w| equal: tied gains
        x = torch.randn(*shape, generator=gen, dtype=torch.float64) * 0.1
        x[:, 1] = x[:, 0]
        return x
    if scales == "quarter":  # every channel +-1/2, half each: mean 0 and variance 1/4 exactly
        x = torch.full(shape, 0.5, dtype=torch.float64)
        x[: shape[0] // 2] = -0.5
        return x
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * torch.tensor(
        scales, dtype=torch.float64).view(1, -1, *([1] * (len(shape) - 2)))


@pytest.mark.parametrize("path", SCALAR_PATHS)
@pytest.mark.parametrize("case", list(CLIP_CASES))
@pytest.mark.parametrize("affine,wants", [(True, "all"), (True, "gamma only"), (True, "weight only"),
                                          (False, "all")])
@pytest.mark.parametrize("shape", [(6, 3, 2, 2), (8, 3)])
def test_training_first_order_gradients_match_elementary_autograd(path, case, affine, wants, shape):
    """The first-order gradients (no create_graph: the CPU path's closed-form vector-Jacobian product of the
    clip) equal autograd through the elementary formula, with autograd's subgradients at ties: channels tied for
    max_i |w_i| invstd_i share evenly, L == gamma splits in halves."""
    weights, scales, gamma, eps = CLIP_CASES[case]
    gen = torch.Generator().manual_seed(3)
    x0 = _clip_case_input(scales, shape, gen)
    g = torch.randn(*shape, generator=gen, dtype=torch.float64)
    bn = LipschitzBatchNorm(3, gamma=gamma, eps=eps, affine=affine, dtype=torch.float64)
    if case == "L equals gamma":
        with torch.no_grad():
            bn.log_gamma_minus_1.zero_()  # gamma = 1 + exp(0) = 2 exactly
    if affine:
        with torch.no_grad():
            bn.weight.copy_(torch.tensor(weights, dtype=torch.float64))
            bn.bias.copy_(torch.randn(3, generator=gen, dtype=torch.float64))
        bn.weight.requires_grad_(wants != "gamma only")
    bn.log_gamma_minus_1.requires_grad_(wants != "weight only")
    w_ref = bn.weight.detach().clone().requires_grad_(bn.weight.requires_grad) if affine else None
    b_ref = bn.bias.detach().clone().requires_grad_(True) if affine else None
    raw_ref = bn.log_gamma_minus_1.detach().clone().requires_grad_(bn.log_gamma_minus_1.requires_grad)
    dims = [0] + list(range(2, len(shape)))
    if case == "L equals gamma":
        w_abs = w_ref.detach().abs() if affine else torch.ones(3, dtype=torch.float64)
        L = (w_abs / (x0.var(dim=dims, unbiased=False) + eps).sqrt()).max()
        assert L.item() == 2.0 and (1 + raw_ref.detach().exp()).item() == 2.0
    params = [p for p in (bn.weight, bn.bias, bn.log_gamma_minus_1) if p is not None and p.requires_grad]
    ref_params = [p for p in (w_ref, b_ref, raw_ref) if p is not None and p.requires_grad]
    with scalar_path(path):
        x = x0.clone().requires_grad_(True)
        got = torch.autograd.grad((bn(x) * g).sum(), [x] + params)
    xr = x0.clone().requires_grad_(True)
    want = torch.autograd.grad((_reference_training_bn(xr, w_ref, raw_ref, b_ref, eps, dims) * g).sum(),
                               [xr] + ref_params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b.reshape(a.shape), rtol=1e-9, atol=1e-12)
    if case == "inactive" and bn.log_gamma_minus_1.requires_grad and path == "host":
        # no gradient into gamma while the clip is inactive: exactly 0 in closed form (autograd through
        # gamma / max(L, gamma) leaves a rounding residue g/gamma - g (1/gamma))
        assert got[-1].item() == 0.0


@pytest.mark.parametrize("path", SCALAR_PATHS)
def test_training_fast_path_keeps_channels_last_and_float32(path):
    torch.manual_seed(4)
    ref = nn.BatchNorm2d(5)
    lbn = LipschitzBatchNorm.from_batchnorm(ref, gamma=100.0)  # no clipping: exactly a BatchNorm
    lbn.stats_warmup = False
    x = (torch.randn(4, 5, 3, 3) * 2 + 1).contiguous(memory_format=torch.channels_last)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    g = torch.randn(4, 5, 3, 3).contiguous(memory_format=torch.channels_last)
    with scalar_path(path):
        y = lbn(xa)
    y_ref = ref(xb)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lbn.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lbn.running_var, ref.running_var, rtol=1e-6, atol=1e-7)


def _eval_reference(bn):
    """The eval-mode map from the module's current state, in float64, from elementary ops."""
    rv, rm = bn.running_var.detach().double(), bn.running_mean.detach().double()
    w = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(rv)
    b = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(rv)
    L = (w.abs() / (rv + bn.eps).sqrt()).max().item()
    s = min(1.0, (1 + math.exp(bn.log_gamma_minus_1.item())) / L)
    return lambda x: (s * w.view(1, -1, 1, 1) * (x.double() - rm.view(1, -1, 1, 1))
                      / (rv.view(1, -1, 1, 1) + bn.eps).sqrt() + b.view(1, -1, 1, 1))


def test_eval_folded_weight_cache_follows_every_change_of_what_it_depends_on():
    """Eval under no_grad reuses the folded weight s w; every way of changing the weight, gamma, running_var or
    eps shows in the next output (checked against the float64 formula after each change)."""
    torch.manual_seed(5)
    bn = LipschitzBatchNorm(4, gamma=3.0, dtype=torch.float64)
    with torch.no_grad():
        bn.running_var.fill_(0.01)  # L = 10 > gamma: the clip is active and depends on all of them
        bn.weight.normal_()
        bn.bias.normal_()
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64) * 0.1
    other = copy.deepcopy(bn)
    with torch.no_grad():
        other.weight.mul_(1.7)
        other.log_gamma_minus_1.add_(0.3)
        other.running_var.mul_(2.0)
    opt = torch.optim.SGD(bn.parameters(), lr=0.5)

    def optimizer_step():
        bn.train()
        (bn(x) * torch.randn_like(x)).sum().backward()  # also updates the running statistics
        opt.step()
        opt.zero_grad()
        bn.eval()

    def running_stats_only():
        bn.train()
        with torch.no_grad():
            bn(x * 3.0 + 1.0)
        bn.eval()

    def set_eps():
        bn.eps = 1e-3

    def to_float32_and_back():
        bn.float()
        check()
        bn.double()

    changes = {
        "optimizer step": optimizer_step,
        "running statistics update in training": running_stats_only,
        "load_state_dict": lambda: bn.load_state_dict(other.state_dict()),
        "weight.data edit": lambda: bn.weight.data.mul_(-0.5),
        "weight in-place under no_grad": lambda: torch.no_grad()(bn.weight.copy_)(bn.weight * 1.3),
        "gamma .data edit": lambda: bn.log_gamma_minus_1.data.add_(-0.4),
        "running_var .data edit": lambda: bn.running_var.data[1].mul_(0.25),
        "running_var in-place": lambda: bn.running_var.mul_(1.5),
        "eps": set_eps,
        "dtype": to_float32_and_back,
    }

    def check():
        with torch.no_grad():
            y = bn(x.to(bn.weight.dtype))
        tol = 1e-5 if bn.weight.dtype == torch.float32 else 1e-12
        torch.testing.assert_close(y.double(), _eval_reference(bn)(x), rtol=tol, atol=tol)

    bn.eval()
    check()
    check()  # from the cache
    for name, change in changes.items():
        change()
        check()


def test_eval_with_gradients_bypasses_the_cache():
    """Eval-mode training (e.g. frozen statistics): gradients reach the weight and gamma."""
    torch.manual_seed(6)
    bn = LipschitzBatchNorm(3, gamma=2.0, dtype=torch.float64).eval()
    with torch.no_grad():
        bn.running_var.fill_(0.04)  # L = 5 > gamma
        bn.weight.copy_(torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64))
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    with torch.no_grad():
        bn(x)  # fills the cache
    bn(x).square().sum().backward()
    w = bn.weight.detach().clone().requires_grad_(True)
    raw = bn.log_gamma_minus_1.detach().clone().requires_grad_(True)
    sd = (0.04 + bn.eps) ** 0.5
    s = torch.minimum(torch.ones((), dtype=torch.float64), (1 + raw.exp()) / (w.abs() / sd).max())
    y = s * w.view(1, 3, 1, 1) * (x - bn.running_mean.view(1, 3, 1, 1)) / sd + bn.bias.detach().view(1, 3, 1, 1)
    gw, graw = torch.autograd.grad(y.square().sum(), [w, raw])
    torch.testing.assert_close(bn.weight.grad, gw, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bn.log_gamma_minus_1.grad, graw, rtol=1e-10, atol=1e-12)


def test_eval_cache_made_under_inference_mode_serves_normal_mode_and_is_not_pickled():
    torch.manual_seed(7)
    bn = LipschitzBatchNorm(3, gamma=2.0)
    with torch.no_grad():
        bn.running_var.fill_(0.04)
    bn.eval().requires_grad_(False)  # a frozen model, e.g. under attack: only input gradients
    x = torch.randn(4, 3, 2, 2)
    with torch.inference_mode():
        y_inf = bn(x)
    xg = x.clone().requires_grad_(True)
    y = bn(xg)  # the cached folded weight (made in inference mode) is saved for backward: a normal tensor
    y.square().sum().backward()
    assert torch.equal(y.detach(), y_inf)
    s = min(1.0, 2.0 / (1.0 / math.sqrt(0.04 + bn.eps)))
    torch.testing.assert_close(xg.grad, 2 * y.detach() * s / math.sqrt(0.04 + bn.eps))
    bn.requires_grad_(True).train()
    bn(torch.randn(4, 3, 2, 2)).sum().backward()  # training after inference mode
    bn.eval()
    assert set(bn.state_dict()) == set(LipschitzBatchNorm(3).state_dict())
    with torch.no_grad():
        bn(x)
    assert "_folded_cache" in bn.__dict__
    for clone in (pickle.loads(pickle.dumps(bn)), copy.deepcopy(bn)):
        assert "_folded_cache" not in clone.__dict__
        with torch.no_grad():
            assert torch.equal(clone(x), bn(x))


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_bfloat16_inputs_follow_the_float64_formula_in_both_modes(param_dtype):
    """bfloat16 activations (autocast: float32 parameters; or a bfloat16 model), clip active."""
    torch.manual_seed(8)
    bn = LipschitzBatchNorm(3, gamma=2.0, dtype=param_dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -2.0, 0.5]))
    x = (torch.randn(8, 3, 4, 4) * 0.2).to(torch.bfloat16)
    g = torch.randn(8, 3, 4, 4)
    xa = x.clone().requires_grad_(True)
    y = bn(xa)
    assert y.dtype == torch.bfloat16
    (y.float() * g).sum().backward()
    w_ref = bn.weight.detach().double().requires_grad_(True)
    xr = x.double().requires_grad_(True)
    raw = bn.log_gamma_minus_1.detach().double()
    want = _reference_training_bn(xr, w_ref, raw, bn.bias.detach().double(), bn.eps, [0, 2, 3])
    (want * g.double()).sum().backward()
    torch.testing.assert_close(y.double(), want.detach(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(xa.grad.double(), xr.grad, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(bn.weight.grad.double(), w_ref.grad, rtol=5e-2, atol=1e-1)
    bn.eval()
    with torch.no_grad():
        ye = bn(x)
    torch.testing.assert_close(ye.double(), _eval_reference(bn)(x), rtol=2e-2, atol=2e-2)


def test_running_statistics_in_another_dtype_than_the_weight_take_the_general_path():
    """float64 running statistics beside float32 parameters (e.g. loaded from another checkpoint): the
    statistics kernel cannot update them in place, the general path does (same numbers as the tensor path)."""
    torch.manual_seed(9)
    x = torch.randn(6, 3, 2, 2)
    out = {}
    for path in SCALAR_PATHS:
        bn = LipschitzBatchNorm(3)
        bn.running_mean.data = bn.running_mean.data.double()
        bn.running_var.data = bn.running_var.data.double()
        with scalar_path(path):
            out[path] = (bn(x).detach(), bn.running_var.clone())
    assert torch.equal(out["host"][0], out["tensor"][0]) and torch.equal(out["host"][1], out["tensor"][1])
    assert out["host"][1].dtype == torch.float64
