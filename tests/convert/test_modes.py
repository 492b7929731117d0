"""Train/eval modes: functional dropout follows the module's mode; every submodule's own flag survives conversion.

The reference for what the converted model must do is the eager original model itself (same flags) or the
closed form of dropout: in train mode y = x * m / (1 - p) with m in {0, 1}, in eval mode y = x.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lcnnify import lcnnify, validate
from lcnnify._utils import modes_preserved
from lcnnify.convert.trace import compare_traces, trace
from lcnnify.nn import LipschitzBatchNorm

RELU_ONLY = dict(spectral_norm_conv=False, spectral_norm_linear=False, lipschitz_batchnorm=False)


def _dropout_between(model: nn.Module, before: nn.Module, after: nn.Module, x: torch.Tensor):
    """(output of ``before``, input of ``after``) of one forward: what the dropout between them did."""
    seen = {}
    h1 = before.register_forward_hook(lambda m, i, o: seen.__setitem__("a", o.detach().clone()))
    h2 = after.register_forward_pre_hook(lambda m, i: seen.__setitem__("b", i[0].detach().clone()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h1.remove()
        h2.remove()
    return seen["a"], seen["b"]


def _assert_dropped(a: torch.Tensor, b: torch.Tensor, p: float) -> None:
    """b = a * m / (1 - p) for a 0/1 mask m with both values present (dropout in train mode)."""
    kept = b != 0
    assert (~kept & (a != 0)).any() and kept.any()
    torch.testing.assert_close(b[kept], a[kept] / (1 - p))


# ------------------------------------------------------------------------------------- functional dropout
def test_timm_efficientnet_head_dropout_is_off_in_eval_and_on_in_train():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", num_classes=10, drop_rate=0.5)
    lc = lcnnify(model, spectral_norm_conv=False)  # (the convs' power iterations are beside the point here)
    assert not lc.lcnn_report.fallbacks  # one traced graph serves both modes
    x = torch.randn(2, 3, 16, 16)
    lc.eval()
    with torch.no_grad():
        y1, y2 = lc(x), lc(x)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    a, b = _dropout_between(lc, lc.global_pool.flatten, lc.classifier, x)
    torch.testing.assert_close(b, a, rtol=0, atol=0)  # eval: the classifier sees the pooled features
    lc.train()
    torch.manual_seed(1)
    a, b = _dropout_between(lc, lc.global_pool.flatten, lc.classifier, x)
    _assert_dropped(a, b, 0.5)


class _HeadDropout(nn.Module):
    def __init__(self, keyword: bool, negate: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3)
        self.head = nn.Linear(16, 3)
        self.keyword, self.negate = keyword, negate

    def forward(self, x):
        h = F.relu(self.conv(x)).mean((2, 3))
        flag = (not self.training) if self.negate else self.training
        h = F.dropout(h, p=0.5, training=flag) if self.keyword else F.dropout(h, 0.5, flag)
        return self.head(h)


@pytest.mark.parametrize("keyword", [False, True])
def test_functional_dropout_training_argument_follows_the_mode(keyword):
    torch.manual_seed(0)
    lc = lcnnify(_HeadDropout(keyword))
    x = torch.randn(4, 1, 6, 6)
    lc.eval()
    a, b = _dropout_between(lc, lc.relu, lc.head, x)
    torch.testing.assert_close(b, a.mean((2, 3)), rtol=0, atol=0)
    lc.train()
    a, b = _dropout_between(lc, lc.relu, lc.head, x)
    _assert_dropped(a.mean((2, 3)), b, 0.5)
    assert any("reads '<root>'.training" in n for n in lc.lcnn_report.notes)  # and the report says so


def test_negated_training_flag_is_bound_as_its_negation():
    torch.manual_seed(0)
    lc = lcnnify(_HeadDropout(keyword=True, negate=True))
    x = torch.randn(4, 1, 6, 6)
    lc.train()  # `not self.training` is False: no dropout
    a, b = _dropout_between(lc, lc.relu, lc.head, x)
    torch.testing.assert_close(b, a.mean((2, 3)), rtol=0, atol=0)
    lc.eval()
    a, b = _dropout_between(lc, lc.relu, lc.head, x)
    _assert_dropped(a.mean((2, 3)), b, 0.5)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 1)

    def forward(self, x):
        return F.dropout(F.relu(self.conv(x)), 0.5, training=self.training)


class _Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 1)
        self.block = _Block()

    def forward(self, x):
        return self.block(self.stem(x)).mean((2, 3))


def test_flag_is_read_from_the_module_whose_forward_calls_dropout():
    """``self.training`` inside a traced-through submodule is THAT submodule's flag, not the root's."""
    torch.manual_seed(0)
    lc = lcnnify(_Outer(), **RELU_ONLY)
    x = torch.randn(2, 1, 5, 5)
    lc.train()
    lc.block.eval()
    a, b = _dropout_between(lc, lc.block.relu, lc, x)  # pre-hook on the root is useless; compare outputs
    with torch.no_grad():
        torch.testing.assert_close(lc(x), a.mean((2, 3)), rtol=0, atol=0)
    lc.eval()
    lc.block.train()
    with torch.no_grad():
        out, act = lc(x), F.relu(lc.block.conv(lc.stem(x)))
    assert not torch.allclose(out, act.mean((2, 3)))


class _ModeConstant(nn.Module):
    """Same ops in both modes, but a float constant / the wiring depends on the mode: no flag to bind."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.act = nn.ReLU()
        self.kind = kind

    def forward(self, x):
        h = self.act(self.conv(x))
        if self.kind == "constant":
            return h * (2.0 if self.training else 1.0)
        a, b = h[:, :1], h[:, 1:]
        return torch.cat([a, b] if self.training else [b, a], 1)


@pytest.mark.parametrize("kind", ["constant", "wiring"])
def test_traces_differing_in_arguments_or_wiring_fall_back_and_keep_both_modes(kind):
    torch.manual_seed(0)
    model = _ModeConstant(kind)
    lc = lcnnify(model, beta0=1e4, **RELU_ONLY)
    assert [f.path for f in lc.lcnn_report.fallbacks] == [""]
    x = torch.randn(2, 1, 3, 3)
    for training in (True, False):
        model.train(training)
        lc.train(training)
        with torch.no_grad():
            torch.testing.assert_close(lc(x), model(x), atol=1e-3, rtol=0)


def test_compare_traces_sees_arguments_and_wiring():
    g_train = trace(_ModeConstant("wiring"), training=True)
    g_eval = trace(_ModeConstant("wiring"), training=False)
    assert not compare_traces(g_train, g_eval).same
    assert compare_traces(g_train, trace(_ModeConstant("wiring"), training=True)).identical
    cmp = compare_traces(trace(_HeadDropout(True), training=True), trace(_HeadDropout(True), training=False))
    assert cmp.same and [(f.key, f.negated) for f in cmp.flags] == [("training", False)]


# ------------------------------------------------------------------------------------- per-module flags
class _FrozenBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def _frozen_model() -> nn.Module:
    torch.manual_seed(0)
    model = _FrozenBN().train()
    model.bn.eval()  # the user freezes one BatchNorm while the rest trains
    return model


def _flags(model: nn.Module) -> dict[str, bool]:
    return {n: m.training for n, m in model.named_modules()}


@pytest.mark.parametrize("options", [dict(), dict(per_channel_beta=True), dict(inplace=True)])
def test_a_frozen_batchnorm_stays_frozen_through_conversion(options):
    model = _frozen_model()
    before = _flags(model)
    lc = lcnnify(model, example_inputs=torch.randn(2, 1, 5, 5), **options)
    if not options.get("inplace"):
        assert _flags(model) == before
    assert isinstance(lc.bn, LipschitzBatchNorm)
    assert lc.bn.training is False and lc.bn2.training is True and lc.training is True
    stats = lc.bn.running_mean.clone()
    lc(torch.randn(4, 1, 5, 5))  # a training step of the converted model leaves the frozen statistics alone
    torch.testing.assert_close(lc.bn.running_mean, stats, rtol=0, atol=0)
    assert not torch.equal(lc.bn2.running_mean, torch.zeros(4))


def test_validate_and_trace_leave_every_flag_as_it_was():
    model = _frozen_model()
    before = _flags(model)
    validate(model, example_inputs=torch.randn(2, 1, 5, 5))
    assert _flags(model) == before
    trace(model, training=True)
    assert _flags(model) == before
    trace(model, training=False)
    assert _flags(model) == before


def test_modes_preserved_restores_each_flag_even_after_an_error():
    model = _frozen_model()
    before = _flags(model)
    with pytest.raises(RuntimeError):
        with modes_preserved(model, training=False):
            assert not any(_flags(model).values())
            raise RuntimeError("boom")
    assert _flags(model) == before
    with modes_preserved(model, training=True):
        assert all(_flags(model).values())
    assert _flags(model) == before
    dup = copy.deepcopy(model)
    with modes_preserved(dup):  # training=None: nothing changes on entry
        assert _flags(dup) == before
