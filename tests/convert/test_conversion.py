"""The fx conversion pass: call sites, no mutation, names, checkpoints, penalty, errors (issue: core)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lcnnify import ConversionError, LCNNConfig, curvature_penalty, lcnnify, param_groups, validate
from lcnnify.nn import CenteredSoftplus, ConvSpectralNorm, LipschitzBatchNorm

RELU_ONLY = dict(spectral_norm_conv=False, spectral_norm_linear=False, lipschitz_batchnorm=False)


def _modules_of(model: nn.Module, kind: type) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kind)]


def _executed_module_types(model: nn.Module, x: torch.Tensor) -> list[type]:
    seen: list[type] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append(type(mod))) for m in model.modules()]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_every_activation_call_site_gets_its_own_centered_softplus(shared_relu_net):
    # 3 call sites of self.relu... wait: 4 (conv1 block, y, and z twice?) -> count them from the source:
    # relu(bn1), relu(y), F.relu_(z), relu(z), z.relu()  => 5 activation call sites
    lc = lcnnify(shared_relu_net)
    csps = _modules_of(lc, CenteredSoftplus)
    assert len(csps) == 5
    assert len({id(m) for m in csps}) == 5
    assert not any(isinstance(m, nn.ReLU) for m in lc.modules())
    counts = lc.lcnn_report.converted_counts
    assert counts == {"activation": 5, "conv": 2, "batchnorm": 2, "linear": 1}


def test_conversion_preserves_inplace_semantics_when_beta_is_large(shared_relu_net):
    """With beta -> inf a centered softplus is a ReLU: the converted graph must compute the same function,
    including the in-place F.relu(z, inplace=True) whose result is unused (later readers see the new z)."""
    shared_relu_net.eval()
    x = torch.randn(2, 1, 6, 6)
    ref = shared_relu_net(x.clone())
    lc = lcnnify(shared_relu_net, beta0=1e4, **RELU_ONLY).eval()
    out = lc(x.clone())
    torch.testing.assert_close(out, ref, atol=5e-3, rtol=0)
    # and it is NOT the same function at small beta (so the comparison above can fail)
    lc_small = lcnnify(shared_relu_net, beta0=0.5, **RELU_ONLY).eval()
    assert (lc_small(x.clone()) - ref).abs().max() > 1e-2


def test_input_model_is_not_mutated(tiny_cnn):
    before = {k: v.clone() for k, v in tiny_cnn.state_dict().items()}
    types_before = [type(m) for m in tiny_cnn.modules()]
    lc = lcnnify(tiny_cnn, example_inputs=torch.randn(2, 1, 8, 8))
    lc.train()
    lc(torch.randn(4, 1, 8, 8)).sum().backward()  # training forward of the copy updates ITS stats only
    after = tiny_cnn.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert [type(m) for m in tiny_cnn.modules()] == types_before
    assert all(p.grad is None for p in tiny_cnn.parameters())


def test_inplace_true_converts_the_given_modules(tiny_cnn):
    lc = lcnnify(tiny_cnn, inplace=True)
    conv = tiny_cnn.features[0]
    assert any(isinstance(p, ConvSpectralNorm) for p in conv.parametrizations["weight"])
    assert lc.features[0] is conv


def test_pretrained_weights_and_bn_statistics_carry_over(tiny_cnn):
    tiny_cnn.features[1].running_mean.uniform_(-1, 1)
    tiny_cnn.features[1].running_var.uniform_(0.5, 2)
    lc = lcnnify(tiny_cnn, example_inputs=torch.randn(1, 1, 8, 8))
    bn = lc.features[1]
    assert isinstance(bn, LipschitzBatchNorm)
    torch.testing.assert_close(bn.running_mean, tiny_cnn.features[1].running_mean)
    torch.testing.assert_close(bn.running_var, tiny_cnn.features[1].running_var)
    torch.testing.assert_close(bn.weight, tiny_cnn.features[1].weight)
    conv = lc.features[0]
    raw = conv.parametrizations["weight"].original
    torch.testing.assert_close(raw, tiny_cnn.features[0].weight)


@pytest.mark.parametrize("with_example", [True, False])
def test_checkpoint_of_converted_model_loads_into_fresh_conversion(tiny_cnn, with_example):
    ex = torch.randn(2, 1, 8, 8)
    lc = lcnnify(tiny_cnn, example_inputs=ex)
    opt = torch.optim.SGD(param_groups(lc, 5e-4), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        loss = F.cross_entropy(lc(torch.randn(8, 1, 8, 8)), torch.randint(0, 10, (8,))) + lc.curvature_penalty()
        loss.backward()
        opt.step()
    state = lc.state_dict()
    torch.manual_seed(123)
    fresh = lcnnify(copy.deepcopy(tiny_cnn), example_inputs=ex if with_example else None)
    assert list(fresh.state_dict().keys()) == list(state.keys())
    fresh.load_state_dict(state)
    lc.eval()
    fresh.eval()
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(fresh(x), lc(x))


def test_names_are_deterministic(shared_relu_net):
    a = lcnnify(shared_relu_net)
    b = lcnnify(shared_relu_net)
    assert [n for n, _ in a.named_modules()] == [n for n, _ in b.named_modules()]
    names = {n for n, m in a.named_modules() if isinstance(m, CenteredSoftplus)}
    assert {"relu", "relu_1", "relu_2"} <= names  # the module called at 3 sites, one module per site


def test_curvature_penalty_equals_formula(tiny_cnn):
    lc = lcnnify(tiny_cnn, beta0=3.0, gamma0=7.0, lambda_beta=0.3, lambda_gamma=0.05)
    with torch.no_grad():
        for i, m in enumerate(_modules_of(lc, CenteredSoftplus)):
            m.log_beta.fill_(math.log(1.5 + i))
    betas = [float(m.beta.detach()) for m in _modules_of(lc, CenteredSoftplus)]
    gammas = [float(m.gamma.detach()) for m in _modules_of(lc, LipschitzBatchNorm)]
    expected = 0.3 * sum(betas) + 0.05 * sum(math.log(g) for g in gammas)
    assert len(betas) == 2 and len(gammas) == 2
    assert gammas[0] == pytest.approx(7.0, rel=1e-5)
    assert lc.curvature_penalty().item() == pytest.approx(expected, rel=1e-5)
    assert curvature_penalty(lc).item() == pytest.approx(expected, rel=1e-5)
    assert curvature_penalty(lc, lambda_beta=0.0).item() == pytest.approx(0.05 * sum(map(math.log, gammas)), rel=1e-5)


def test_penalty_default_lambdas_are_reference_values():
    cfg = LCNNConfig()
    assert (cfg.lambda_beta, cfg.lambda_gamma, cfg.beta0, cfg.gamma0) == (1e-2, 1e-2, 5.0, 10.0)
    net = nn.Sequential(CenteredSoftplus(beta=2.0), CenteredSoftplus(beta=4.0))
    assert curvature_penalty(net).item() == pytest.approx(1e-2 * 6.0, rel=1e-6)


def test_param_groups_keep_beta_and_gamma_out_of_weight_decay(tiny_cnn):
    lc = lcnnify(tiny_cnn)
    groups = param_groups(lc, weight_decay=5e-4)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    free = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    curv = {id(m.log_beta) for m in _modules_of(lc, CenteredSoftplus)}
    curv |= {id(m.log_gamma_minus_1) for m in _modules_of(lc, LipschitzBatchNorm)}
    assert free == curv
    assert decayed | free == {id(p) for p in lc.parameters()}
    assert not decayed & free


def test_deepcopy_keeps_penalty_bound_to_the_copy(tiny_cnn):
    lc = lcnnify(tiny_cnn)
    dup = copy.deepcopy(lc)
    with torch.no_grad():
        for m in _modules_of(dup, CenteredSoftplus):
            m.log_beta.fill_(0.0)
    assert dup.curvature_penalty().item() != pytest.approx(lc.curvature_penalty().item())
    assert dup.lcnn_report.converted_counts == lc.lcnn_report.converted_counts


def test_validate_is_a_dry_run_with_the_same_report(shared_relu_net):
    before = copy.deepcopy(shared_relu_net.state_dict())
    rep = validate(shared_relu_net)
    assert rep.converted_counts == lcnnify(shared_relu_net).lcnn_report.converted_counts
    assert all(torch.equal(before[k], v) for k, v in shared_relu_net.state_dict().items())
    assert not any(isinstance(m, CenteredSoftplus) for m in shared_relu_net.modules())
    d = rep.to_dict()
    assert d["converted_counts"]["activation"] == 5
    assert "CenteredSoftplus" in str(rep)


# ------------------------------------------------------------------------------------------ bad input
def test_non_module_argument_is_a_clear_error(tiny_cnn):
    with pytest.raises(ConversionError, match="torch.nn.Module.*state_dict"):
        lcnnify(tiny_cnn.state_dict())


def test_model_with_nothing_to_convert_is_a_clear_error():
    with pytest.raises(ConversionError, match="nothing to convert"):
        lcnnify(nn.Sequential(nn.Flatten(), nn.Tanh()))


def test_already_converted_model_is_a_clear_error(tiny_cnn):
    lc = lcnnify(tiny_cnn)
    with pytest.raises(ConversionError, match="already an LCNN"):
        lcnnify(lc)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.act = nn.ReLU()

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace this
            x = -x
        return self.act(self.conv(x))


def test_untraceable_model_error_names_the_module_and_the_fx_error():
    model = nn.Sequential(nn.Conv2d(1, 1, 1), _Untraceable())
    with pytest.raises(ConversionError, match=r"forward of '1' \(_Untraceable\).*TraceError.*Fix"):
        lcnnify(model, allow_fallback=False)


def test_untraceable_module_falls_back_to_module_level_and_is_reported():
    model = nn.Sequential(nn.Conv2d(1, 1, 1), _Untraceable())
    lc = lcnnify(model)
    rep = lc.lcnn_report
    assert [f.path for f in rep.fallbacks] == ["1"]
    assert isinstance(lc.get_submodule("1.act"), CenteredSoftplus)
    assert not rep.certified
    assert any(x.path == "1" and "not traced" in x.reason for x in rep.left)
    lc(torch.randn(1, 1, 5, 5))


def test_unknown_config_option_is_a_clear_error(tiny_cnn):
    with pytest.raises(ConversionError, match="unknown LCNNConfig option.*valid options"):
        lcnnify(tiny_cnn, bet0=3.0)


# ------------------------------------------------------------------------------------------ random architectures
@st.composite
def _architectures(draw):
    n_blocks = draw(st.integers(1, 4))
    ops = [draw(st.sampled_from(["module", "shared", "functional", "method", "inplace_fn", "inplace_mod"]))
           for _ in range(n_blocks)]
    width = draw(st.integers(1, 4))
    residual = draw(st.booleans())
    return ops, width, residual


class _RandomNet(nn.Module):
    def __init__(self, ops, width, residual):
        super().__init__()
        self.ops = ops
        self.residual = residual
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 3, padding=1) for _ in ops)
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in ops)
        self.acts = nn.ModuleList(nn.ReLU(inplace=(op == "inplace_mod")) for op in ops)
        self.shared = nn.ReLU()
        self.fc = nn.Linear(width, 2)

    def forward(self, x):
        x = self.stem(x)
        for op, conv, bn, act in zip(self.ops, self.convs, self.bns, self.acts):
            y = bn(conv(x))
            if op in ("module", "inplace_mod"):
                y = act(y)
            elif op == "shared":
                y = self.shared(y)
            elif op == "functional":
                y = F.relu(y)
            elif op == "method":
                y = y.relu()
            else:
                F.relu_(y)
            x = x + y if self.residual else y
        return self.fc(x.mean((2, 3)))


@given(_architectures())
def test_random_architectures_convert_every_call_site_and_keep_the_function(arch):
    ops, width, residual = arch
    torch.manual_seed(0)
    net = _RandomNet(ops, width, residual).eval()
    lc = lcnnify(net, beta0=1e4, **RELU_ONLY).eval()
    assert len(_modules_of(lc, CenteredSoftplus)) == len(ops)
    assert not any(t in (nn.ReLU,) for t in _executed_module_types(lc, torch.randn(1, 1, 5, 5)))
    x = torch.randn(2, 1, 5, 5)
    torch.testing.assert_close(lc(x), net(x), atol=1e-2, rtol=0)


@given(_architectures())
def test_random_architectures_have_unit_norm_layers_after_conversion(arch):
    ops, width, residual = arch
    torch.manual_seed(1)
    net = _RandomNet(ops, width, residual)
    lc = lcnnify(net, example_inputs=torch.randn(1, 1, 5, 5)).eval()
    for name, m in lc.named_modules():
        if isinstance(m, nn.Conv2d):
            # dense operator of the normalized conv at the 5x5 input it sees
            eye = torch.eye(m.in_channels * 25).reshape(-1, m.in_channels, 5, 5)
            with torch.no_grad():
                cols = F.conv2d(eye, m.weight, None, m.stride, m.padding).reshape(eye.shape[0], -1)
            assert torch.linalg.matrix_norm(cols, ord=2).item() == pytest.approx(1.0, abs=1e-2), name
        if isinstance(m, nn.Linear):
            assert torch.linalg.matrix_norm(m.weight.detach(), ord=2).item() == pytest.approx(1.0, abs=1e-2)


def test_zero_initialised_batchnorm_weights_give_finite_gradients():
    """timm's zero_init_last sets the last BN weight of each block to 0: L = 0 must not produce NaN grads."""
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(18, 2))
    nn.init.zeros_(net[1].weight)
    lc = lcnnify(net)
    loss = lc(torch.randn(4, 1, 5, 5)).sum() + lc.curvature_penalty()
    loss.backward()
    for name, p in lc.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name


def test_fallback_keeps_dropout_mode_dependent():
    """A fallback model's Dropout child must stay a Dropout (off in eval), not a graph traced in train mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 1, 1), _Untraceable())
    model[1].drop = nn.Dropout(0.5)
    lc = lcnnify(model)
    drop = lc.get_submodule("1.drop")
    assert isinstance(drop, nn.Dropout)
    drop.eval()
    torch.testing.assert_close(drop(torch.ones(1, 12)), torch.ones(1, 12))


def test_inplace_activation_sites_stay_inplace_and_compute_the_same_as_out_of_place():
    """nn.ReLU(inplace=True), F.relu_ and x.relu_() become in-place centered softplus (ReLU-level memory); the
    values and gradients equal those of the same model with out-of-place activations."""
    from lcnnify.nn import CenteredSoftplus

    class Net(nn.Module):
        def __init__(self, inplace: bool) -> None:
            super().__init__()
            self.inplace = inplace
            self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
            self.act = nn.ReLU(inplace=inplace)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            h = self.act(self.conv1(x))
            h = self.conv2(h)
            h = torch.relu_(h) if self.inplace else torch.relu(h)
            h = h + 1.0
            h = h.relu_() if self.inplace else h.relu()
            return self.fc(h.mean((2, 3)))

    torch.manual_seed(0)
    a, b = Net(True), Net(False)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 2, 6, 6)
    la = lcnnify(a, example_inputs=x)
    lb = lcnnify(b, example_inputs=x)
    acts = [m for m in la.modules() if isinstance(m, CenteredSoftplus)]
    assert len(acts) == 3 and all(m.inplace for m in acts)
    assert not any(m.inplace for m in lb.modules() if isinstance(m, CenteredSoftplus))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = la(xa), lb(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-7)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-7)


def test_an_inplace_op_on_a_converted_activation_output_does_not_break_backward():
    """torchvision mobilenet_v3's head: Hardswish(inplace=True) then Dropout(inplace=True). The centered
    softplus keeps its output for backward, so the dropout must not overwrite it; values keep the aliasing."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Hardswish(inplace=True), nn.Dropout(0.2, inplace=True),
                        nn.Linear(16, 3))

    class Methods(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(12, 16), nn.Linear(16, 3)

        def forward(self, x):
            h = torch.relu(self.fc1(x.flatten(1)))
            h.mul_(2.0)
            return self.fc2(h) + h.sum(1, keepdim=True)

    x = torch.randn(8, 3, 4)
    for model in (net, Methods()):
        lc = lcnnify(model, example_inputs=x).train()
        lc(x).square().sum().backward()  # raised "modified by an inplace operation" before
        lc.eval()
        with torch.no_grad():
            y1, y2 = lc(x), lc(x)
        torch.testing.assert_close(y1, y2)
