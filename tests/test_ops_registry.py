"""The op registry (lcnnify.ops): the report and the bound agree on every registered op and on unknown ops.

Each case is a tiny model conv -> op -> linear head with ONE call site of the op; the conversion report
(``validate`` and ``lcnn_report``) and ``lcnnify.bound`` must say the same thing (guarantee holds <=> finite
certified bound), and that thing must be the truth written in the case (kinks, products, data-dependent
divisions, unbounded slopes void it; linear maps, structure, smooth bounded activations do not).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import lcnnify.ops as ops
from lcnnify import bound, lcnnify, validate
from lcnnify.convert.trace import LCNNTracer
from lcnnify.nn import CenteredSoftplus, LipschitzBatchNorm, LipschitzBatchNormAct

SHAPE = (2, 4, 4)


class _OpNet(nn.Module):
    """conv -> op -> flatten -> linear: one call site of the op under test on an (N, 2, 4, 4) tensor."""

    def __init__(self, op: Callable[["_OpNet", Tensor], Any], module: nn.Module | None = None) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        if module is not None:
            self.m = module
        self.op = op
        # constants as (frozen) parameters: fx records them as get_attr nodes (a buffer read in forward would
        # be copied into a fresh _tensor_constant per trace)
        const = lambda t: nn.Parameter(t, requires_grad=False)  # noqa: E731
        self.k = const(torch.randn(2, 2, 1, 1, generator=g))        # a conv weight
        self.mat = const(torch.randn(4, 4, generator=g))            # a matrix
        self.rv = const(torch.rand(2, generator=g) + 0.5)           # BN statistics
        self.rm = const(torch.randn(2, generator=g))
        self.pw = const(torch.full((2,), 0.25))                     # PReLU weight
        with torch.no_grad():
            n = self._body(torch.zeros(1, *SHAPE)).flatten(1).shape[1]
        self.head = nn.Linear(n, 3)

    def _body(self, x: Tensor) -> Tensor:
        return self.op(self, self.conv(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self._body(x).flatten(1))


def _m(module: nn.Module) -> tuple[Callable, nn.Module]:
    return (lambda net, h: net.m(h)), module


# (id, op or (op, module), voids, config overrides)
HOLDS, VOIDS = False, True
CASES: list[tuple[str, Any, bool, dict]] = [
    # ReLU family (converted)
    ("nn.ReLU", _m(nn.ReLU()), HOLDS, {}),
    ("nn.ReLU6", _m(nn.ReLU6()), HOLDS, {}),
    ("nn.LeakyReLU", _m(nn.LeakyReLU(0.2)), HOLDS, {}),
    ("nn.Softplus", _m(nn.Softplus(beta=2.0)), HOLDS, {}),
    ("F.relu", lambda n, h: F.relu(h), HOLDS, {}),
    ("F.relu-inplace", lambda n, h: F.relu(h, inplace=True), HOLDS, {}),
    ("torch.relu_", lambda n, h: torch.relu_(h), HOLDS, {}),
    ("F.relu6", lambda n, h: F.relu6(h), HOLDS, {}),
    ("F.leaky_relu", lambda n, h: F.leaky_relu(h, 0.1), HOLDS, {}),
    ("F.leaky_relu_", lambda n, h: F.leaky_relu_(h, 0.1), HOLDS, {}),
    ("F.softplus", lambda n, h: F.softplus(h), HOLDS, {}),
    ("Tensor.relu", lambda n, h: h.relu(), HOLDS, {}),
    ("Tensor.relu_", lambda n, h: h.relu_(), HOLDS, {}),
    # other activations: converted by default ...
    ("nn.SiLU", _m(nn.SiLU()), HOLDS, {}),
    ("nn.Hardswish", _m(nn.Hardswish()), HOLDS, {}),
    ("F.elu_", lambda n, h: F.elu_(h), HOLDS, {}),
    ("F.selu", lambda n, h: F.selu(h), HOLDS, {}),
    # ... and kept with smooth_activations="keep": bounded curvature holds, kinks void
    ("kept nn.SiLU", _m(nn.SiLU()), HOLDS, {"smooth_activations": "keep"}),
    ("kept nn.GELU", _m(nn.GELU()), HOLDS, {"smooth_activations": "keep"}),
    ("kept nn.Mish", _m(nn.Mish()), HOLDS, {"smooth_activations": "keep"}),
    ("kept nn.ELU", _m(nn.ELU()), HOLDS, {"smooth_activations": "keep"}),
    ("kept nn.ELU(2)", _m(nn.ELU(alpha=2.0)), VOIDS, {"smooth_activations": "keep"}),
    ("kept nn.CELU", _m(nn.CELU(2.0)), HOLDS, {"smooth_activations": "keep"}),
    ("kept nn.Hardswish", _m(nn.Hardswish()), VOIDS, {"smooth_activations": "keep"}),
    ("kept nn.SELU", _m(nn.SELU()), VOIDS, {"smooth_activations": "keep"}),
    ("kept F.silu", lambda n, h: F.silu(h), HOLDS, {"smooth_activations": "keep"}),
    ("kept F.gelu", lambda n, h: F.gelu(h), HOLDS, {"smooth_activations": "keep"}),
    ("kept F.hardswish", lambda n, h: F.hardswish(h), VOIDS, {"smooth_activations": "keep"}),
    ("kept F.mish", lambda n, h: F.mish(h), HOLDS, {"smooth_activations": "keep"}),
    ("kept F.elu", lambda n, h: F.elu(h), HOLDS, {"smooth_activations": "keep"}),
    ("kept F.elu_", lambda n, h: F.elu_(h, 3.0), VOIDS, {"smooth_activations": "keep"}),
    ("kept F.celu", lambda n, h: F.celu(h), HOLDS, {"smooth_activations": "keep"}),
    ("kept F.selu", lambda n, h: F.selu(h), VOIDS, {"smooth_activations": "keep"}),
    ("skipped nn.ReLU", _m(nn.ReLU()), VOIDS, {"skip": ("m",)}),
    ("skipped BatchNorm", _m(nn.BatchNorm2d(2)), HOLDS, {"skip": ("m",)}),
    # bounded activations kept (gates)
    ("nn.Identity", _m(nn.Identity()), HOLDS, {}),
    ("nn.Sigmoid", _m(nn.Sigmoid()), HOLDS, {}),
    ("nn.Tanh", _m(nn.Tanh()), HOLDS, {}),
    ("nn.Softsign", _m(nn.Softsign()), HOLDS, {}),
    ("nn.LogSigmoid", _m(nn.LogSigmoid()), HOLDS, {}),
    ("nn.Tanhshrink", _m(nn.Tanhshrink()), HOLDS, {}),
    ("nn.Hardsigmoid", _m(nn.Hardsigmoid()), VOIDS, {}),
    ("torch.sigmoid", lambda n, h: torch.sigmoid(h), HOLDS, {}),
    ("Tensor.sigmoid", lambda n, h: h.sigmoid(), HOLDS, {}),
    ("Tensor.sigmoid_", lambda n, h: h.sigmoid_(), HOLDS, {}),
    ("torch.tanh", lambda n, h: torch.tanh(h), HOLDS, {}),
    ("Tensor.tanh", lambda n, h: h.tanh(), HOLDS, {}),
    ("Tensor.tanh_", lambda n, h: h.tanh_(), HOLDS, {}),
    ("F.hardsigmoid", lambda n, h: F.hardsigmoid(h), VOIDS, {}),
    ("F.softsign", lambda n, h: F.softsign(h), HOLDS, {}),
    ("F.logsigmoid", lambda n, h: F.logsigmoid(h), HOLDS, {}),
    ("F.tanhshrink", lambda n, h: F.tanhshrink(h), HOLDS, {}),
    # piecewise-linear ops kept: kinks
    ("nn.Hardtanh", _m(nn.Hardtanh()), VOIDS, {}),
    ("nn.PReLU", _m(nn.PReLU()), VOIDS, {}),
    ("F.prelu", lambda n, h: F.prelu(h, n.pw), VOIDS, {}),
    ("nn.Threshold", _m(nn.Threshold(0.1, 0.1)), VOIDS, {}),
    ("F.threshold", lambda n, h: F.threshold(h, 0.1, 0.0), VOIDS, {}),
    ("F.threshold_", lambda n, h: F.threshold_(h, 0.1, 0.1), VOIDS, {}),
    ("F.hardtanh", lambda n, h: F.hardtanh(h), VOIDS, {}),
    ("F.hardtanh_", lambda n, h: F.hardtanh_(h), VOIDS, {}),
    ("torch.abs", lambda n, h: torch.abs(h), VOIDS, {}),
    ("Tensor.abs", lambda n, h: h.abs(), VOIDS, {}),
    ("Tensor.abs_", lambda n, h: h.abs_(), VOIDS, {}),
    ("torch.clamp", lambda n, h: torch.clamp(h, min=0.0), VOIDS, {}),
    ("torch.clamp_min", lambda n, h: torch.clamp_min(h, 0.0), VOIDS, {}),
    ("torch.clip", lambda n, h: torch.clip(h, -1.0, 1.0), VOIDS, {}),
    ("Tensor.clamp", lambda n, h: h.clamp(0.0, 1.0), VOIDS, {}),
    ("Tensor.clamp_", lambda n, h: h.clamp_(0.0, 1.0), VOIDS, {}),
    ("torch.sort", lambda n, h: torch.sort(h, -1)[0], VOIDS, {}),
    ("torch.topk", lambda n, h: torch.topk(h, 2)[0], VOIDS, {}),
    # linear maps
    ("nn.Conv2d", _m(nn.Conv2d(2, 3, 3)), HOLDS, {}),
    ("nn.Linear", lambda n, h: n.m(h.flatten(1)), HOLDS, {}),
    ("nn.BatchNorm2d", _m(nn.BatchNorm2d(2)), HOLDS, {}),
    ("F.conv2d", lambda n, h: F.conv2d(h, n.k), HOLDS, {}),
    ("F.linear", lambda n, h: F.linear(h, n.mat), HOLDS, {}),
    ("F.batch_norm", lambda n, h: F.batch_norm(h, n.rm, n.rv, training=False), HOLDS, {}),
    ("F.batch_norm train", lambda n, h: F.batch_norm(h, None, None, training=True), VOIDS, {}),
    ("nn.AvgPool2d", _m(nn.AvgPool2d(2)), HOLDS, {}),
    ("nn.AdaptiveAvgPool2d", _m(nn.AdaptiveAvgPool2d(1)), HOLDS, {}),
    ("nn.ReflectionPad2d", _m(nn.ReflectionPad2d(1)), HOLDS, {}),
    ("nn.Upsample", _m(nn.Upsample(scale_factor=2)), HOLDS, {}),
    ("nn.Upsample bicubic", _m(nn.Upsample(scale_factor=2, mode="bicubic")), VOIDS, {}),
    ("F.avg_pool2d", lambda n, h: F.avg_pool2d(h, 2), HOLDS, {}),
    ("F.adaptive_avg_pool2d", lambda n, h: F.adaptive_avg_pool2d(h, 1), HOLDS, {}),
    ("F.pad", lambda n, h: F.pad(h, (1, 1, 1, 1)), HOLDS, {}),
    ("F.interpolate", lambda n, h: F.interpolate(h, scale_factor=2, mode="bilinear"), HOLDS, {}),
    ("F.interpolate bicubic", lambda n, h: F.interpolate(h, scale_factor=2, mode="bicubic"), VOIDS, {}),
    ("torch.mean", lambda n, h: torch.mean(h, (2, 3)), HOLDS, {}),
    ("Tensor.sum", lambda n, h: h.sum(dim=1), HOLDS, {}),
    # structure
    ("nn.Flatten", _m(nn.Flatten()), HOLDS, {}),
    ("nn.Dropout", _m(nn.Dropout(0.3)), HOLDS, {}),
    ("F.dropout eval", lambda n, h: F.dropout(h, 0.3, training=n.training), HOLDS, {}),
    ("reshape family", lambda n, h: h.view(h.shape[0], -1).reshape(-1, 2, 4, 4).permute(0, 1, 3, 2)
     .transpose(2, 3).contiguous()[:, :1].flatten(1), HOLDS, {}),
    ("detach", lambda n, h: h.detach() + h, HOLDS, {}),
    ("sizes and constants", lambda n, h: h + torch.zeros_like(h) * h.size(1) + h.new_ones(h.shape), HOLDS, {}),
    # several inputs
    ("add", lambda n, h: h + F.relu(h), HOLDS, {}),
    ("torch.add alpha", lambda n, h: torch.add(h, F.relu(h), alpha=2.0), HOLDS, {}),
    ("sub / neg", lambda n, h: 1.0 - (-h) - F.relu(h), HOLDS, {}),
    ("cat / stack", lambda n, h: torch.stack([torch.cat([h, F.relu(h)], 1), torch.cat([h, h], 1)], 1), HOLDS, {}),
    # products
    ("mul by a constant", lambda n, h: 3.0 * h * n.rv.reshape(1, 2, 1, 1), HOLDS, {}),
    ("mul product", lambda n, h: h * torch.sigmoid(h), VOIDS, {}),
    ("div by a constant", lambda n, h: h / 2.0, HOLDS, {}),
    ("div by the input", lambda n, h: h / (h.abs() + 1.0), VOIDS, {}),
    ("matmul by a constant", lambda n, h: h @ n.mat, HOLDS, {}),
    ("matmul product", lambda n, h: h @ h.transpose(2, 3), VOIDS, {}),
    ("bmm", lambda n, h: torch.bmm(h.flatten(0, 1), h.flatten(0, 1)), VOIDS, {}),
    # voiding ops
    ("nn.MaxPool2d", _m(nn.MaxPool2d(2)), VOIDS, {}),
    ("nn.AdaptiveMaxPool2d", _m(nn.AdaptiveMaxPool2d(1)), VOIDS, {}),
    ("F.max_pool2d", lambda n, h: F.max_pool2d(h, 2), VOIDS, {}),
    ("nn.LayerNorm", _m(nn.LayerNorm([2, 4, 4])), VOIDS, {}),
    ("nn.GroupNorm", _m(nn.GroupNorm(1, 2)), VOIDS, {}),
    ("nn.InstanceNorm2d", _m(nn.InstanceNorm2d(2)), VOIDS, {}),
    ("nn.LocalResponseNorm", _m(nn.LocalResponseNorm(2)), VOIDS, {}),
    ("F.instance_norm", lambda n, h: F.instance_norm(h), VOIDS, {}),
    ("F.layer_norm", lambda n, h: F.layer_norm(h, (4,)), VOIDS, {}),
    ("F.normalize", lambda n, h: F.normalize(h, dim=1), VOIDS, {}),
    ("nn.Softmax", _m(nn.Softmax(dim=1)), VOIDS, {}),
    ("F.softmax", lambda n, h: F.softmax(h, dim=1), VOIDS, {}),
    ("torch.max", lambda n, h: torch.max(h, dim=1, keepdim=True)[0], VOIDS, {}),
    ("torch.maximum", lambda n, h: torch.maximum(h, n.rv.reshape(1, 2, 1, 1)), VOIDS, {}),
    ("torch.minimum", lambda n, h: torch.minimum(h, F.relu(h)), VOIDS, {}),
    ("torch.where", lambda n, h: torch.where(n.rv.reshape(1, 2, 1, 1) > 1.0, h, 2 * h), VOIDS, {}),
    ("torch.round", lambda n, h: torch.round(h), VOIDS, {}),
    ("pow", lambda n, h: h ** 2, VOIDS, {}),
    ("torch.exp", lambda n, h: torch.exp(h), VOIDS, {}),
    ("pos", lambda n, h: +h, HOLDS, {}),
    ("kept F.celu_", lambda n, h: F.celu_(h), HOLDS, {"smooth_activations": "keep"}),
    ("kept F.selu_", lambda n, h: F.selu_(h), VOIDS, {"smooth_activations": "keep"}),
    # LCNN layers already there
    ("CenteredSoftplus", _m(CenteredSoftplus(beta=3.0)), HOLDS, {}),
    ("LipschitzBatchNorm", _m(LipschitzBatchNorm(2)), HOLDS, {}),
    ("LipschitzBatchNormAct", _m(LipschitzBatchNormAct(2, act=CenteredSoftplus())), HOLDS, {}),
    ("LipschitzBatchNormAct kink", _m(LipschitzBatchNormAct(2, act=nn.Hardtanh())), VOIDS, {}),
    # unknown ops
    ("unknown torch.cumsum", lambda n, h: torch.cumsum(h, 1), VOIDS, {}),
    ("unknown Tensor.erf", lambda n, h: h.erf(), VOIDS, {}),
]


def _build(case: tuple[str, Any, bool, dict]) -> nn.Module:
    _, op, _, _ = case
    op, module = op if isinstance(op, tuple) else (op, None)
    if case[0] == "nn.Linear":
        module = nn.Linear(32, 5)
    return _OpNet(op, module)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_report_and_bound_agree_and_say_the_truth(case):
    name, _, voids, overrides = case
    torch.manual_seed(0)
    net = _build(case)
    x = torch.randn(2, *SHAPE)
    report = validate(net, **overrides)
    lc = lcnnify(net, example_inputs=x, **overrides)
    b = bound(lc, SHAPE)
    assert report.certified == lc.lcnn_report.certified, (name, str(report))
    assert lc.lcnn_report.certified == b.certified, (name, str(lc.lcnn_report), str(b))
    assert b.certified == (not voids), (name, str(b), str(lc.lcnn_report))
    if voids:   # both name the op; the bound short-circuits without computing any norm
        assert lc.lcnn_report.voiding and b.reasons and b.short_circuited
        assert math.isinf(b.loss_hessian)
    else:
        assert math.isfinite(b.loss_hessian) and not b.reasons


def test_every_builtin_op_has_a_case():
    """The agreement test covers the whole registry (every built-in entry is hit by some case's graph)."""
    hit: set[str] = set()
    for case in CASES:
        net = _build(case)
        gm = fx.GraphModule(net, LCNNTracer().trace(net))
        modules = dict(gm.named_modules())
        for node in gm.graph.nodes:
            spec = ops.lookup(node, modules)
            if spec is not None:
                hit.add(spec.name)
    not_covered = {s.name for s in ops.registry()} - hit
    # entries that need timm / third-party layers, or shapes the tiny net does not have
    allowed = {"timm.BatchNormAct2d", "timm.HardMish", "attention"}   # tested in the timm cases below / shapes
    assert not_covered <= allowed, sorted(not_covered - allowed)


def test_unknown_op_is_reported_as_not_analysed_and_voids_the_bound():
    net = _OpNet(lambda n, h: torch.cumsum(h, 1))
    rep = validate(net)
    assert [(x.op, x.voids) for x in rep.left if "unknown op" in x.reason] == [("torch.cumsum", True)]
    b = bound(lcnnify(net, example_inputs=torch.randn(1, *SHAPE)), SHAPE)
    assert not b.certified and any("cumsum" in r and ops.UNKNOWN_OP in r for r in b.reasons)


def test_sigmoid_inplace_is_a_kept_gate_not_a_voiding_op():
    rep = validate(_OpNet(lambda n, h: h.sigmoid_()))
    assert rep.certified
    assert [(x.op, x.voids) for x in rep.left] == [("Tensor.sigmoid_", False)]


def test_functional_elu_inplace_is_converted_and_its_readers_redirected():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = self.fc(x)
            F.elu_(h)
            return h + 1.0                 # reads the mutated h

    torch.manual_seed(0)
    lc = lcnnify(Net(), beta0=1e4, spectral_norm_linear=False)
    [site] = [c.original for c in lc.lcnn_report.converted if c.family == "activation"]
    assert site.endswith("elu_")
    x = torch.randn(4, 3)
    with torch.no_grad():
        h = lc.fc(x)
        torch.testing.assert_close(lc(x), F.relu(h) + 1.0, atol=1e-3, rtol=0)   # softplus(1e4) ~ relu


@pytest.mark.parametrize("act, kinks", [(nn.Hardswish(), (-3.0, 3.0)), (nn.SELU(), (0.0,))])
def test_hardswish_and_selu_kinks_are_real(act, kinks):
    """The registry says Hardswish and SELU have kinks: their one-sided derivatives differ there."""
    c = ops.activation_constants(act)
    assert math.isinf(c.curvature) and c.kink
    for k in kinks:
        x = torch.tensor([k - 1e-7, k + 1e-7], dtype=torch.float64, requires_grad=True)
        (d,) = torch.autograd.grad(act(x).sum(), x)
        assert abs(float(d[1] - d[0])) > 0.4
    x = torch.linspace(-6, 6, 120_001, dtype=torch.float64, requires_grad=True)
    (d,) = torch.autograd.grad(act(x).sum(), x)
    assert float(d.abs().max()) <= c.slope <= float(d.abs().max()) * 1.0001


def bump(x: Tensor) -> Tensor:
    """phi(x) = tanh(x) / 2: slope 1/2, curvature 2/(3 sqrt 3) (a user's activation function)."""
    return torch.tanh(x) / 2


torch.fx.wrap("bump")


class Bump(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return bump(x)


@pytest.mark.parametrize("where", ["module", "function"])
def test_user_registered_activation_is_analysed_by_report_and_bound(where):
    slope, curv = 0.5, 2.0 / (3.0 * math.sqrt(3.0))
    if where == "module":
        spec = ops.register_activation(Bump, slope=slope, curvature=curv)
        net = _OpNet(*_m(Bump()))
    else:
        spec = ops.register_activation(functions=[bump], slope=slope, curvature=curv)
        net = _OpNet(lambda n, h: bump(h))
    try:
        rep = validate(net)
        assert rep.certified and [x.voids for x in rep.left] == [False]     # a kept, analysed activation
        b = bound(lcnnify(net, example_inputs=torch.randn(1, *SHAPE)), SHAPE)
        assert b.certified and math.isfinite(b.loss_hessian)
    finally:
        ops.unregister(spec)
    # unregistered: an unknown op, for the report and for the bound
    rep = validate(net)
    b = bound(lcnnify(net, example_inputs=torch.randn(1, *SHAPE)), SHAPE)
    assert not rep.certified and not b.certified   # the module is traced into: bump is an unknown function


def test_user_registered_kink_converts_when_asked():
    class Step(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return torch.clamp(x, min=0.0)

    spec = ops.register_activation(Step, slope=1.0, kink="kink at 0", convert="always")
    try:
        lc = lcnnify(_OpNet(*_m(Step())), example_inputs=torch.randn(1, *SHAPE))
        assert isinstance(lc.m, CenteredSoftplus)
        kept = validate(_OpNet(*_m(Step())), skip=("m",))
        assert [(x.op, x.voids) for x in kept.left] == [("Step", True)]
    finally:
        ops.unregister(spec)


def test_register_activation_rejects_bad_input():
    with pytest.raises(ValueError, match="convert"):
        ops.register_activation(nn.ReLU, slope=1.0, convert="sometimes")
    with pytest.raises(ValueError, match="module type, functions or methods"):
        ops.register_activation(slope=1.0)


@pytest.mark.parametrize("call, inplace", [
    (lambda h: F.relu(h, True), True), (lambda h: F.relu(h), False), (lambda h: F.leaky_relu(h, 0.1, True), True),
    (lambda h: F.hardtanh(h, -1.0, 1.0, True), True), (lambda h: F.dropout(h, 0.5, True, False), False),
    (lambda h: F.dropout(h, 0.5, True, True), True), (lambda h: h.relu_(), True), (lambda h: h.clamp_(0, 1), True),
    (lambda h: torch.relu_(h), True), (lambda h: F.elu(h, 1.0, True), True), (lambda h: h.add_(1), True),
])
def test_inplace_flag_is_read_where_it_sits(call, inplace):
    gm = fx.symbolic_trace(_Wrap(call))
    node = next(n for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
    assert ops.is_inplace(node, dict(gm.named_modules())) is inplace


class _Wrap(nn.Module):
    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def test_module_inplace_attribute_is_read():
    for m, expected in ((nn.ReLU(inplace=True), True), (nn.ReLU(), False), (nn.SiLU(inplace=True), True)):
        gm = fx.GraphModule(_Wrap(m), LCNNTracer().trace(_Wrap(m)))
        node = next(n for n in gm.graph.nodes if n.op == "call_module")
        assert ops.is_inplace(node, dict(gm.named_modules())) is expected


@pytest.mark.parametrize("name, act, voids", [("BatchNormAct2d", "relu", False), ("BatchNormAct2d", "hard_mish", False),
                                              ("kept HardMish", "hard_mish", True)])
def test_timm_fused_and_activation_layers_agree(name, act, voids):
    timm_layers = pytest.importorskip("timm.layers")
    if name == "kept HardMish":
        net = _OpNet(*_m(timm_layers.get_act_layer("hard_mish")()))
        overrides = {"smooth_activations": "keep"}
    else:
        net = _OpNet(*_m(timm_layers.BatchNormAct2d(2, act_layer=act)))
        overrides = {}
    rep = validate(net, **overrides)
    b = bound(lcnnify(net, example_inputs=torch.randn(1, *SHAPE), **overrides), SHAPE)
    assert rep.certified == b.certified == (not voids), (str(rep), str(b))
