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


# ---------------------------------------------------------------- plain torch only: TorchScript, trace, export
import io  # noqa: E402
import math  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lcnnify.errors import ConversionError  # noqa: E402
from lcnnify.export import FrozenCenteredSoftplus  # noqa: E402
from lcnnify.nn import CenteredSoftplus, conv_spectral_norm, find_conv_spectral_norm, find_spectral_norm  # noqa: E402


def test_frozen_model_scripts_traces_saves_and_exports(tiny_cnn):
    lc = _trained_lcnn(tiny_cnn)
    frozen = lcnnify.freeze(lc)
    assert not any(isinstance(m, CenteredSoftplus) for m in frozen.modules())
    assert any(isinstance(m, FrozenCenteredSoftplus) for m in frozen.modules())
    x = torch.randn(3, 1, 8, 8)
    ref = frozen(x)
    torch.testing.assert_close(ref, lc(x), rtol=1e-5, atol=1e-6)
    scripted = torch.jit.script(frozen)
    torch.testing.assert_close(scripted(x), ref, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.jit.save(torch.jit.trace(frozen, x), buf)
    buf.seek(0)
    torch.testing.assert_close(torch.jit.load(buf)(x), ref, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.jit.save(scripted, buf)
    buf.seek(0)
    x5 = torch.randn(5, 1, 8, 8)  # a scripted model is not tied to the batch size it was made with
    torch.testing.assert_close(torch.jit.load(buf)(x5), frozen(x5), rtol=0, atol=0)


def _softplus64(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """float64 reference: relu(x) + log1p(expm1(-beta |x|) / 2) / beta (no cancellation, no overflow)."""
    x, beta = x.double(), beta.double()
    return torch.relu(x) + torch.log1p(torch.expm1(-beta * x.abs()) / 2) / beta


@settings(max_examples=40, deadline=None)
@given(log_beta=st.floats(math.log(1e-4), math.log(1e4)), seed=st.integers(0, 2 ** 16),
       per_channel=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_frozen_centered_softplus_matches_the_float64_formula_and_the_module(log_beta, seed, per_channel, dtype):
    torch.manual_seed(seed)
    act = CenteredSoftplus(beta=math.exp(log_beta), num_channels=3 if per_channel else None)
    if per_channel:
        with torch.no_grad():
            act.log_beta.add_(torch.randn(3))
    frozen = FrozenCenteredSoftplus.from_centered_softplus(act)
    x = torch.cat([torch.randn(2, 3, 50) * 10.0 ** float(k) for k in range(-6, 5)], dim=2)
    x[..., 0] = 0.0
    x[..., 1] = 1e4
    x[..., 2] = -1e4
    x = x.to(dtype)
    y = frozen(x)
    beta = frozen.beta.double().view(1, -1, 1) if per_channel else frozen.beta.double()
    y64 = _softplus64(x, beta)
    eps = torch.finfo(dtype).eps
    scale = torch.relu(x.double()) + (y64 - torch.relu(x.double())).abs()  # the sizes of the two terms
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert ((y.double() - y64).abs() <= 8 * eps * scale + 1e-300).all()
    assert torch.equal(y[..., 0], torch.zeros_like(y[..., 0]))
    with torch.no_grad():
        y_mod = act(x)
    assert ((y.double() - y_mod.double()).abs() <= 16 * eps * scale + 1e-300).all()


def test_frozen_centered_softplus_scripts_and_keeps_low_precision_dtypes():
    frozen = FrozenCenteredSoftplus(torch.tensor([0.5, 2.0, 40.0]), num_channels=3, channel_dim=-1)
    scripted = torch.jit.script(frozen)
    x = torch.randn(4, 5, 3)
    torch.testing.assert_close(scripted(x), frozen(x), rtol=0, atol=0)
    xb = x.bfloat16()
    assert scripted(xb).dtype == torch.bfloat16
    torch.testing.assert_close(scripted(xb), frozen(xb.float()).bfloat16(), rtol=0, atol=0)


def _dense_norm(conv: nn.Module, shape, weight=None) -> float:
    """Exact operator norm of the conv (no bias) on inputs of ``shape``: the dense matrix's top singular value."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    x = F.pad(basis, conv._reversed_padding_repeated_twice, mode="constant" if conv.padding_mode == "zeros"
              else conv.padding_mode)
    w = conv.weight if weight is None else weight
    with torch.no_grad():
        out = F.conv2d(x, w.detach().double(), None, conv.stride, 0, conv.dilation, conv.groups)
    return torch.linalg.matrix_norm(out.reshape(n, -1), 2).item()


def test_freeze_converges_every_spectral_norm_and_leaves_the_original_alone(tiny_cnn):
    torch.manual_seed(0)
    lc = lcnnify.lcnnify(tiny_cnn, example_inputs=torch.randn(1, 1, 8, 8))
    opt = torch.optim.SGD(lc.parameters(), lr=2.0)  # big steps: the 1-iteration training estimate lags
    for _ in range(4):
        opt.zero_grad()
        lc(torch.randn(8, 1, 8, 8)).logsumexp(1).mean().backward()
        opt.step()
    lc.train()
    before = {k: v.clone() for k, v in lc.state_dict().items()}
    layers = [(n, m) for n, m in lc.named_modules() if find_spectral_norm(m) is not None]
    # the weights as the last training step normalized them (raw / training sigma) are not at norm 1 +- 1e-3
    lag = max(_dense_norm(m, sn.input_shape, m.parametrizations.weight.original / sn.sigma)
              for _, m in layers if (sn := find_conv_spectral_norm(m)) is not None)
    assert lag > 1 + 1e-3
    frozen = lcnnify.freeze(lc)
    for name, m in layers:
        fm = frozen.get_submodule(name)
        sn = find_spectral_norm(m)
        if find_conv_spectral_norm(m) is not None:
            s = _dense_norm(fm, sn.input_shape)
        else:
            s = torch.linalg.matrix_norm(fm.weight.detach().double(), 2).item()
        assert s == pytest.approx(1.0, abs=1e-3), (name, s)
    # the original: same state (also u, v), still in training mode, still an LCNN
    after = lc.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert lc.training and all(find_spectral_norm(m) is not None for _, m in layers)


def test_freeze_refuses_a_spectral_norm_that_never_saw_an_input():
    model = nn.Sequential(conv_spectral_norm(nn.Conv2d(1, 2, 3)), nn.Flatten())
    with pytest.raises(ConversionError, match=r"'0\.weight'.*never seen an input.*forward pass"):
        lcnnify.freeze(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(torch.randn(1, 1, 5, 5))
    assert lcnnify.freeze(model)(torch.randn(1, 1, 5, 5)).shape == (1, 18)
