"""lcnnify.bound: the data-free Lipschitz / curvature bound (paper §3.2, Theorem 1).

The property tests build random small architectures, convert them, perturb them (random betas, gammas, BN
statistics, a few training steps) and check bound >= measured, where "measured" uses EXACT Jacobians and
Hessians (the inputs are tiny) at random inputs and at inputs optimized to maximize the Jacobian norm.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lcnnify import bound, lcnnify
from lcnnify.bounds import Bound, activation_constants, conv_norm_bound
from lcnnify.nn import CenteredSoftplus, LipschitzBatchNorm, find_conv_spectral_norm
from lcnnify.nn import ConvGeometry

DT = torch.float64


# ==========================================================================================================
# exact measurements on tiny models


def _jacobian(f, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """(m, d) Jacobian of f at one input x (shape (1, *in)), one backward per output."""
    x = x.detach().requires_grad_(True) if not x.requires_grad else x
    y = f(x).reshape(-1)
    rows = [torch.autograd.grad(y[k], x, retain_graph=True, create_graph=create_graph)[0].reshape(-1)
            for k in range(y.numel())]
    return torch.stack(rows)


def _hessians(f, x: torch.Tensor) -> torch.Tensor:
    """(m, d, d) exact Hessians of every output of f at x: the d rows of each Hessian come from one batched
    double backward (the batch holds d copies of x; samples do not interact in eval mode)."""
    d = x.numel()
    X = x.detach().reshape(1, -1).repeat(d, 1).reshape(d, *x.shape[1:]).requires_grad_(True)
    Y = f(X).reshape(d, -1)
    eye = torch.eye(d, dtype=x.dtype).reshape(d, *x.shape[1:])
    out = []
    for k in range(Y.shape[1]):
        (g,) = torch.autograd.grad(Y[:, k].sum(), X, create_graph=True)
        (h,) = torch.autograd.grad((g * eye).sum(), X, retain_graph=True)
        out.append(h.reshape(d, d))
    return torch.stack(out)


def _loss_hessian(f, x: torch.Tensor, y: int) -> torch.Tensor:
    d = x.numel()
    X = x.detach().reshape(1, -1).repeat(d, 1).reshape(d, *x.shape[1:]).requires_grad_(True)
    loss = F.cross_entropy(f(X).reshape(d, -1), torch.full((d,), y), reduction="sum")
    (g,) = torch.autograd.grad(loss, X, create_graph=True)
    eye = torch.eye(d, dtype=x.dtype).reshape(d, *x.shape[1:])
    (h,) = torch.autograd.grad((g * eye).sum(), X)
    return h.reshape(d, d)


def _tensor_norm_lower(H: torch.Tensor, n_random: int = 64, refine: int = 10) -> float:
    """A lower bound of sup_{|w|=1} ||sum_k w_k H_k||_2: the e_k, random unit w, then a higher-order power
    refinement w <- (u^T H_k u)_k from the best start."""
    m = H.shape[0]
    g = torch.Generator().manual_seed(0)
    W = torch.cat([torch.eye(m, dtype=H.dtype), torch.randn(n_random, m, generator=g, dtype=H.dtype)])
    W = W / W.norm(dim=1, keepdim=True)
    ev = torch.linalg.eigvalsh(torch.einsum("bk,kij->bij", W, H)).abs().amax(-1)
    best = float(ev.max())
    w = W[int(ev.argmax())]
    for _ in range(refine):
        vals, vecs = torch.linalg.eigh(torch.einsum("k,kij->ij", w, H))
        u = vecs[:, int(vals.abs().argmax())]
        w = torch.einsum("i,kij,j->k", u, H, u)
        if float(w.norm()) == 0.0:
            break
        w = w / w.norm()
        best = max(best, float(torch.linalg.eigvalsh(torch.einsum("k,kij->ij", w, H)).abs().max()))
    return best


def _ascend_jacobian(f, x0: torch.Tensor, steps: int = 6, lr: float = 0.3) -> torch.Tensor:
    """Gradient ascent on ||J(x)||_2 from x0 (makes the Lipschitz check bite)."""
    x = x0.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    for _ in range(steps):
        s = torch.linalg.matrix_norm(_jacobian(f, x, create_graph=True), 2)
        opt.zero_grad()
        (-s).backward()
        opt.step()
    return x.detach()


def _measure(model: nn.Module, shape: tuple[int, ...], n_random: int = 2, ascent: bool = True,
             seed: int = 0, n_labels: int = 2) -> dict[str, float]:
    """Exact Jacobian / Hessian norms at x = 0, at random inputs and at an input optimized for ||J||."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.zeros((1, *shape), dtype=DT)]
    xs += [s * torch.randn((1, *shape), generator=g, dtype=DT) for s in (1.0, 3.0, 0.3)[:n_random]]
    if ascent:
        xs += [_ascend_jacobian(model, xs[1])]
    out = dict(jac=0.0, hess=0.0, loss=0.0)
    m = None
    for x in xs:
        J = _jacobian(model, x)
        m = J.shape[0]
        out["jac"] = max(out["jac"], float(torch.linalg.matrix_norm(J, 2)))
        out["hess"] = max(out["hess"], _tensor_norm_lower(_hessians(model, x)))
        for y in range(min(m, n_labels)):
            out["loss"] = max(out["loss"], float(torch.linalg.eigvalsh(_loss_hessian(model, x, y)).abs().max()))
    return out


def _check(b: Bound, meas: dict[str, float], rel: float = 1e-7) -> None:
    assert meas["jac"] <= b.lipschitz * (1 + rel) + 1e-12, (b, meas)
    assert meas["hess"] <= b.logit_hessian * (1 + rel) + 1e-12, (b, meas)
    assert meas["loss"] <= b.loss_hessian * (1 + rel) + 1e-12, (b, meas)


# ==========================================================================================================
# random architectures


class _Res(nn.Module):
    def __init__(self, c: int, k: int, mode: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, k, padding=k // 2, padding_mode=mode)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c, c, k, padding=k // 2, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + x)


class _Cat(nn.Module):
    def __init__(self, c: int, w: int, k: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, w, k, padding=k // 2)
        self.bn = nn.BatchNorm2d(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, F.relu(self.bn(self.conv(x)))], 1)


class _KwRes(nn.Module):
    """x + alpha * branch(x) written with keyword operands: torch.add(input=x, other=..., alpha=...)."""

    def __init__(self, c: int, alpha: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.relu = nn.ReLU()
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.add(input=x, other=self.relu(self.conv(x)), alpha=self.alpha)


class RandNet(nn.Module):
    """conv/BN/ReLU stacks, residual adds (also with keyword operands and alpha), concatenations, avg-pools, a
    linear head (all static structure)."""

    def __init__(self, spec: list[tuple[str, int, int, int]], in_ch: int, size: int, head: str,
                 classes: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c, s = in_ch, size
        for kind, width, k, stride in spec:
            if kind == "plain":
                blocks.append(nn.Sequential(nn.Conv2d(c, width, k, stride, k // 2), nn.BatchNorm2d(width), nn.ReLU()))
                c, s = width, (s + 2 * (k // 2) - k) // stride + 1
            elif kind == "res":
                blocks.append(_Res(c, k, "reflect" if width % 2 and s > 1 else "zeros"))
            elif kind == "kwres":
                blocks.append(_KwRes(c, 1.5 - width))
            elif kind == "cat":
                blocks.append(_Cat(c, width, k))
                c = c + width
            elif kind == "pool" and s >= 2:
                blocks.append(nn.AvgPool2d(2, ceil_mode=bool(stride - 1)))
                s = -(-s // 2) if stride - 1 else s // 2
        self.blocks = nn.Sequential(*blocks)
        self.head_kind = head
        self.fc = nn.Linear(c if head == "mean" else c * s * s, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)
        x = x.mean((2, 3)) if self.head_kind == "mean" else torch.flatten(x, 1)
        return self.fc(x)


def _perturb(model: nn.Module, g: torch.Generator, steps: int, shape: tuple[int, ...]) -> None:
    """Random betas, gammas and BN statistics (so that gamma clips or not), then a few SGD steps."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, CenteredSoftplus):
                m.log_beta.fill_(math.log(10 ** (2.0 * float(torch.rand((), generator=g)) - 0.5)))
            if isinstance(m, LipschitzBatchNorm):
                n = m.num_features
                m.running_var.copy_(0.05 + 2.0 * torch.rand(n, generator=g, dtype=DT))
                m.running_mean.copy_(torch.randn(n, generator=g, dtype=DT))
                m.weight.copy_(torch.randn(n, generator=g, dtype=DT))
                m.bias.copy_(0.3 * torch.randn(n, generator=g, dtype=DT))
                gamma = 1.0 + 4.0 * float(torch.rand((), generator=g))
                m.log_gamma_minus_1.fill_(math.log(gamma - 1.0))
    if steps:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(steps):
            x = torch.randn((8, *shape), generator=g, dtype=DT)
            y = torch.randint(0, 3, (8,), generator=g)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


_block = st.tuples(st.sampled_from(["plain", "res", "kwres", "cat", "pool"]), st.integers(1, 3), st.sampled_from([1, 3]),
                   st.integers(1, 2))


@settings(max_examples=12, deadline=None)
@given(spec=st.lists(_block, min_size=1, max_size=3), in_ch=st.integers(1, 2), size=st.integers(3, 5),
       head=st.sampled_from(["mean", "flatten"]), steps=st.integers(0, 3), seed=st.integers(0, 10_000))
def test_bound_dominates_exact_jacobian_and_hessians_on_random_converted_architectures(spec, in_ch, size, head,
                                                                                       steps, seed):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    shape = (in_ch, size, size)
    net = RandNet(spec, in_ch, size, head).to(DT)
    model = lcnnify(net, example_inputs=torch.randn((2, *shape), dtype=DT)).to(DT)
    _perturb(model, g, steps, shape)
    b = bound(model, shape)
    assert b.certified, b
    assert math.isfinite(b.lipschitz) and math.isfinite(b.logit_hessian)
    _check(b, _measure(model, shape, seed=seed, n_labels=1))


def test_bound_bites_on_a_tight_softplus_layer():
    """Measured values reach the bound where the bound is attained: the property test is not vacuous.
    (An unnormalized linear map with ||w|| = 2.5, so that L^2 and L differ.)"""
    torch.manual_seed(1)
    model = lcnnify(nn.Sequential(nn.Linear(6, 1), nn.ReLU()), example_inputs=torch.randn(2, 6),
                    spectral_norm_linear=False).to(DT).eval()
    act = model.get_submodule("1")
    with torch.no_grad():
        act.log_beta.fill_(math.log(3.0))
        lin = model.get_submodule("0")
        lin.bias.zero_()
        lin.weight.mul_(2.5 / lin.weight.norm())
    b = bound(model, (6,))
    meas = _measure(model, (6,), ascent=True)
    _check(b, meas)
    assert meas["hess"] == pytest.approx(b.logit_hessian, rel=1e-6)   # attained at x = 0
    assert meas["jac"] >= 0.9 * b.lipschitz                              # approached for large w.x


# ==========================================================================================================
# closed forms


def test_single_linear_layer_is_its_spectral_norm_with_zero_curvature():
    torch.manual_seed(0)
    model = lcnnify(nn.Sequential(nn.Linear(7, 4)), example_inputs=torch.randn(2, 7)).to(DT).eval()
    W = model.get_submodule("0").weight.detach()        # the weight the bound sees (eval mode)
    b = bound(model, (7,))
    exact = float(torch.linalg.matrix_norm(W, 2))
    assert b.lipschitz == pytest.approx(exact, rel=1e-8)
    assert b.logit_hessian == 0.0
    assert b.loss_hessian == pytest.approx(0.5 * exact ** 2, rel=1e-8)
    assert b.certified and not b.reasons
    J = _jacobian(model.eval(), torch.randn(1, 7, dtype=DT))
    assert float(torch.linalg.matrix_norm(J, 2)) == pytest.approx(b.lipschitz, rel=1e-8)


def test_softplus_after_linear_map_has_curvature_beta_over_4_times_norm_squared():
    torch.manual_seed(0)
    model = lcnnify(nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2)),
                    example_inputs=torch.randn(2, 5), per_channel_beta=True, spectral_norm_linear=False).to(DT)
    with torch.no_grad():
        model.get_submodule("1").log_beta.copy_(torch.log(torch.tensor([0.5, 7.0, 2.0])))
        model.get_submodule("0").weight.mul_(3.0)      # ||W1|| far from 1: L^2 and L differ
    W1 = float(torch.linalg.matrix_norm(model.get_submodule("0").weight.detach(), 2))
    W2 = float(torch.linalg.matrix_norm(model.get_submodule("2").weight.detach(), 2))
    b = bound(model, (5,))
    assert b.per_node["_1"][1] == pytest.approx(7.0 / 4 * W1 ** 2, rel=1e-7)      # max beta / 4 * ||W1||^2
    assert b.lipschitz == pytest.approx(W1 * W2, rel=1e-7)
    assert b.logit_hessian == pytest.approx(W2 * 7.0 / 4 * W1 ** 2, rel=1e-7)
    assert b.loss_hessian == pytest.approx(0.5 * (W1 * W2) ** 2 + math.sqrt(2) * b.logit_hessian, rel=1e-9)
    # the paper's Theorem 1 over the chain: n_act * max beta * ||W1|| (only the activation has curvature)
    assert b.theorem1 == pytest.approx(3 * 7.0 * W1, rel=1e-7)


@pytest.mark.parametrize("gamma", [1.5, 50.0])
def test_lipschitz_batchnorm_factor_is_min_of_its_gain_and_gamma(gamma):
    model = lcnnify(nn.Sequential(nn.BatchNorm1d(4)), example_inputs=torch.randn(3, 4)).to(DT).eval()
    bn = model.get_submodule("0")
    with torch.no_grad():
        bn.running_var.copy_(torch.tensor([0.01, 0.5, 1.0, 4.0], dtype=DT))
        bn.weight.copy_(torch.tensor([0.5, -2.0, 1.0, 3.0]))
        bn.log_gamma_minus_1.fill_(math.log(gamma - 1.0))
    gain = max(abs(w) / math.sqrt(v + bn.eps) for w, v in ((0.5, 0.01), (-2.0, 0.5), (1.0, 1.0), (3.0, 4.0)))
    b = bound(model, (4,))
    assert b.lipschitz == pytest.approx(min(gain, gamma), rel=1e-8)
    J = _jacobian(model, torch.randn(1, 4, dtype=DT))                  # diagonal: its norm is the gain
    assert float(torch.linalg.matrix_norm(J, 2)) == pytest.approx(b.lipschitz, rel=1e-8)


class _ResidualSoftplus(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(x)


class _ConcatSoftplus(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.act(x)], dim=1)


@pytest.mark.parametrize("beta", [0.5, 4.0])
def test_residual_add_sums_lipschitz_and_curvature(beta):
    model = lcnnify(_ResidualSoftplus(), example_inputs=torch.randn(2, 4)).to(DT).eval()
    with torch.no_grad():
        model.act.log_beta.fill_(math.log(beta))
    b = bound(model, (4,))
    assert b.lipschitz == pytest.approx(2.0, rel=1e-12)           # 1 + 1
    assert b.logit_hessian == pytest.approx(beta / 4, rel=1e-12)   # 0 + beta/4
    assert b.certified
    # attained / approached: J = I + diag(sigmoid(beta x)) -> 2 for large x; Hessian beta/4 at x = 0
    J = _jacobian(model, torch.full((1, 4), 30.0 / beta, dtype=DT))
    assert float(torch.linalg.matrix_norm(J, 2)) == pytest.approx(2.0, rel=1e-6)
    assert _tensor_norm_lower(_hessians(model, torch.zeros(1, 4, dtype=DT))) == pytest.approx(beta / 4, rel=1e-9)


@pytest.mark.parametrize("beta", [0.5, 4.0])
def test_concatenation_takes_root_sum_of_squares(beta):
    model = lcnnify(_ConcatSoftplus(), example_inputs=torch.randn(2, 4)).to(DT).eval()
    with torch.no_grad():
        model.act.log_beta.fill_(math.log(beta))
    b = bound(model, (4,))
    assert b.lipschitz == pytest.approx(math.sqrt(2.0), rel=1e-12)
    assert b.logit_hessian == pytest.approx(beta / 4, rel=1e-12)
    J = _jacobian(model, torch.full((1, 4), 30.0 / beta, dtype=DT))
    assert float(torch.linalg.matrix_norm(J, 2)) == pytest.approx(math.sqrt(2.0), rel=1e-6)
    assert _tensor_norm_lower(_hessians(model, torch.zeros(1, 4, dtype=DT))) == pytest.approx(beta / 4, rel=1e-9)


@pytest.mark.parametrize("pool, size, factor", [
    (nn.AvgPool2d(2), 4, 0.5),                     # non-overlapping k x k: 1/k
    (nn.AdaptiveAvgPool2d(1), 4, 0.25),            # global: 1/sqrt(HW)
    (nn.AdaptiveAvgPool2d(1), 3, 1 / 3),
    (nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=True), 5, None),   # overlapping: < 1
])
def test_average_pool_factor_is_its_operator_norm(pool, size, factor):
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pool = pool

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.flatten(self.pool(x), 1)

    model = torch.fx.symbolic_trace(Net())
    b = bound(model, (2, size, size))
    # the exact operator norm of the pool (dense)
    d = 2 * size * size
    A = model(torch.eye(d, dtype=DT).reshape(d, 2, size, size)).reshape(d, -1)
    exact = float(torch.linalg.matrix_norm(A, 2))
    if factor is not None:
        assert exact == pytest.approx(factor, rel=1e-12)
    assert exact <= b.lipschitz <= exact * (1 + 1e-6)
    assert b.logit_hessian == 0.0 and b.certified


def test_mean_and_scalar_multiply():
    class Net(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (-3.0 * x).mean((2, 3)) / 2.0

    b = bound(torch.fx.symbolic_trace(Net()), (2, 3, 3))
    assert b.lipschitz == pytest.approx(1.5 / 3.0, rel=1e-8)   # |-3| / 2 / sqrt(9)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = CenteredSoftplus(beta=3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.fc(x))


class _TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b1 = _Block()
        self.b2 = _Block()
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b2(self.b1(x)))


def test_untraced_and_graphmodule_submodules_are_analysed_recursively():
    torch.manual_seed(0)
    from lcnnify.convert.trace import LCNNTracer

    net = _TwoBlocks().to(DT).eval()
    flat = bound(net, (4,))                                           # traced by bound() itself

    class LeafTracer(LCNNTracer):
        def is_leaf_module(self, m: nn.Module, name: str) -> bool:
            return isinstance(m, (_Block, torch.fx.GraphModule)) or super().is_leaf_module(m, name)

    leafy = torch.fx.GraphModule(net, LeafTracer().trace(net))       # b1, b2: call_module of an untraced _Block
    b_leaf = bound(leafy, (4,))
    net.b1 = torch.fx.GraphModule(net.b1, LCNNTracer().trace(net.b1))  # b1: a GraphModule inside the graph
    nested = torch.fx.GraphModule(net, LeafTracer().trace(net))
    b_nested = bound(nested, (4,))
    for b in (b_leaf, b_nested):
        assert b.certified
        assert b.lipschitz == pytest.approx(flat.lipschitz, rel=1e-12)
        assert b.logit_hessian == pytest.approx(flat.logit_hessian, rel=1e-12)
    assert any(k.startswith("b1/") for k in b_nested.per_node)


# ==========================================================================================================
# conv operator norms: certified upper bounds, exact dense, estimates from below


def _dense_conv_norm(conv: nn.Conv2d, shape: tuple[int, ...]) -> float:
    d = math.prod(shape)
    E = torch.eye(d, dtype=DT).reshape(d, *shape)
    with torch.no_grad():
        A = F.conv2d(F.pad(E, conv._reversed_padding_repeated_twice,
                           mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode),
                     conv.weight, None, conv.stride, 0, conv.dilation, conv.groups)
    A = A.reshape(d, -1)
    G = A @ A.T if A.shape[0] <= A.shape[1] else A.T @ A
    return math.sqrt(float(torch.linalg.eigvalsh(G)[-1]))


@settings(max_examples=40, deadline=None)
@given(cin=st.integers(1, 3), cout_mult=st.integers(1, 3), groups_on=st.booleans(), k=st.integers(1, 4),
       stride=st.integers(1, 3), dilation=st.integers(1, 2), pad=st.integers(0, 2), size=st.integers(1, 7),
       mode=st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]), seed=st.integers(0, 999))
def test_conv_norm_bound_is_an_upper_bound_and_dense_is_exact(cin, cout_mult, groups_on, k, stride, dilation,
                                                              pad, size, mode, seed):
    groups = cin if groups_on else 1
    cout = groups * cout_mult
    torch.manual_seed(seed)
    ke = dilation * (k - 1) + 1
    if size + 2 * pad < ke or (mode != "zeros" and pad >= size):
        return
    conv = nn.Conv2d(cin, cout, k, stride, pad, dilation, groups, bias=False, padding_mode=mode).to(DT)
    shape = (cin, size, size)
    exact = _dense_conv_norm(conv, shape)
    geo = ConvGeometry.from_conv(conv)
    fft, _ = conv_norm_bound(conv.weight, geo, shape, method="fft")
    dense, _ = conv_norm_bound(conv.weight, geo, shape, method="dense")
    auto, _ = conv_norm_bound(conv.weight, geo, shape)
    est, _ = conv_norm_bound(conv.weight, geo, shape, certify=False, power_iterations=50)
    assert fft >= exact * (1 - 1e-9)
    assert dense == pytest.approx(exact, rel=1e-7, abs=1e-12)
    assert auto >= exact * (1 - 1e-9)
    assert est <= exact * (1 + 1e-9)


@pytest.mark.parametrize("seed", range(40))
def test_fft_bound_holds_for_single_channel_small_maps(seed):
    """Single-channel convolutions on tiny maps: where a wrapped-around circulant would be too small."""
    g = torch.Generator().manual_seed(seed)
    k, n = int(torch.randint(2, 4, (), generator=g)), int(torch.randint(1, 5, (), generator=g))
    stride, pad = int(torch.randint(1, 3, (), generator=g)), int(torch.randint(0, 3, (), generator=g))
    if n + 2 * pad < k:
        return
    conv = nn.Conv2d(1, 1, k, stride, pad, bias=False).to(DT)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=DT))
    fft, _ = conv_norm_bound(conv.weight, ConvGeometry.from_conv(conv), (1, n, n), method="fft")
    assert fft >= _dense_conv_norm(conv, (1, n, n)) * (1 - 1e-9)


def test_fft_bound_is_tight_on_larger_maps_and_used_for_them():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 3, 3, padding=1, bias=False).to(DT)
    shape = (3, 14, 14)
    exact = _dense_conv_norm(conv, shape)
    fft, how = conv_norm_bound(conv.weight, ConvGeometry.from_conv(conv), shape, dense_limit=0, rtol=0.05)
    assert "circulant" in how
    assert exact <= fft <= exact * 1.02


def test_spectrally_normalized_conv_gets_its_true_norm_not_one():
    """The bound uses the operator norm the layer really has, never the nominal 1: a raw weight below the
    spectral norm's floor (``min_sigma``) is applied as W / min_sigma, with norm sigma / min_sigma < 1."""
    from lcnnify.nn.spectral_norm import find_conv_spectral_norm

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 2))
    model = lcnnify(net, example_inputs=torch.randn(1, 2, 4, 4)).to(DT)
    conv = model.get_submodule("0")
    floor = find_conv_spectral_norm(conv).min_sigma
    with torch.no_grad():
        w = conv.parametrizations.weight.original
        plain = nn.Conv2d(2, 3, 3, padding=1, bias=False).to(DT)
        plain.weight.copy_(w)
        w.mul_(0.3 * floor / _dense_conv_norm(plain, (2, 4, 4)))
    model.eval()
    exact = _dense_conv_norm(conv, (2, 4, 4))
    assert 0.2 < exact < 0.4            # below the floor: not normalized to 1
    b = bound(model, (2, 4, 4))
    assert b.per_node["_0"][0] == pytest.approx(exact, rel=1e-6)
    est = bound(model, (2, 4, 4), certify=False)
    assert not est.certified and any("estimate" in r for r in est.reasons)


# ==========================================================================================================
# activation constants


@pytest.mark.parametrize("act", [nn.SiLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.Mish(), nn.Sigmoid(),
                                 nn.Tanh(), nn.Softsign(), nn.LogSigmoid(), nn.ELU(), nn.CELU(2.0),
                                 nn.Softplus(beta=3.0), CenteredSoftplus(beta=7.0)])
def test_activation_constants_bound_the_derivatives_and_are_tight(act):
    slope, curv = activation_constants(act)
    x = torch.linspace(-40, 40, 400_001, dtype=DT, requires_grad=True)
    y = act.to(DT)(x)
    (d1,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), x)
    s, c = float(d1.detach().abs().max()), float(d2.abs().max())
    assert s <= slope and c <= curv
    assert s >= 0.999 * slope and c >= 0.999 * curv


# ==========================================================================================================
# voiding ops


def _reasons(b: Bound) -> str:
    return "\n".join(b.reasons)


def test_max_pool_voids_curvature_keeps_its_lipschitz_factor():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.Flatten(),
                        nn.Linear(2 * 4 * 4, 2))
    model = lcnnify(net, example_inputs=torch.randn(1, 1, 8, 8)).to(DT)
    b = bound(model, (1, 8, 8), full=True)
    assert not b.certified and math.isinf(b.logit_hessian) and math.isinf(b.loss_hessian)
    assert math.isfinite(b.lipschitz)
    assert "_2 [2: MaxPool2d]" in _reasons(b) and "max-pool" in _reasons(b)
    # a 3x3 / stride-2 max-pool: an element lies in up to 4 windows, Lipschitz factor 2 (not 1)
    assert b.per_node["_2"][0] == pytest.approx(2.0 * b.per_node["_1"][0], rel=1e-12)
    model.eval()
    for _ in range(3):
        J = _jacobian(model, torch.randn(1, 1, 8, 8, dtype=DT))
        assert float(torch.linalg.matrix_norm(J, 2)) <= b.lipschitz


class _Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(x))
        return self.head(h * torch.sigmoid(h))


def test_gating_product_voids_the_bound_and_names_the_node():
    model = lcnnify(_Gated(), example_inputs=torch.randn(2, 4))
    b = bound(model, (4,))
    assert not b.certified and math.isinf(b.lipschitz) and math.isinf(b.logit_hessian)
    assert "mul [mul]" in _reasons(b) and "product" in _reasons(b)


def test_unconverted_relu_voids_curvature_and_is_named():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model = lcnnify(net, example_inputs=torch.randn(2, 4), skip=("1",))
    b = bound(model, (4,), full=True)
    assert not b.certified and math.isinf(b.logit_hessian) and math.isfinite(b.lipschitz)
    assert "_1 [1: ReLU]" in _reasons(b) and "kink" in _reasons(b)


def test_kept_smooth_activation_keeps_a_finite_certified_bound():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.SiLU(), nn.Linear(4, 2))
    model = lcnnify(net, example_inputs=torch.randn(2, 4), smooth_activations="keep").to(DT)
    b = bound(model, (4,))
    assert b.certified and math.isfinite(b.logit_hessian)
    _check(b, _measure(model.eval(), (4,)))


def test_layer_norm_voids_the_bound():
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 2))
    b = bound(lcnnify(net, example_inputs=torch.randn(2, 4)), (4,))
    assert not b.certified and math.isinf(b.lipschitz)
    assert "LayerNorm" in _reasons(b)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:                      # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.fc(self.act(x))


def test_untraceable_model_gets_an_uncertified_infinite_bound_with_the_reason():
    model = lcnnify(_Untraceable(), example_inputs=torch.randn(2, 4))
    assert not isinstance(model, torch.fx.GraphModule)
    b = bound(model, (4,))
    assert not b.certified and math.isinf(b.lipschitz)
    assert "trace" in _reasons(b)


# ==========================================================================================================
# the model is left as it was; shapes


def test_bound_does_not_change_the_model_and_flags_a_new_input_shape():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(2, 2))
    model = lcnnify(net, example_inputs=torch.randn(1, 1, 6, 6))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    b6 = bound(model, (1, 6, 6))
    b8 = bound(model, (1, 8, 8))
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert find_conv_spectral_norm(model.get_submodule("0")).input_shape == (1, 6, 6)
    assert b6.certified and not b8.certified
    assert "re-normalizes" in _reasons(b8) and "_0 [0:" in _reasons(b8)
    assert "Lipschitz" in str(b6) and str(b6.lipschitz)[:4] in str(b6)


def test_wrong_input_shape_raises_a_clear_error():
    from lcnnify.errors import MeasurementError

    model = lcnnify(nn.Sequential(nn.Linear(4, 2)), example_inputs=torch.randn(2, 4))
    with pytest.raises(MeasurementError, match="input_shape"):
        bound(model, (5,))


@pytest.mark.slow
def test_timm_resnet18_bound_dominates_measured_jacobian():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = timm.create_model("resnet18", num_classes=10, replace_stem_pool=True)
    model = lcnnify(net, example_inputs=torch.randn(1, 3, 32, 32))
    b = bound(model, (3, 32, 32))
    assert b.certified and math.isfinite(b.logit_hessian)
    model.eval()
    for _ in range(2):
        J = _jacobian(model, torch.randn(1, 3, 32, 32))
        assert float(torch.linalg.matrix_norm(J, 2)) <= b.lipschitz


# ==========================================================================================================
# keyword operands and alpha (the bound reads arguments wherever they are passed)


class _KwAdd(nn.Module):
    """out = head(h + alpha * y) with h = W1 x, y = W2 x (no nonlinearity: the Jacobian is constant)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.w1 = nn.Linear(4, 4, bias=False)
        self.w2 = nn.Linear(4, 4, bias=False)
        with torch.no_grad():       # W1 = W2 = I: ||J|| = 1 + |alpha| exactly
            self.w1.weight.copy_(torch.eye(4))
            self.w2.weight.copy_(torch.eye(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, y = self.w1(x), self.w2(x)
        if self.how == "other_kw_alpha":
            return torch.add(h, other=y, alpha=3)
        if self.how == "all_kw":
            return torch.add(input=h, other=y)
        if self.how == "method_alpha":
            return h.sub(y, alpha=-2.5)
        return torch.sub(h, 2 * y, alpha=-0.5)


@pytest.mark.parametrize("how, norm", [("other_kw_alpha", 4.0), ("all_kw", 2.0), ("method_alpha", 3.5),
                                       ("positional_sub", 2.0)])
def test_keyword_operands_and_alpha_are_in_the_bound(how, norm):
    model = torch.fx.symbolic_trace(_KwAdd(how).to(DT))
    b = bound(model, (4,))
    x = torch.randn(1, 4, dtype=DT)
    J = torch.func.jacrev(model)(x).reshape(4, 4)
    measured = float(torch.linalg.matrix_norm(J, 2))
    assert measured == pytest.approx(norm, rel=1e-12)
    assert b.certified
    assert measured <= b.lipschitz <= measured * (1 + 1e-6)       # attained: the bound is tight here


def test_keyword_operands_with_random_weights_and_curvature_are_bounded():
    torch.manual_seed(3)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(3, 5), nn.Linear(3, 5), nn.Linear(5, 2)
            self.act = CenteredSoftplus(beta=4.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.add(input=self.act(self.a(x)), other=self.b(x), alpha=-2.0))

    from lcnnify.convert.trace import LCNNTracer

    net = Net().to(DT).eval()
    model = torch.fx.GraphModule(net, LCNNTracer().trace(net))
    b = bound(model, (3,))
    assert b.certified
    _check(b, _measure(model, (3,)))


# ==========================================================================================================
# short-circuit, progress, output


def test_a_voided_model_returns_at_once_without_operator_norms(monkeypatch):
    """max-pool voids the bound: no conv norm is computed (they are the slow part) and the node is named."""
    import lcnnify.bounds.propagate as P

    calls: list[int] = []
    real = P.conv_norm_bound
    monkeypatch.setattr(P, "conv_norm_bound", lambda *a, **k: calls.append(1) or real(*a, **k))
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32, 2))
    model = lcnnify(net, example_inputs=torch.randn(1, 1, 8, 8))
    b = bound(model, (1, 8, 8))
    assert b.short_circuited and not b.certified and math.isinf(b.loss_hessian)
    assert any("[2: MaxPool2d]" in r and "max-pool" in r for r in b.reasons)
    assert "no finite curvature bound" in str(b).splitlines()[0]
    assert calls == []
    full = bound(model, (1, 8, 8), full=True)
    assert calls and math.isfinite(full.lipschitz) and not full.short_circuited
    with pytest.raises(Exception, match="input_shape"):     # the shape is still checked
        bound(model, (1, 7))


def test_str_leads_with_the_answer_and_says_what_each_number_bounds():
    torch.manual_seed(0)
    model = lcnnify(nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2)), example_inputs=torch.randn(2, 5))
    b = bound(model, (5,))
    lines = str(b).splitlines()
    assert lines[0].startswith("sup_x ||Hess_x loss||_2 <= ") and "(certified" in lines[0]
    assert f"{b.loss_hessian:.6g}" in lines[0]
    text = str(b)
    for what in ("Lipschitz constant of the logits", "Hessian tensor of the logits", "0.5 L^2 + sqrt(2) K",
                 "Theorem 1", "not a bound"):
        assert what in text
    conv = lcnnify(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)),
                   example_inputs=torch.randn(1, 1, 4, 4))
    est = bound(conv, (1, 4, 4), certify=False)
    assert "(estimated" in str(est).splitlines()[0]


def test_progress_bar_goes_to_stderr_only_when_asked(capsys):
    model = lcnnify(nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2)), example_inputs=torch.randn(2, 5))
    bound(model, (5,))
    assert capsys.readouterr().err == ""                    # not a terminal: no bar
    bound(model, (5,), progress=True)
    captured = capsys.readouterr()
    assert "lcnnify.bound" in captured.err and captured.out == ""


def test_bound_writes_node_meta():
    model = lcnnify(nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2)), example_inputs=torch.randn(2, 5))
    b = bound(model, (5,))
    metas = {n.name: n.meta.get("lcnnify_bound") for n in model.graph.nodes if "lcnnify_bound" in n.meta}
    assert metas == b.per_node and len(metas) >= 4


def test_timm_conv2d_same_is_bounded_with_its_dynamic_padding():
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    net = nn.Sequential(timm_layers.Conv2dSame(2, 3, 4, stride=2), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    model = lcnnify(net, example_inputs=torch.randn(1, 2, 7, 7)).to(DT).eval()
    conv = model.get_submodule("0")
    b = bound(model, (2, 7, 7))
    assert b.certified
    # the exact operator norm of the conv as it runs (dense, through its own forward, bias removed)
    E = torch.eye(98, dtype=DT).reshape(98, 2, 7, 7)
    with torch.no_grad():
        A = (conv(E) - conv(torch.zeros(1, 2, 7, 7, dtype=DT))).reshape(98, -1)
    exact = float(torch.linalg.matrix_norm(A, 2))
    assert b.per_node["_0"][0] == pytest.approx(exact, rel=1e-7)
