"""The public API: signatures, exports, whole-model pickling / copies, plain checkpoints into converted models."""
from __future__ import annotations

import copy
import inspect
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import lcnnify as L
from lcnnify import LCNNConfig, lcnnify, load_plain_state_dict, param_groups, validate
from lcnnify.nn import CenteredSoftplus, ConvSpectralNorm, LipschitzBatchNorm


# ------------------------------------------------------------------------------------------ signatures, exports
def test_validate_takes_the_same_arguments_as_lcnnify():
    sig_v, sig_l = inspect.signature(validate), inspect.signature(lcnnify)
    assert list(sig_v.parameters)[:2] == list(sig_l.parameters)[:2] == ["model", "config"]
    assert sig_v.parameters["example_inputs"].kind is inspect.Parameter.KEYWORD_ONLY
    assert sig_v.parameters["overrides"].kind is inspect.Parameter.VAR_KEYWORD


def test_validate_accepts_a_config_positionally(tiny_cnn):
    rep = validate(tiny_cnn, LCNNConfig(lipschitz_batchnorm=False))
    assert "batchnorm" not in rep.converted_counts
    assert rep.converted_counts == lcnnify(tiny_cnn, lipschitz_batchnorm=False).lcnn_report.converted_counts


def test_bound_and_freeze_are_the_real_functions():
    from lcnnify.export import freeze

    assert L.freeze is freeze
    import importlib

    bounds = importlib.import_module("lcnnify.bounds")
    assert L.bound is bounds.bound
    assert "input_shape" in inspect.signature(L.bound).parameters
    assert L.bound.__doc__ and L.freeze.__doc__


def test_errors_and_warnings_are_exported_and_conversion_error_is_a_value_error():
    for name in ("LCNNError", "ConversionError", "MeasurementError", "LCNNWarning", "ConversionWarning",
                 "ShapeChangeWarning"):
        assert name in L.__all__ and hasattr(L, name)
    assert issubclass(L.ConversionError, ValueError) and issubclass(L.ConversionError, L.LCNNError)
    with pytest.raises(ValueError, match="already an LCNN"):
        lcnnify(lcnnify(nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU())))


# ------------------------------------------------------------------------------------------ pickle and copies
class _NotTraceable(nn.Module):
    """A forward fx cannot trace: the model is converted module by module and keeps its class."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:
            x = x * 1.0
        return self.head(self.act(self.bn(self.conv(x))).mean((2, 3)))


def _trained(model: nn.Module, example: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    lc = lcnnify(model, example_inputs=example)
    opt = torch.optim.SGD(param_groups(lc, 0.0), lr=0.1)
    loss = F.cross_entropy(lc(torch.randn(4, *example.shape[1:])), torch.tensor([0, 1, 2, 0]) % 3)
    (loss + lc.curvature_penalty()).backward()
    opt.step()
    return lc


def _models():
    from lcnnify.testing.models import TinyCNN

    torch.manual_seed(0)
    return [("traced", TinyCNN(), torch.randn(2, 1, 8, 8)), ("fallback", _NotTraceable(), torch.randn(2, 1, 6, 6))]


@pytest.mark.parametrize("kind", ["traced", "fallback"])
def test_whole_model_torch_save_and_pickle_round_trip(kind):
    _, model, ex = next(m for m in _models() if m[0] == kind)
    lc = _trained(model, ex).eval()
    x = torch.randn(3, *ex.shape[1:])
    ref = lc(x)
    buf = io.BytesIO()
    torch.save(lc, buf)
    buf.seek(0)
    for back in (torch.load(buf, weights_only=False), pickle.loads(pickle.dumps(lc))):
        assert type(back).__name__ == type(lc).__name__
        torch.testing.assert_close(back.eval()(x), ref, rtol=0, atol=0)
        assert back.curvature_penalty().item() == pytest.approx(lc.curvature_penalty().item())
        assert back.lcnn_report.converted_counts == lc.lcnn_report.converted_counts
        assert back.lcnn_config == lc.lcnn_config
        assert list(back.state_dict()) == list(lc.state_dict())
        for (k, a), b in zip(lc.state_dict().items(), back.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)
        # still an LCNN that trains: the penalty is bound to the loaded copy, not to the original
        with torch.no_grad():
            for m in back.modules():
                if isinstance(m, CenteredSoftplus):
                    m.log_beta.fill_(0.0)
        assert back.curvature_penalty().item() != pytest.approx(lc.curvature_penalty().item())
        back.train()
        back(x).sum().backward()
        assert all(p.grad is not None for p in back.parameters() if p.requires_grad)


@pytest.mark.parametrize("kind", ["traced", "fallback"])
def test_copy_copy_keeps_the_penalty_report_and_hierarchy(kind):
    _, model, ex = next(m for m in _models() if m[0] == kind)
    lc = lcnnify(model)
    for dup in (copy.copy(lc), copy.deepcopy(lc)):
        assert dup.curvature_penalty().item() == pytest.approx(lc.curvature_penalty().item())
        assert dup.lcnn_report.converted_counts == lc.lcnn_report.converted_counts
        assert [type(m) for _, m in dup.named_children()] == [type(m) for _, m in lc.named_children()]
        torch.testing.assert_close(dup.eval()(ex), lc.eval()(ex))


def test_parametrized_layers_pickle_on_their_own():
    lc = lcnnify(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)),
                 example_inputs=torch.randn(1, 1, 4, 4))
    conv = lc.get_submodule("0")
    back = pickle.loads(pickle.dumps(conv))
    assert parametrize.is_parametrized(back, "weight") and type(back) is not type(conv)
    assert isinstance(back.parametrizations.weight[0], ConvSpectralNorm)
    torch.testing.assert_close(back.eval().weight, conv.eval().weight, rtol=0, atol=0)
    before = conv.parametrizations.weight.original.detach().clone()
    back.parametrizations.weight.original.data.add_(1.0)  # its own tensors, its own class
    torch.testing.assert_close(conv.parametrizations.weight.original.detach(), before, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ plain checkpoints
class _Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                                      nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def _conv_matrix(conv: nn.Conv2d, shape: tuple[int, ...], weight: torch.Tensor) -> torch.Tensor:
    n = int(torch.tensor(shape).prod())
    eye = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    return F.conv2d(eye, weight.double(), None, conv.stride, conv.padding).reshape(n, -1).T


def test_plain_checkpoint_loads_and_the_model_is_the_normalized_original():
    """Independent reference: the plain model with every conv weight divided by the exact operator norm (dense
    matrix) at its input shape, the linear weight by its matrix 2-norm; beta -> inf and gamma large make
    CenteredSoftplus ~ ReLU and the Lipschitz BN an ordinary BN."""
    torch.manual_seed(0)
    plain = _Plain()
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    torch.manual_seed(1)
    lc = lcnnify(_Plain(), example_inputs=torch.randn(1, 2, 6, 6), beta0=1e4, gamma0=1e6)
    result = load_plain_state_dict(lc, plain.state_dict())
    assert result.mapping["features.0.weight"] == "features.0.parametrizations.weight.original"
    assert not result.missing_keys and not result.unexpected_keys
    assert {k.rsplit(".", 1)[-1] for k in result.kept} >= {"log_beta", "log_gamma_minus_1", "u", "v"}

    ref = copy.deepcopy(plain).eval()
    shapes = {"features.0": (2, 6, 6), "features.3": (3, 6, 6)}
    with torch.no_grad():
        for path, shape in shapes.items():
            conv = ref.get_submodule(path)
            conv.weight /= torch.linalg.matrix_norm(_conv_matrix(conv, shape, conv.weight), ord=2).float()
        ref.head.weight /= torch.linalg.matrix_norm(ref.head.weight.double(), ord=2).float()
    x = torch.randn(5, 2, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(lc.eval()(x), ref(x), atol=2e-3, rtol=1e-3)


def test_timm_resnet18_checkpoint_loads_strictly_and_every_tensor_lands_in_place():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    plain = timm.create_model("resnet18", num_classes=10)
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
    torch.manual_seed(1)
    lc = lcnnify(timm.create_model("resnet18", num_classes=10))
    betas = {n: p.detach().clone() for n, p in lc.named_parameters() if "log_beta" in n or "log_gamma" in n}
    state = plain.state_dict()
    result = load_plain_state_dict(lc, state, strict=True)
    own = lc.state_dict()
    assert len(result.mapping) == 21  # 20 convs + fc moved under parametrizations
    for key, value in state.items():
        torch.testing.assert_close(own[result.mapping.get(key, key)], value, rtol=0, atol=0, msg=key)
    for n, p in lc.named_parameters():
        if n in betas:
            torch.testing.assert_close(p, betas[n], rtol=0, atol=0)
    assert isinstance(lc.bn1, LipschitzBatchNorm)


def test_a_checkpoint_that_does_not_fit_is_a_clear_error(tiny_cnn):
    lc = lcnnify(tiny_cnn)
    state = dict(tiny_cnn.state_dict())
    state["extra.weight"] = torch.zeros(1)
    del state["head.bias"]
    with pytest.raises(L.ConversionError, match=r"missing keys.*head\.bias.*unexpected keys.*extra\.weight"):
        load_plain_state_dict(lc, state)
    result = load_plain_state_dict(lc, state, strict=False)
    assert result.missing_keys == ["head.bias"] and result.unexpected_keys == ["extra.weight"]


def test_a_weight_standardized_conv_gets_its_raw_weight_and_gain():
    timm_layers = pytest.importorskip("timm.layers")

    def make():
        return nn.Sequential(timm_layers.ScaledStdConv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3))

    torch.manual_seed(0)
    plain = make()
    with torch.no_grad():
        plain[0].gain.uniform_(0.5, 2.0)
    lc = lcnnify(make(), example_inputs=torch.randn(1, 1, 6, 6))
    result = load_plain_state_dict(lc, plain.state_dict())
    assert result.mapping == {"0.weight": "0.parametrizations.weight.original",
                              "0.gain": "0.parametrizations.weight.0.gain",
                              "3.weight": "3.parametrizations.weight.original"}
    conv = lc.get_submodule("0")
    torch.testing.assert_close(conv.parametrizations.weight.original, plain[0].weight, rtol=0, atol=0)
    torch.testing.assert_close(conv.parametrizations.weight[0].gain, plain[0].gain.reshape(-1), rtol=0, atol=0)
    # the chain applies what the plain layer applies, then normalizes: WS(W) here == timm's standardized weight
    ws = conv.parametrizations.weight[0](conv.parametrizations.weight.original)
    ref = F.batch_norm(plain[0].weight.reshape(1, 2, -1), None, None, training=True, momentum=0.0,
                       eps=plain[0].eps).reshape_as(plain[0].weight) * (plain[0].gain * plain[0].scale)
    torch.testing.assert_close(ws, ref, rtol=1e-5, atol=1e-6)
