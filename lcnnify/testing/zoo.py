"""The model zoo: the curated list of timm / torchvision CNNs lcnnify is checked on, and the per-model check.

:func:`check_model` converts a model with ``example_inputs``, runs one training step (forward, backward with the
curvature penalty, SGD step) and inspects what actually EXECUTED during a forward pass:

* no ReLU-family activation (module or functional call) and no plain BatchNorm runs any more;
* every executed conv / linear is spectrally normalized, convs at the input shape they see;
* the original model is untouched (state dict and module types).

Anything the conversion reported as left (with its reason) is allowed to still run; the check fails on what
ran but was neither converted nor reported.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

TIMM_MODELS: list[str] = [
    # ResNet family and friends
    "resnet18", "resnet26d", "resnext26ts", "legacy_seresnet18", "seresnext26d_32x4d", "ecaresnet26t",
    "res2net50_14w_8s", "resnest14d", "skresnet18", "gernet_s", "resnetv2_50x1_bit", "cspresnet50",
    "cspdarknet53", "dla34", "dpn68", "densenet121", "selecsls42b", "hrnet_w18_small", "regnetx_002",
    "regnety_002", "repvgg_a0", "vgg11", "vgg11_bn", "inception_v3", "xception41",
    # mobile / efficient families
    "efficientnet_b0", "tf_efficientnet_b0", "efficientnet_lite0", "tf_efficientnetv2_b0", "mixnet_s",
    "tf_mixnet_s", "mobilenetv2_050", "mobilenetv3_small_050", "mnasnet_050", "fbnetc_100", "spnasnet_100",
    "ghostnet_050", "hardcorenas_a", "lcnet_050", "rexnet_100", "tinynet_e", "mobileone_s0",
    # normalization-free / others
    "dm_nfnet_f0", "nf_resnet26", "convnext_atto",
]
TORCHVISION_MODELS: list[str] = [
    "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "densenet121", "googlenet", "inception_v3",
    "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "mnasnet0_5", "shufflenet_v2_x0_5",
    "squeezenet1_0", "alexnet", "vgg11_bn", "efficientnet_b0", "regnet_x_400mf", "regnet_y_400mf",
]
#: the fast representative slice that runs in the default test suite
FAST_SLICE: list[str] = ["timm:tf_efficientnet_b0", "timm:resnetv2_50x1_bit", "torchvision:googlenet",
                         "torchvision:mobilenet_v3_small"]
#: minimum input sizes (the architecture needs more than 32x32; torchvision's inception_v3 aux head in train
#: mode needs >= ~140)
MIN_SIZE: dict[str, int] = {"torchvision:inception_v3": 299, "inception_v3": 75, "alexnet": 63, "googlenet": 32, "dm_nfnet_f0": 64}

_RELU_FUNCS = {"relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "hardtanh"}


def create(spec: str, num_classes: int = 10) -> nn.Module:
    """``timm:NAME`` or ``torchvision:NAME`` -> an untrained model (no weights are downloaded)."""
    lib, _, name = spec.partition(":")
    if lib == "timm":
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    if lib == "torchvision":
        import torchvision

        kwargs: dict[str, Any] = {"weights": None, "num_classes": num_classes}
        if name in ("googlenet", "inception_v3"):
            kwargs["init_weights"] = False
        return torchvision.models.get_model(name, **kwargs)
    raise ValueError(f"unknown model spec {spec!r}: use timm:NAME or torchvision:NAME")


class _FunctionRecorder(TorchFunctionMode):
    """Records the torch functions called outside LCNN layers (``depth`` > 0 inside one)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []
        self.depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.depth == 0:
            self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@dataclass
class ZooResult:
    spec: str
    ok: bool = False
    traced: bool = True
    converted: dict[str, int] = field(default_factory=dict)
    left: dict[str, int] = field(default_factory=dict)
    voiding: int = 0
    train_step_ok: bool = False
    seconds_convert: float = 0.0
    problems: list[str] = field(default_factory=list)
    error: str = ""


def _executed(model: nn.Module, x: torch.Tensor) -> tuple[list[tuple[str, nn.Module, tuple]], list[str]]:
    names = {m: n for n, m in model.named_modules()}
    seen: list[tuple[str, nn.Module, tuple]] = []

    def hook(mod, args):
        shape = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else ()
        seen.append((names.get(mod, "?"), mod, shape))

    from lcnnify.nn import is_lcnn_layer

    rec = _FunctionRecorder()
    handles = [m.register_forward_pre_hook(hook) for m in model.modules()]
    for m in model.modules():
        if is_lcnn_layer(m):
            handles.append(m.register_forward_pre_hook(lambda *_: setattr(rec, "depth", rec.depth + 1)))
            handles.append(m.register_forward_hook(lambda *_: setattr(rec, "depth", rec.depth - 1)))
    try:
        with torch.no_grad(), rec:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen, rec.names


def check_model(spec: str, size: int = 32, batch: int = 2, num_classes: int = 10) -> ZooResult:
    """Convert, train one step and inspect one model (see module docstring)."""
    from lcnnify import lcnnify, param_groups
    from lcnnify.nn import LipschitzBatchNorm, find_conv_spectral_norm, is_lcnn_layer

    res = ZooResult(spec)
    size = max(size, MIN_SIZE.get(spec, MIN_SIZE.get(spec.partition(":")[2], 0)))
    try:
        torch.manual_seed(0)
        model = create(spec, num_classes)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        types_before = [type(m) for m in model.modules()]
        x = torch.rand(batch, 3, size, size)
        t0 = time.perf_counter()
        lc = lcnnify(model, example_inputs=x[:1])
        res.seconds_convert = time.perf_counter() - t0
        rep = lc.lcnn_report
        res.traced, res.converted, res.left = rep.traced, rep.converted_counts, rep.left_counts
        res.voiding = len(rep.voiding)
        # one training step
        lc.train()
        opt = torch.optim.SGD(param_groups(lc, 5e-4), lr=1e-3, momentum=0.9)
        out = lc(x)
        logits = out if isinstance(out, torch.Tensor) else out[0]
        if tuple(logits.shape) != (batch, num_classes):
            res.problems.append(f"output shape {tuple(logits.shape)} != {(batch, num_classes)}")
        loss = F.cross_entropy(logits, torch.randint(0, num_classes, (batch,))) + lc.curvature_penalty()
        loss.backward()
        opt.step()
        if not torch.isfinite(loss) or not all(torch.isfinite(p).all() for p in lc.parameters()):
            res.problems.append("non-finite loss or parameters after one step")
        res.train_step_ok = not res.problems
        # what executes now
        lc.eval()
        left_paths = {item.path for item in rep.left}
        seen, fnames = _executed(lc, x)
        for path, mod, shape in seen:
            if path in left_paths or any(path.startswith(p + ".") for p in left_paths if p != "<root>"):
                continue
            if isinstance(mod, (nn.ReLU, nn.ReLU6, nn.LeakyReLU)):
                res.problems.append(f"{path}: {type(mod).__name__} still executed")
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) or type(mod).__name__ == "FrozenBatchNorm2d":
                if not isinstance(mod, LipschitzBatchNorm):
                    res.problems.append(f"{path}: plain {type(mod).__name__} still executed")
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                sn = find_conv_spectral_norm(mod)
                if sn is None:
                    res.problems.append(f"{path}: {type(mod).__name__} executed without spectral norm")
                elif sn.input_shape != shape[1:]:
                    res.problems.append(f"{path}: spectral norm at {sn.input_shape}, sees {shape[1:]}")
            if isinstance(mod, nn.Linear) and not is_lcnn_layer(mod):
                res.problems.append(f"{path}: Linear executed without spectral norm")
        relu_calls = [f for f in fnames if f in _RELU_FUNCS]
        if relu_calls and not rep.fallbacks:  # (untraced forwards are reported as such)
            res.problems.append(f"functional ReLU-family calls still executed: {sorted(set(relu_calls))}")
        # the original is untouched
        after = model.state_dict()
        if before.keys() != after.keys() or any(not torch.equal(before[k], after[k]) for k in before):
            res.problems.append("original model's state dict changed")
        if [type(m) for m in model.modules()] != types_before:
            res.problems.append("original model's modules changed")
        res.ok = not res.problems
    except Exception as e:  # noqa: BLE001 - a zoo sweep records failures
        res.error = f"{type(e).__name__}: {str(e)[:400]}"
    return res
