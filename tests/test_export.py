"""freeze(): plain torch layers computing exactly the LCNN's eval-mode map."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

import lcnnify
from lcnnify.nn import LipschitzBatchNorm


def _trained_lcnn(tiny_cnn):
    lc = lcnnify.lcnnify(tiny_cnn, example_inputs=torch.randn(1, 1, 8, 8), gamma0=1.0)
    opt = torch.optim.SGD(lcnnify.param_groups(lc, 5e-4), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        (lc(torch.randn(8, 1, 8, 8)).logsumexp(1).mean() + lc.curvature_penalty()).backward()
        opt.step()
    for m in lc.modules():
        if isinstance(m, LipschitzBatchNorm):
            m.running_var.fill_(0.25)  # L = |w| / 0.5 ~ 2 > gamma: the clipping is active
    return lc.eval()


def test_frozen_model_matches_eval_outputs_and_has_no_lcnn_machinery(tiny_cnn):
    lc = _trained_lcnn(tiny_cnn)
    frozen = lcnnify.freeze(lc)
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(frozen(x), lc(x), rtol=1e-5, atol=1e-6)
    assert not any(parametrize.is_parametrized(m) for m in frozen.modules())
    assert not any(isinstance(m, LipschitzBatchNorm) for m in frozen.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert not hasattr(frozen, "curvature_penalty")
    assert hasattr(lc, "curvature_penalty")  # the original is untouched
    # gamma = 1 < L: the clipped scale really is baked into the BN weight
    assert any(not torch.allclose(b.weight, a.weight) for a, b in zip(
        [m for m in lc.modules() if isinstance(m, LipschitzBatchNorm)],
        [m for m in frozen.modules() if isinstance(m, nn.BatchNorm2d)]))


def test_frozen_model_exports_with_torch_export(tiny_cnn):
    frozen = lcnnify.freeze(_trained_lcnn(tiny_cnn))
    x = torch.randn(2, 1, 8, 8)
    ep = torch.export.export(frozen, (x,))
    torch.testing.assert_close(ep.module()(x), frozen(x), rtol=1e-5, atol=1e-6)
