"""Mixed precision (autocast) on every device this machine has: CPU bfloat16 always, CUDA float16 (with a
GradScaler) and bfloat16 where a GPU is present.

What must hold under autocast: activations come out in the autocast dtype but are computed in float32; the
power iteration and sigma stay float32 (so the eval operator norms keep their bound after training in
reduced precision); a training step gives the float32 step's loss and gradients up to the reduced
precision's rounding. The operator norms are checked against an independent dense computation (the
singular values of the conv's Jacobian).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lcnnify import lcnnify, param_groups
from lcnnify.nn import CenteredSoftplus

LOG2 = math.log(2.0)

CASES = [("cpu", torch.bfloat16)]
if torch.cuda.is_available():
    CASES += [("cuda", torch.float16), ("cuda", torch.bfloat16)]
IDS = [f"{d}-{str(t).split('.')[-1]}" for d, t in CASES]


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def _data(device: str, n: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 12, 12, generator=g).to(device), torch.randint(0, 5, (n,), generator=g).to(device)


def _step(model, opt, x, y, dtype, scaler=None):
    opt.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        loss = F.cross_entropy(model(x), y) + model.curvature_penalty()
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    else:
        loss.backward()
    grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return loss.detach().float(), grads


@pytest.mark.parametrize("device,dtype", CASES, ids=IDS)
def test_centered_softplus_under_autocast_returns_the_input_dtype_computed_in_float32(device, dtype):
    x = (torch.randn(4096, device=device) * 4).to(dtype)
    act = CenteredSoftplus(3.0).to(device)
    xr = x.clone().requires_grad_(True)
    with torch.autocast(device, dtype=dtype):
        y = act(xr)
    assert y.dtype == dtype
    xd = x.double().cpu()
    want = F.softplus(3.0 * xd) / 3.0 - LOG2 / 3.0
    # exact value of the low-precision input, rounded once to the output dtype: at most half an ulp of it
    ulp = torch.finfo(dtype).eps
    assert ((y.double().cpu() - want).abs() <= ulp * want.abs() + 1e-30).all()
    (gx,) = torch.autograd.grad(y.float().sum(), xr)
    assert gx.dtype == dtype
    assert torch.allclose(gx.double().cpu(), torch.sigmoid(3.0 * xd), rtol=ulp, atol=ulp * 0.5)


@pytest.mark.parametrize("device,dtype", CASES, ids=IDS)
def test_training_step_under_autocast_matches_the_float32_step(device, dtype):
    base = lcnnify(_net(), example_inputs=torch.randn(2, 3, 12, 12)).to(device)
    x, y = _data(device)
    results = []
    for amp in (None, dtype):
        m = copy.deepcopy(base)
        opt = torch.optim.SGD(param_groups(m, 5e-4), lr=0.05, momentum=0.9)
        scaler = torch.amp.GradScaler(device) if amp is torch.float16 else None
        results.append(_step(m, opt, x, y, amp, scaler))
        for name, buf in m.named_buffers():  # power-iteration state and BN statistics stay float32
            assert buf.dtype in (torch.float32, torch.int64), name
    (l32, g32), (lamp, gamp) = results
    assert torch.isfinite(lamp) and abs(lamp.item() - l32.item()) <= 0.02 * abs(l32.item()) + 1e-3
    for a, b in zip(g32, gamp):
        assert torch.isfinite(b).all()
        cos = F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()
        assert cos > 0.98 or a.norm() < 1e-6, cos


def _dense_operator_norm(conv: nn.Conv2d, shape: tuple[int, ...]) -> float:
    """Largest singular value of the conv's Jacobian (its linear map on inputs of `shape`), float64."""
    w = conv.weight.detach().double().cpu()

    def f(v):
        return F.conv2d(v.reshape(1, *shape), w, None, conv.stride, conv.padding, conv.dilation, conv.groups)

    jac = torch.autograd.functional.jacobian(f, torch.zeros(math.prod(shape), dtype=torch.float64))
    return torch.linalg.matrix_norm(jac.reshape(-1, math.prod(shape)), ord=2).item()


@pytest.mark.parametrize("device,dtype", CASES, ids=IDS)
def test_eval_operator_norms_stay_within_one_after_training_under_autocast(device, dtype):
    m = lcnnify(_net(), example_inputs=torch.randn(2, 3, 12, 12)).to(device)
    opt = torch.optim.SGD(param_groups(m, 5e-4), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler(device) if dtype is torch.float16 else None
    for s in range(6):
        x, y = _data(device, seed=10 + s)
        _step(m, opt, x, y, dtype, scaler)
    m.eval()
    shapes = {}
    hooks = [mod.register_forward_pre_hook(lambda mod, inp, n=n: shapes.__setitem__(n, tuple(inp[0].shape[1:])))
             for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)]
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        out = m(_data(device)[0])
    for h in hooks:
        h.remove()
    assert out.dtype == dtype and torch.isfinite(out).all()
    convs = {n: mod for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)}
    assert len(convs) == 2 and set(shapes) == set(convs)
    for n, conv in convs.items():
        with torch.no_grad():
            norm = _dense_operator_norm(conv, shapes[n])
        assert norm <= 1.0 + 1e-3, (n, norm)
