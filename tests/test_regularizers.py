"""Properties of lcnnify.regularizers: each penalty equals an independent per-sample computation."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from lcnnify.errors import ConversionWarning
from lcnnify.regularizers import (
    adversarial_examples,
    cure_penalty,
    gradient_norm_penalty,
    gradreg_weight_from_reference,
    softplus_model,
)

FAST = settings(max_examples=15, deadline=None)


def mlp(d: int, k: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, 8), nn.Softplus(beta=2.0), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, k)).double()


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Softplus(beta=3.0),
                         nn.Conv2d(4, 4, 3, stride=2), nn.Softplus(beta=3.0), nn.Flatten(),
                         nn.LazyLinear(3)).double()


def per_sample_grad(model, xi, yi, loss_fn=F.cross_entropy, create_graph=False):
    xi = xi.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(model(xi), yi), xi, create_graph=create_graph)
    return g


def reference_gradreg(model, x, y):
    vals = [per_sample_grad(model, x[i:i + 1], y[i:i + 1]).pow(2).sum() for i in range(len(x))]
    return torch.stack(vals).mean()


def reference_cure(model, x, y, h):
    vals = []
    for i in range(len(x)):
        xi, yi = x[i:i + 1], y[i:i + 1]
        g0 = per_sample_grad(model, xi, yi)
        s = torch.sign(g0)
        z = s / s.norm() if s.norm() > 0 else s
        g1 = per_sample_grad(model, xi + h * z, yi)
        vals.append((g1 - g0).pow(2).sum())
    return torch.stack(vals).mean()


# --------------------------------------------------------------------------------------- GradReg
@FAST
@given(b=st.integers(1, 5), d=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_gradient_norm_penalty_equals_per_sample_loop(b, d, seed):
    g = torch.Generator().manual_seed(seed)
    model = mlp(d, seed=seed % 7)
    x = torch.rand(b, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (b,), generator=g)
    got = gradient_norm_penalty(model, x, y)
    torch.testing.assert_close(got, reference_gradreg(model, x, y), rtol=1e-9, atol=1e-12)


@settings(max_examples=6, deadline=None)
@given(b=st.integers(1, 4), hw=st.integers(4, 7), seed=st.integers(0, 10_000))
def test_gradient_norm_penalty_equals_per_sample_loop_for_cnn_in_eval(b, hw, seed):
    g = torch.Generator().manual_seed(seed)
    model = small_cnn()
    x = torch.rand(b, 2, hw, hw, generator=g, dtype=torch.float64)
    model(x)  # materialise LazyLinear for this size
    model.eval()
    y = torch.randint(0, 3, (b,), generator=g)
    got = gradient_norm_penalty(model, x, y)
    torch.testing.assert_close(got, reference_gradreg(model, x, y), rtol=1e-9, atol=1e-12)
    assert not model.training


def test_gradient_norm_penalty_is_batch_size_independent():
    torch.manual_seed(0)
    model = mlp(5)
    x, y = torch.rand(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    one = gradient_norm_penalty(model, x, y)
    two = gradient_norm_penalty(model, torch.cat([x, x]), torch.cat([y, y]))
    torch.testing.assert_close(one, two, rtol=1e-12, atol=0)


def test_gradient_norm_penalty_reaches_parameters_and_leaves_no_grads():
    torch.manual_seed(1)
    model = mlp(5)
    x, y = torch.rand(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    pen = gradient_norm_penalty(model, x, y)
    assert all(p.grad is None for p in model.parameters())
    assert x.grad is None and not x.requires_grad
    pen.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert all(gr.abs().sum() > 0 for gr in grads)


def test_gradient_norm_penalty_with_precomputed_logits_matches():
    torch.manual_seed(2)
    model = mlp(4)
    x, y = torch.rand(3, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    xr = x.clone().requires_grad_(True)
    out = model(xr)
    torch.testing.assert_close(gradient_norm_penalty(model, xr, y, logits=out), gradient_norm_penalty(model, x, y))
    with pytest.raises(ValueError):
        gradient_norm_penalty(model, x, y, logits=model(x))


def test_gradreg_reference_weight_reproduces_reference_formula():
    torch.manual_seed(3)
    model = mlp(4)
    B = 7
    x, y = torch.rand(B, 4, dtype=torch.float64), torch.randint(0, 3, (B,))
    xr = x.clone().requires_grad_(True)
    (gm,) = torch.autograd.grad(F.cross_entropy(model(xr), y), xr)
    reference = 1e-3 * 1e5 * gm.pow(2).sum() / B
    ours = gradreg_weight_from_reference(B) * gradient_norm_penalty(model, x, y)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=0)


# ------------------------------------------------------------------------------------------- CURE
@FAST
@given(b=st.integers(1, 5), d=st.integers(1, 6), h=st.floats(0.01, 1.0), seed=st.integers(0, 10_000))
def test_cure_penalty_equals_per_sample_loop(b, d, h, seed):
    g = torch.Generator().manual_seed(seed)
    model = mlp(d, seed=seed % 5)
    x = torch.rand(b, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (b,), generator=g)
    got = cure_penalty(model, x, y, h=h)
    torch.testing.assert_close(got, reference_cure(model, x, y, h), rtol=1e-8, atol=1e-14)


class Quadratic(nn.Module):
    """Per-sample "loss" q(x) = 0.5 x^T A x + b^T x (A symmetric); returned as the logits."""

    def __init__(self, A, b):
        super().__init__()
        self.A, self.b = nn.Parameter(A), nn.Parameter(b)

    def forward(self, x):
        x = x.flatten(1)
        return 0.5 * torch.einsum("bi,ij,bj->b", x, self.A, x) + x @ self.b


def identity_loss(out, y, reduction="none"):
    return out


@FAST
@given(b=st.integers(1, 4), d=st.integers(1, 8), h=st.floats(1e-3, 3.0), seed=st.integers(0, 10_000))
def test_cure_penalty_closed_form_on_quadratic(b, d, h, seed):
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(d, d, generator=g, dtype=torch.float64)
    A = M + M.T
    bvec = torch.randn(d, generator=g, dtype=torch.float64)
    model = Quadratic(A, bvec)
    x = torch.randn(b, d, generator=g, dtype=torch.float64)
    grad = x @ A + bvec
    z = torch.sign(grad) / torch.sign(grad).norm(dim=1, keepdim=True)
    expected = (h * z @ A).pow(2).sum(1).mean()
    got = cure_penalty(model, x, torch.zeros(b, dtype=torch.long), h=h, loss_fn=identity_loss)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_cure_penalty_reaches_parameters_restores_mode_and_keeps_bn_stats():
    model = small_cnn()
    x = torch.rand(4, 2, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    model(x)
    model.train()
    model[1].eval()  # a mixed-mode model: every flag must come back as it was
    flags = [m.training for m in model.modules()]
    stats = model[1].running_mean.clone(), model[1].running_var.clone()
    pen = cure_penalty(model, x, y, h=0.1)
    assert [m.training for m in model.modules()] == flags
    torch.testing.assert_close(model[1].running_mean, stats[0], rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())
    pen.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert sum(gr.abs().sum() for gr in grads) > 0


def test_cure_penalty_rejects_nonpositive_h():
    with pytest.raises(ValueError):
        cure_penalty(mlp(2), torch.rand(2, 2, dtype=torch.float64), torch.tensor([0, 1]), h=0.0)


# ---------------------------------------------------------------------------------- adversarial
def test_adversarial_examples_attack_in_eval_mode_and_restore_everything():
    # every forward of the attack sees an eval-mode model (a frozen BN stays frozen, BN statistics untouched)
    # whose parameters do not require grad; afterwards modes, requires_grad and .grad are as they were
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(8, 3)).double()
    model.train()
    model[2].eval()
    modes = [m.training for m in model.modules()]
    stats = {k: v.clone() for k, v in model.named_buffers()}
    seen = []
    model.register_forward_pre_hook(
        lambda m, args: seen.append((any(sub.training for sub in m.modules()),
                                     any(p.requires_grad for p in m.parameters()))))
    x, y = torch.rand(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    x_adv = adversarial_examples(model, x, y, eps=0.1, steps=3, generator=torch.Generator().manual_seed(0))
    assert len(seen) >= 3 and set(seen) == {(False, False)}
    assert [m.training for m in model.modules()] == modes
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(stats[k], v) for k, v in model.named_buffers())
    assert not x_adv.requires_grad


def test_adversarial_examples_with_real_pgd_lie_in_ball_and_box():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    model.train()
    x, y = torch.rand(8, 3, 2, 2), torch.randint(0, 3, (8,))
    eps = 0.2
    x_adv = adversarial_examples(model, x, y, eps=eps, steps=3, generator=torch.Generator().manual_seed(0))
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert ((x_adv - x).flatten(1).norm(dim=1) <= eps * (1 + 1e-5)).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert model.training and all(p.grad is None for p in model.parameters())
    clean = F.cross_entropy(model(x), y, reduction="none")
    adv = F.cross_entropy(model(x_adv), y, reduction="none")
    assert (adv >= clean - 1e-6).float().mean() > 0.5  # the attack increases the loss


# ------------------------------------------------------------------------------------- softplus
class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(6, 6)
        self.leaky = nn.LeakyReLU(0.2)
        self.block = nn.Sequential(nn.Linear(6, 6), nn.ReLU6())
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        x = self.act(self.fc1(x))
        x = F.relu(self.fc2(x)) + torch.relu(x) + x.relu()
        x = self.leaky(x)
        x = self.block(x)
        x.relu_()  # result unused: the in-place effect must carry over
        x = F.leaky_relu(x, 0.1)
        return self.out(x)


def manual_softplus_forward(net: FunctionalNet, x, beta):
    sp = lambda t: F.softplus(t, beta=beta)  # noqa: E731
    x = sp(net.fc1(x))
    x = sp(net.fc2(x)) + sp(x) + sp(x)
    x = sp(x)
    x = sp(net.block[0](x))
    x = sp(x)
    x = sp(x)
    return net.out(x)


RELU_NAMES = {"relu", "relu_", "relu6", "leaky_relu", "leaky_relu_"}


def test_softplus_model_replaces_every_relu_module_and_call_and_leaves_original():
    torch.manual_seed(0)
    net = FunctionalNet()
    x = torch.randn(5, 4)
    before = net(x.clone())
    sm = softplus_model(net, beta=7.0)
    assert not any(isinstance(m, (nn.ReLU, nn.ReLU6, nn.LeakyReLU)) for m in sm.modules())
    for node in sm.graph.nodes:
        name = getattr(node.target, "__name__", node.target)
        assert not (node.op in ("call_function", "call_method") and name in RELU_NAMES), node.format_node()
    n_softplus = sum(isinstance(m, nn.Softplus) for m in sm.modules())
    assert n_softplus == 8  # 3 modules + 5 functional/method call sites
    torch.testing.assert_close(sm(x), manual_softplus_forward(net, x, 7.0))
    # the original is untouched: same modules, same outputs, parameters not shared
    assert isinstance(net.act, nn.ReLU) and isinstance(net.leaky, nn.LeakyReLU)
    torch.testing.assert_close(net(x.clone()), before)
    assert all(p1.data_ptr() != p2.data_ptr() for p1, p2 in zip(net.parameters(), sm.parameters()))


def test_softplus_model_keeps_class_when_only_modules():
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=4)
    sm = softplus_model(net)
    assert type(sm) is type(net)
    assert not any(isinstance(m, nn.ReLU) for m in sm.modules())
    assert all(m.beta == 1e3 for m in sm.modules() if isinstance(m, nn.Softplus))
    assert isinstance(net.relu, nn.ReLU)
    assert sm.state_dict().keys() == net.state_dict().keys()


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.act = nn.ReLU()

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            x = x * 2
        return self.act(self.fc(x))


def test_softplus_model_untraceable_swaps_modules_and_warns():
    net = Untraceable()
    with pytest.warns(ConversionWarning, match="could not be traced"):
        sm = softplus_model(net, beta=5.0)
    assert isinstance(sm.act, nn.Softplus) and sm.act.beta == 5.0
    assert isinstance(net.act, nn.ReLU)
    x = torch.randn(2, 3)
    torch.testing.assert_close(sm(x), F.softplus(net.fc(x * 2 if x.sum() > 0 else x), beta=5.0))


def test_softplus_model_inplace_swaps_in_the_given_model():
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = softplus_model(net, beta=3.0, inplace=True)
    assert out is net and isinstance(net[1], nn.Softplus)


class DropoutHead(nn.Module):
    """timm's forward_head: functional dropout that reads self.training, after a functional relu."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 64)
        self.out = nn.Linear(64, 3)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        return self.out(F.dropout(h, p=0.5, training=self.training))


@pytest.mark.parametrize("traced_in", ["train", "eval"])
def test_softplus_model_dropout_follows_the_mode_it_runs_in(traced_in):
    # a single trace would bake the mode the model had when converted: dropout always on (or always off)
    torch.manual_seed(0)
    net = DropoutHead().train(traced_in == "train")
    sm = softplus_model(net, beta=4.0)
    x = torch.randn(16, 4)
    sm.eval()
    expected = net.out(F.softplus(net.fc1(x), beta=4.0))
    torch.testing.assert_close(sm(x), expected)  # eval: no dropout, deterministic
    sm.train()
    h = F.softplus(net.fc1(x), beta=4.0)
    torch.manual_seed(1)
    got = sm(x)
    torch.manual_seed(1)
    torch.testing.assert_close(got, net.out(F.dropout(h, p=0.5, training=True)))  # train: the same dropout mask
    assert not torch.allclose(got, expected)


class AuxHeadNet(nn.Module):
    """GoogLeNet/Inception style: an auxiliary output only in train mode, functional relus."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.aux = nn.Linear(6, 3)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.fc(x), inplace=True)
        if self.training:
            return self.out(h), self.aux(h)
        return self.out(h)


def test_softplus_model_with_a_train_only_branch_keeps_both_modes_and_warns():
    net = AuxHeadNet().train()
    with pytest.warns(ConversionWarning, match="different paths in train and eval"):
        sm = softplus_model(net, beta=5.0)
    x = torch.randn(2, 4)
    assert isinstance(sm.train()(x), tuple)
    out = sm.eval()(x)
    assert isinstance(out, torch.Tensor)  # not the train-mode branch baked into a graph
    torch.testing.assert_close(out, net.out(F.relu(net.fc(x))))  # the functional relu was left (as warned)


# ----------------------------------------------------------------------------- on an LCNN model
@pytest.mark.parametrize("penalty", [gradient_norm_penalty, cure_penalty])
def test_penalties_double_backprop_through_a_converted_lcnn(penalty):
    try:
        from lcnnify import lcnnify
    except ImportError as exc:  # the conversion is developed alongside
        pytest.skip(f"lcnnify.lcnnify not importable: {exc}")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 6 * 6, 3))
    x, y = torch.rand(4, 3, 6, 6), torch.tensor([0, 1, 2, 0])
    model = lcnnify(net, example_inputs=x)
    model.train()
    pen = penalty(model, x, y)  # before the training forward: buffers updated in-place must not break it
    loss = F.cross_entropy(model(x), y) + pen
    assert model.training
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    beta_grads = [g for n, g in grads.items() if "beta" in n]
    assert beta_grads and all(g.abs().sum() > 0 for g in beta_grads)
