"""The family sweep: every timm CNN family and torchvision CNN family is covered, and the zoo check itself catches
each broken property it claims to check (a check that cannot fail is no check).

The sweep over all families runs with ``pytest -m slow``; ``python benchmarks/zoo.py`` writes the table.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import lcnnify as lcnnify_pkg
from lcnnify import lcnnify
from lcnnify.nn import CenteredSoftplus, LipschitzBatchNorm, find_conv_spectral_norm
from lcnnify.testing.models import TinyCNN
from lcnnify.testing.zoo import (FAMILY_REPRESENTATIVES, TIMM_NOT_CNN, TORCHVISION_NOT_CNN, _count, _create_meta,
                                 below_sigma_floor, check_model, execution_problems, lanczos_operator_norm,
                                 operator_norms,
                                 select_representatives, timm_families, token_mixing_ops, torchvision_families)

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


# ====================================================================================== the family list
def test_every_timm_module_is_a_family_with_a_representative_or_excluded_with_a_reason():
    modules = set(timm.list_modules())
    covered = {r.family.partition(":")[2] for r in FAMILY_REPRESENTATIVES if r.family.startswith("timm:")}
    assert not covered & set(TIMM_NOT_CNN), "a family is both swept and excluded"
    assert modules == covered | set(TIMM_NOT_CNN), (
        f"not classified: {sorted(modules - covered - set(TIMM_NOT_CNN))}; "
        f"gone from timm: {sorted((covered | set(TIMM_NOT_CNN)) - modules)}")
    assert all(len(why) > 20 for why in TIMM_NOT_CNN.values())


def test_every_torchvision_classification_family_is_swept_or_excluded():
    from torchvision.models import get_model_builder, list_models

    modules = {get_model_builder(n).__module__.rsplit(".", 1)[-1] for n in list_models(module=torchvision.models)}
    covered = {r.family.partition(":")[2] for r in FAMILY_REPRESENTATIVES if r.family.startswith("torchvision:")}
    assert modules == covered | set(TORCHVISION_NOT_CNN)
    assert set(torchvision_families()) == covered


def test_representatives_belong_to_their_family_and_record_their_parameter_count():
    families = {**{f"timm:{k}": v for k, v in timm_families().items()},
                **{f"torchvision:{k}": v for k, v in torchvision_families().items()}}
    for r in FAMILY_REPRESENTATIVES:
        assert r.spec.partition(":")[2] in families[r.family], r
    # the recorded count is the model's (num_classes=10), checked on a few without building the rest
    for r in FAMILY_REPRESENTATIVES[::12]:
        assert _count(r.spec) == r.parameters, r


def test_representative_is_the_smallest_member_of_its_family():
    fam = "hgnet"  # its smallest member (hgnetv2_b0) is not the first by name
    rep = next(r for r in FAMILY_REPRESENTATIVES if r.family == f"timm:{fam}")
    counts = {n: _count(f"timm:{n}") for n in timm_families()[fam]}
    assert rep.parameters == min(counts.values())


class _SelfAttention(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.qkv = nn.Conv2d(c, 3 * c, 1)

    def forward(self, x):
        q, k, v = self.qkv(x).flatten(2).chunk(3, dim=1)
        attn = (q.transpose(1, 2) @ k).softmax(-1)  # tokens x tokens
        return (v @ attn.transpose(1, 2)).view_as(x)


class _SqueezeExcite(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.fc = nn.Linear(c, c)

    def forward(self, x):
        h = self.conv(x)
        return h * torch.sigmoid(self.fc(h.mean((2, 3))))[:, :, None, None]


@pytest.mark.parametrize("block,expected", [(_SelfAttention, True), (_SqueezeExcite, False)])
def test_token_mixing_detector_finds_attention_but_not_convolution_or_gating(block, expected):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), block(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))
    assert bool(token_mixing_ops(model, 8)) is expected
    lstm = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(2), nn.LSTM(64, 4))
    assert token_mixing_ops(lstm, 8) == ["LSTM"]


#: excluded families whose token mixing the matmul detector cannot see: token MLPs (a Linear over the token axis)
#: and SwiftFormer's additive attention (element-wise products with a normalized global query, summed over tokens)
_MIXING_WITHOUT_MATMUL = {"mlp_mixer", "swiftformer"}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(set(TIMM_NOT_CNN) - _MIXING_WITHOUT_MATMUL))
def test_excluded_timm_family_mixes_tokens_in_its_smallest_member(family):
    name = min(timm.list_models(module=family), key=lambda n: _count(f"timm:{n}"))
    meta = _create_meta(f"timm:{name}")
    size = meta.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    assert token_mixing_ops(meta, size), f"{name} runs no attention: {family} may be a CNN family"


@pytest.mark.slow
def test_cached_representatives_are_a_fresh_selection():
    assert select_representatives() == FAMILY_REPRESENTATIVES


# ====================================================================================== the check catches ...
def _converted_tiny() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.rand(4, 3, 12, 12)
    return lcnnify(TinyCNN(in_ch=3), example_inputs=x[:2]).eval(), x


def _swap(gm: nn.Module, kind: type, new: nn.Module) -> str:
    path = next(n for n, m in gm.named_modules() if isinstance(m, kind))
    parent, _, leaf = path.rpartition(".")
    setattr(gm.get_submodule(parent), leaf, new)
    return path


def test_execution_check_passes_a_converted_model():
    lc, x = _converted_tiny()
    assert execution_problems(lc, x) == []


def test_execution_check_catches_a_relu_module():
    lc, x = _converted_tiny()
    path = _swap(lc, CenteredSoftplus, nn.ReLU())
    assert any(path in p and "ReLU" in p for p in execution_problems(lc, x))


def test_execution_check_catches_a_plain_batchnorm():
    lc, x = _converted_tiny()
    path = _swap(lc, LipschitzBatchNorm, nn.BatchNorm2d(8).eval())
    assert any(path in p and "BatchNorm2d" in p for p in execution_problems(lc, x))


def test_execution_check_catches_a_conv_without_spectral_norm():
    lc, x = _converted_tiny()
    path = next(n for n, m in lc.named_modules() if find_conv_spectral_norm(m) is not None)
    parametrize.remove_parametrizations(lc.get_submodule(path), "weight")
    assert any(path in p and "without spectral normalization" in p for p in execution_problems(lc, x))


class _FunctionalRelu(nn.Module):
    def forward(self, x):
        return F.relu(x)


def test_execution_check_catches_an_unreported_functional_relu():
    lc, x = _converted_tiny()
    _swap(lc, CenteredSoftplus, _FunctionalRelu())
    assert any("functional relu" in p for p in execution_problems(lc, x))


def test_operator_norms_equal_the_dense_operator_norm():
    lc, _ = _converted_tiny()
    path = next(n for n, m in lc.named_modules() if find_conv_spectral_norm(m) is not None)
    conv = lc.get_submodule(path)
    sn = find_conv_spectral_norm(conv)
    with torch.no_grad():
        conv.parametrizations.weight.original.mul_(3.0)  # the estimate no longer knows the weight
    w = conv.weight.detach().double()
    n_in = torch.Size(sn.input_shape).numel()
    basis = torch.eye(n_in, dtype=torch.float64).view(n_in, *sn.input_shape)
    dense = F.conv2d(basis, w, None, conv.stride, conv.padding, conv.dilation, conv.groups).flatten(1)
    expected = float(torch.linalg.matrix_norm(dense, 2))
    assert operator_norms(lc)[path] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_lanczos_operator_norm_matches_the_circular_convolution_closed_form(seed):
    # circular padding, stride 1: A is block-circulant, ||A|| = max over frequencies of ||K^(w)||_2 (an FFT)
    torch.manual_seed(seed)
    conv = nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular", bias=True).double()
    shape = (4, 24, 24)  # 2304 entries: the Lanczos path, not the dense one
    k = torch.zeros(6, 4, 24, 24, dtype=torch.float64)
    k[..., :3, :3] = conv.weight.detach()
    symbols = torch.fft.fft2(k).permute(2, 3, 0, 1)  # (24, 24, out, in)
    exact = float(torch.linalg.matrix_norm(symbols, 2).max())
    est = lanczos_operator_norm(conv, shape)
    assert est <= exact * (1 + 1e-9)
    assert est == pytest.approx(exact, rel=1e-4)


def _tiny_factory():
    return TinyCNN(in_ch=3)


def test_check_model_passes_a_tiny_cnn():
    res = check_model("tiny", size=12, batch=4, factory=_tiny_factory)
    assert res.ok and res.status == "converted", res.reason
    assert res.converted == {"conv": 2, "batchnorm": 2, "activation": 2, "linear": 1}


def _wrapped(monkeypatch, after):
    real = lcnnify_pkg.lcnnify

    def fake(model, *args, **kwargs):
        out = real(model, *args, **kwargs)
        after(model, out)
        return out

    monkeypatch.setattr(lcnnify_pkg, "lcnnify", fake)


def test_check_model_catches_a_clobbered_train_eval_flag(monkeypatch):
    _wrapped(monkeypatch, lambda orig, lc: orig.train())  # un-freezes the BN the check froze
    res = check_model("tiny", size=12, batch=4, factory=_tiny_factory)
    assert not res.ok and any("train/eval flags" in p for p in res.problems)


def test_check_model_catches_a_mutated_original(monkeypatch):
    _wrapped(monkeypatch, lambda orig, lc: orig.head.bias.data.add_(1.0))
    res = check_model("tiny", size=12, batch=4, factory=_tiny_factory)
    assert not res.ok and any("state dict changed" in p for p in res.problems)


def test_check_model_catches_dropout_left_on_in_eval(monkeypatch):
    def add_dropout(orig, lc):
        lc.register_forward_hook(lambda m, a, out: F.dropout(out, 0.5, training=True))
    _wrapped(monkeypatch, add_dropout)
    res = check_model("tiny", size=12, batch=4, factory=_tiny_factory)
    assert not res.ok and any("two forwards differ" in p for p in res.problems)


def test_check_model_catches_state_outside_the_state_dict(monkeypatch):
    def add_hidden_offset(orig, lc):
        offset = torch.randn(())  # differs per conversion and is not saved
        lc.register_forward_hook(lambda m, a, out: out + offset)
    _wrapped(monkeypatch, add_hidden_offset)
    res = check_model("tiny", size=12, batch=4, factory=_tiny_factory)
    assert not res.ok and any("round trip" in p for p in res.problems)


class _Scale(nn.Module):
    def forward(self, w):
        return 1.5 * w


def test_check_model_catches_operator_norms_off_one(monkeypatch):
    _wrapped(monkeypatch, lambda orig, lc: parametrize.register_parametrization(lc.head, "weight", _Scale()))
    res = check_model("tiny", size=12, batch=4, factory=_tiny_factory, roundtrip=False)
    assert not res.ok and any("operator norms" in p and "head 1.5" in p for p in res.problems)


# ====================================================================================== the sweep
@pytest.mark.slow
@pytest.mark.parametrize("rep", FAMILY_REPRESENTATIVES, ids=lambda r: r.spec)
def test_family_representative_keeps_the_lcnn_contract(rep):
    res = check_model(rep.spec, size=rep.size, family=rep.family)
    assert res.ok, f"{rep.spec} ({res.status}): {res.reason}"


def test_sigma_floor_is_recognised_from_the_weights_alone():
    lc, x = _converted_tiny()
    path = next(n for n, m in lc.named_modules() if find_conv_spectral_norm(m) is not None)
    conv = lc.get_submodule(path)
    if not hasattr(find_conv_spectral_norm(conv), "min_sigma"):
        pytest.skip("this spectral normalization has no floor")
    assert not below_sigma_floor(conv)
    with torch.no_grad():
        conv.parametrizations.weight.original.mul_(1e-9)  # operator norm far below any floor
    lc(x)  # eval: converges for the new weight
    assert below_sigma_floor(conv)
    assert operator_norms(lc)[path] < 1e-3
