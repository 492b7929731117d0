"""timm's fused / exotic layers convert to what they really apply (issue: zoo)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

timm_layers = pytest.importorskip("timm.layers")

from lcnnify import lcnnify  # noqa: E402
from lcnnify.nn import CenteredSoftplus, LipschitzBatchNorm, WeightStandardization  # noqa: E402
from lcnnify.nn.batchnorm_act import LipschitzBatchNormAct  # noqa: E402


def _dense_norm(fn, shape) -> float:
    """Top singular value of the linear part of fn (fn(x) - fn(0)) on inputs of ``shape``."""
    n = int(torch.tensor(shape).prod())
    eye = torch.eye(n).reshape(n, *shape)
    with torch.no_grad():
        cols = (fn(eye) - fn(torch.zeros(1, *shape))).reshape(n, -1)
    return torch.linalg.matrix_norm(cols, ord=2).item()


@given(size=st.integers(5, 9), stride=st.sampled_from([1, 2]), k=st.sampled_from([2, 3, 4]))
def test_conv2d_same_is_normalized_with_its_dynamic_padding(size, stride, k):
    torch.manual_seed(size)
    net = nn.Sequential(timm_layers.Conv2dSame(2, 3, k, stride=stride), nn.ReLU())
    lc = lcnnify(net, example_inputs=torch.randn(1, 2, size, size)).eval()
    conv = lc.get_submodule("0")
    assert _dense_norm(conv, (2, size, size)) == pytest.approx(1.0, abs=1e-2)


@pytest.mark.parametrize("cls", ["ScaledStdConv2dSame", "ScaledStdConv2d", "StdConv2d", "StdConv2dSame"])
def test_weight_standardized_convs_normalize_the_standardized_weight(cls):
    torch.manual_seed(0)
    conv_cls = getattr(timm_layers, cls)
    kwargs = {"padding": "same"} if cls.endswith("Same") else {}
    orig = conv_cls(3, 4, 3, stride=2, **kwargs)
    net = nn.Sequential(orig, nn.ReLU())
    x = torch.randn(1, 3, 7, 7)
    lc = lcnnify(net, example_inputs=x).eval()
    conv = lc.get_submodule("0")
    chain = list(conv.parametrizations["weight"])
    assert isinstance(chain[0], WeightStandardization)
    assert _dense_norm(conv, (3, 7, 7)) == pytest.approx(1.0, abs=1e-2)
    # the standardized direction is kept: conv.weight is a positive multiple of timm's standardized weight
    with torch.no_grad():
        ref = F.batch_norm(orig.weight.reshape(1, 4, -1), None, None,
                           weight=(orig.gain * orig.scale).view(-1) if hasattr(orig, "gain") else None,
                           training=True, momentum=0.0, eps=orig.eps).reshape_as(orig.weight)
        ratio = conv.weight / ref
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-3)


def test_batchnorm_act_keeps_its_activation():
    torch.manual_seed(0)
    bna = timm_layers.BatchNormAct2d(4, act_layer=nn.ReLU)
    bna.running_var.uniform_(0.5, 2)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), bna)
    lc = lcnnify(net, beta0=1e4, spectral_norm_conv=False).eval()
    new = lc.get_submodule("1")
    assert isinstance(new, LipschitzBatchNormAct) and isinstance(new.act, CenteredSoftplus)
    x = torch.randn(2, 1, 6, 6)
    net.eval()
    torch.testing.assert_close(lc(x), net(x), atol=1e-3, rtol=0)  # gamma=10 >= L: same map, act included
    assert (lc(x) > -1e-3).all()  # the activation really runs


def test_groupnorm_act_converts_its_activation_and_reports_the_norm():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), timm_layers.GroupNormAct(4, 2, act_layer=nn.ReLU))
    lc = lcnnify(net)
    assert isinstance(lc.get_submodule("1").act, CenteredSoftplus)
    assert any(x.op == "GroupNormAct" and x.voids for x in lc.lcnn_report.left)


def test_frozen_batchnorm_becomes_a_frozen_lipschitz_batchnorm():
    from torchvision.ops import FrozenBatchNorm2d

    fbn = FrozenBatchNorm2d(4)
    fbn.running_var.uniform_(1, 2)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), fbn, nn.ReLU())
    lc = lcnnify(net)
    bn = lc.get_submodule("1")
    assert isinstance(bn, LipschitzBatchNorm) and bn.frozen and not bn.weight.requires_grad
    torch.testing.assert_close(bn.running_var, fbn.running_var)


def test_eca_conv1d_and_mixed_conv_are_normalized():
    torch.manual_seed(0)
    net = nn.Sequential(timm_layers.MixedConv2d(4, 4, kernel_size=[3, 5]), nn.ReLU(),
                        timm_layers.EcaModule(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    lc = lcnnify(nn.Sequential(nn.Conv2d(1, 4, 1), *net), example_inputs=torch.randn(1, 1, 8, 8))
    kinds = {type(m).__name__ for m in lc.modules() if hasattr(m, "parametrizations")}
    assert {"ParametrizedConv1d", "ParametrizedConv2d", "ParametrizedLinear"} <= kinds
    assert not any(isinstance(m, (nn.Conv1d, nn.Conv2d)) and not hasattr(m, "parametrizations")
                   for m in lc.modules())
