"""The activation policy and per-type / per-name overrides (issue: zoo)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lcnnify import ConversionError, ConversionWarning, lcnnify, validate
from lcnnify.nn import CenteredSoftplus, LipschitzBatchNorm


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.silu = nn.SiLU()
        self.gelu = nn.GELU()
        self.relu = nn.ReLU()
        self.gate = nn.Sigmoid()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.silu(self.bn(self.conv(x)))
        x = self.gelu(x) + F.hardswish(x)
        x = x * self.gate(x.mean((2, 3), keepdim=True))  # squeeze-excite style gating
        x = F.max_pool2d(self.relu(x), 2)
        return self.head(x.mean((2, 3)))


def _csp_paths(model):
    return {n for n, m in model.named_modules() if isinstance(m, CenteredSoftplus)}


def test_smooth_activations_convert_by_default_and_gates_are_kept_and_reported():
    lc = lcnnify(_Mixed())
    assert {"silu", "gelu", "relu", "hardswish"} <= _csp_paths(lc)
    assert isinstance(lc.gate, nn.Sigmoid)
    rep = lc.lcnn_report
    ops = {(x.op, x.voids) for x in rep.left}
    assert ("Sigmoid", False) in ops            # the gate itself is smooth and bounded
    assert ("operator.mul", True) in ops        # its product with the features voids the guarantee
    assert ("F.max_pool2d", True) in ops
    assert not rep.certified


def test_keep_policy_leaves_smooth_activations_and_reports_them():
    rep = validate(_Mixed(), smooth_activations="keep")
    kept = {x.path for x in rep.left if "smooth activation kept" in x.reason}
    assert {"silu", "gelu"} <= kept and any("hardswish" in p for p in kept)
    assert rep.converted_counts["activation"] == 1  # only the ReLU


def test_per_type_override_and_skip_by_name_and_regex():
    lc = lcnnify(_Mixed(), convert_types={nn.GELU: "keep"}, skip=("relu", "re:b.*"))
    assert isinstance(lc.gelu, nn.GELU) and isinstance(lc.relu, nn.ReLU)
    assert isinstance(lc.bn, nn.BatchNorm2d) and not isinstance(lc.bn, LipschitzBatchNorm)
    assert "silu" in _csp_paths(lc)
    skipped = {x.path for x in lc.lcnn_report.left if "skipped" in x.reason}
    assert {"relu", "bn"} <= skipped


def test_report_prints_a_table_and_serializes():
    rep = lcnnify(_Mixed()).lcnn_report
    text = str(rep)
    assert "converted" in text and "left unconverted" in text and "VOIDS" in text
    d = rep.to_dict()
    assert d["certified"] is False and d["converted_counts"]["conv"] == 1
    import json
    assert json.loads(rep.to_json())["model"] == "_Mixed"


# ------------------------------------------------------------------------------------------ silent no-ops
def test_a_skip_pattern_that_matches_nothing_warns_with_the_closest_paths():
    with pytest.warns(ConversionWarning, match=r"skip pattern 'gelu_' matched no call site.*'gelu'"):
        lcnnify(_Mixed(), skip=("gelu_",))
    with pytest.warns(ConversionWarning, match=r"skip pattern 're:stages.* matched no call site"):
        validate(_Mixed(), skip=(r"re:stages\.0\..*",))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConversionWarning)
        validate(_Mixed(), skip=("gelu", "re:b."))  # both match: no warning


def test_a_bad_skip_regex_is_a_conversion_error_naming_it():
    with pytest.raises(ConversionError, match=r"'re:layer\[1' is not a valid regular expression"):
        lcnnify(_Mixed(), skip=("re:layer[1",))


def test_a_void_guarantee_gives_one_warning_that_says_how_to_fix_it():
    with pytest.warns(ConversionWarning) as record:
        lcnnify(_Mixed())
    msgs = [str(w.message) for w in record if issubclass(w.category, ConversionWarning)]
    assert len(msgs) == 1
    assert "guarantee is void" in msgs[0] and "F.max_pool2d" in msgs[0] and "operator.mul" in msgs[0]
    assert "average pooling" in msgs[0]
    assert "average pooling" in str(lcnnify(_Mixed()).lcnn_report)  # the printed report says it too
    certified = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AvgPool2d(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConversionWarning)
        lc = lcnnify(certified)
    assert lc.lcnn_report.certified


class _MyAct(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class _MySiLU(nn.SiLU):
    pass


@pytest.mark.parametrize("overrides, match", [
    ({nn.GELU: "Convert"}, r"must be 'convert' or 'keep'"),
    ({nn.GELU: True}, r"must be 'convert' or 'keep'"),
    ({_MyAct: "convert"}, r"no conversion rule matches .*_MyAct"),
    ({"Gelu": "keep"}, r"no conversion rule matches 'Gelu'.*GELU"),
])
def test_convert_types_must_name_a_known_type_and_a_valid_policy(overrides, match):
    with pytest.raises(ConversionError, match=match):
        lcnnify(_Mixed(), convert_types=overrides)


def test_convert_types_accepts_subclasses_and_names_of_known_types():
    class _Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.act = nn.Conv2d(1, 2, 3), _MySiLU()

        def forward(self, x):
            return F.gelu(self.act(self.conv(x)))

    lc = lcnnify(_Net(), convert_types={_MySiLU: "keep", "F.gelu": "keep"})
    assert isinstance(lc.act, _MySiLU) and not _csp_paths(lc)


def test_convert_types_accepts_an_activation_registered_in_the_op_registry():
    ops = pytest.importorskip("lcnnify.ops")
    net = nn.Sequential(nn.Conv2d(1, 2, 3), _MyAct())
    with pytest.raises(ConversionError, match=r"register_activation\(_MyAct"):
        lcnnify(net, convert_types={_MyAct: "convert"})
    spec = ops.register_activation(_MyAct, slope=1.1, curvature=0.6, convert="policy")
    try:
        assert isinstance(lcnnify(net, convert_types={_MyAct: "keep"}).get_submodule("1"), _MyAct)
        assert isinstance(lcnnify(net, convert_types={_MyAct: "convert"}).get_submodule("1"), CenteredSoftplus)
    finally:
        ops.unregister(spec)


def test_fused_bn_act_keeps_its_bn_but_converts_its_activation_when_lipschitz_batchnorm_is_off():
    """timm BatchNormAct2d with lipschitz_batchnorm=False: the report says its act became a CenteredSoftplus,
    and so it must be in the model (it was reported but left as a ReLU/Hardswish)."""
    timm = pytest.importorskip("timm")
    from lcnnify.nn import CenteredSoftplus

    model = timm.create_model("mobilenetv3_small_050", num_classes=10)
    lc = lcnnify(model, lipschitz_batchnorm=False)
    reported = [c.path for c in lc.lcnn_report.converted if c.family == "activation"]
    for path in reported:
        assert isinstance(lc.get_submodule(path), CenteredSoftplus), path
    assert not any(isinstance(m, (torch.nn.ReLU, torch.nn.Hardswish)) for m in lc.modules())
