"""Small model factory for the command line and the demo.

Model specs (the strings ``lcnnify convert`` / ``lcnnify train --model`` accept):

* ``timm:NAME`` -- ``timm.create_model(NAME, pretrained=False, num_classes=..., in_chans=...)``;
* ``torchvision:NAME`` -- ``torchvision.models.get_model(NAME, weights=None, num_classes=...)`` (inputs with other
  than 3 channels get a fixed channel-repeat/average stem in front, see :class:`ChannelAdapter`);
* built-in plain-torch ReLU models: ``small_cnn`` (the demo's digits CNN: 3 conv-BN-ReLU blocks, global average
  pool, linear), ``mlp`` (Linear-BN-ReLU blocks, for vector inputs such as two moons), and the paper's §5
  architectures in their CIFAR form (as in the LCNN authors' code): ``cifar_resnet18``, ``cifar_resnet34``
  (:class:`CifarResNet`: a 3x3 stride-1 stem, no max-pool) and ``cifar_vgg11`` (:class:`CifarVGG`: VGG-11 with
  BatchNorm whose max-pools are 2x2 average pools, so that the curvature guarantee holds).

Nothing is ever downloaded (``pretrained=False`` / ``weights=None``). Every model is an ordinary ReLU network,
i.e. a model *before* conversion: the LCNN methods convert it with :func:`lcnnify.lcnnify`.
"""
from __future__ import annotations

import difflib
import math
from typing import Sequence

import torch
from torch import nn

from .errors import LCNNError

__all__ = ["SmallCNN", "MLP", "CifarResNet", "CifarVGG", "cifar_resnet18", "cifar_resnet34", "cifar_vgg11",
           "ChannelAdapter", "create_model", "parse_model_spec", "BUILTIN_MODELS", "DEFAULT_WIDTHS",
           "UnknownModelError"]

#: Built-in model names (no prefix).
BUILTIN_MODELS = ("small_cnn", "mlp", "cifar_resnet18", "cifar_resnet34", "cifar_vgg11")
#: Default ``width`` of each built-in model (the paper's architectures: 64, the first stage's channels).
DEFAULT_WIDTHS = {"small_cnn": 16, "mlp": 64, "cifar_resnet18": 64, "cifar_resnet34": 64, "cifar_vgg11": 64}


class UnknownModelError(LCNNError, ValueError):
    """A model spec names no model we can build (the message lists close matches and the valid forms)."""


class SmallCNN(nn.Module):
    """A small ReLU + BatchNorm CNN: three conv-BN-ReLU blocks (the last two with stride 2), global average
    pooling, a linear classifier. ~14k parameters at ``width=16``; made for 8x8..32x32 inputs (digits)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        c1, c2 = width, 2 * width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU(),
            nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(),
            nn.Conv2d(c2, c2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class MLP(nn.Module):
    """``depth`` Linear-BatchNorm1d-ReLU blocks and a linear classifier (for vector inputs, e.g. two moons)."""

    def __init__(self, in_features: int = 2, num_classes: int = 2, width: int = 64, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_features
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.BatchNorm1d(width), nn.ReLU()]
            d = width
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(d, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(torch.flatten(x, 1)))


class _BasicBlock(nn.Module):
    """The ResNet basic block: conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut (a 1x1 conv + BN when the shape
    changes), then ReLU. Every ReLU call site is its own module."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of the paper's §5 (He et al. 2016 basic blocks, as in the LCNN authors' code): a 3x3
    stride-1 conv stem with BN and ReLU and **no max-pool**, four stages of basic blocks with ``width``,
    ``2 width``, ``4 width``, ``8 width`` channels (strides 1, 2, 2, 2), global average pooling and a linear
    classifier. ``blocks=(2, 2, 2, 2)`` is ResNet-18, ``(3, 4, 6, 3)`` ResNet-34. Every operation is a conv,
    BN, ReLU, residual add, average pool or linear, so ``lcnnify`` converts all of it and the curvature
    guarantee holds (an ImageNet ResNet's max-pool stem voids it)."""

    def __init__(self, blocks: Sequence[int] = (2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3,
                 width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        stages, c = [], width
        for i, n in enumerate(blocks):
            c_out = width * 2 ** i
            layers = []
            for j in range(n):
                layers.append(_BasicBlock(c, c_out, stride=(1 if i == 0 or j > 0 else 2)))
                c = c_out
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


#: VGG-11 ("configuration A"): channels of the conv layers in units of ``width / 64``; "P" is a down-sampling.
_VGG11 = (64, "P", 128, "P", 256, 256, "P", 512, 512, "P", 512, 512, "P")


class CifarVGG(nn.Module):
    """VGG-11 for CIFAR (the paper's §5; as in the LCNN authors' code): 3x3 conv-BN-ReLU layers with 64, 128,
    256, 256, 512, 512, 512, 512 channels (times ``width / 64``) and five down-samplings, then a linear
    classifier on the 1x1 map (global average pooling, so other input sizes work too).

    The down-samplings are **2x2 average pools (stride 2) instead of VGG's max-pools**: max-pool is not
    differentiable where two inputs tie, so it voids the LCNN curvature guarantee; an average pool is linear with
    l2 operator norm 1/2 (each output averages 4 disjoint inputs: ||A||_2 = 4^(1/2) / 4), so it keeps both the
    Lipschitz and the curvature bound and down-samples exactly as the max-pool did (same shapes, no new
    parameters). Inputs need >= 32x32 pixels (five halvings)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 64,
                 config: Sequence[int | str] = _VGG11) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in config:
            if v == "P":
                layers.append(nn.AvgPool2d(2, stride=2))
            else:
                c_out = max(1, int(v) * width // 64)
                layers += [nn.Conv2d(c, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
                c = c_out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def cifar_resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> CifarResNet:
    """ResNet-18 for CIFAR (3x3 stem, no max-pool): the paper's main architecture (§5)."""
    return CifarResNet((2, 2, 2, 2), num_classes, in_channels, width)


def cifar_resnet34(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> CifarResNet:
    """ResNet-34 for CIFAR (3x3 stem, no max-pool)."""
    return CifarResNet((3, 4, 6, 3), num_classes, in_channels, width)


def cifar_vgg11(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> CifarVGG:
    """VGG-11 with BatchNorm for CIFAR, 2x2 average pools in place of the max-pools (see :class:`CifarVGG`)."""
    return CifarVGG(num_classes, in_channels, width)


_CIFAR_BUILDERS = {"cifar_resnet18": cifar_resnet18, "cifar_resnet34": cifar_resnet34, "cifar_vgg11": cifar_vgg11}


class ChannelAdapter(nn.Module):
    """A fixed (parameter-free, linear) map from ``in_channels`` to ``out_channels`` image channels:
    repeat a single channel, or average to one and repeat. Lets a 3-channel torchvision model read 1-channel
    images (digits) without changing its architecture; linear, so it keeps the curvature bound."""

    def __init__(self, in_channels: int, out_channels: int = 3) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels != 1:
            x = x.mean(1, keepdim=True)
        return x.expand(-1, self.out_channels, *x.shape[2:])


class _Adapted(nn.Module):
    def __init__(self, adapter: nn.Module, net: nn.Module) -> None:
        super().__init__()
        self.adapter, self.net = adapter, net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.adapter(x))


def parse_model_spec(spec: str) -> tuple[str, str]:
    """``"timm:resnet18"`` -> ``("timm", "resnet18")``; ``"small_cnn"`` -> ``("builtin", "small_cnn")``."""
    if not isinstance(spec, str) or not spec.strip():
        raise UnknownModelError("empty model name; use timm:NAME, torchvision:NAME or one of "
                                + ", ".join(BUILTIN_MODELS))
    spec = spec.strip()
    if ":" in spec:
        source, name = spec.split(":", 1)
        source = source.lower()
        if source in ("lcnnify", "builtin"):
            source = "builtin"
        if source not in ("timm", "torchvision", "builtin"):
            raise UnknownModelError(f"unknown model source {source!r} in {spec!r}; use timm:NAME, "
                                    f"torchvision:NAME or a built-in model ({', '.join(BUILTIN_MODELS)})")
        if not name:
            raise UnknownModelError(f"model spec {spec!r} has no model name after {source!r}:")
        return source, name
    return "builtin", spec


def _suggest(name: str, names: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=5, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def _timm_model(name: str, num_classes: int, in_chans: int) -> nn.Module:
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - timm is an optional dependency
        raise UnknownModelError(f"timm:{name} needs the timm package (pip install timm)") from exc
    if not timm.is_model(name):
        raise UnknownModelError(f"unknown timm model {name!r}.{_suggest(name, timm.list_models())} "
                                "(list them with: python -c 'import timm; print(timm.list_models())')")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)


def _torchvision_model(name: str, num_classes: int, in_chans: int) -> nn.Module:
    try:
        from torchvision import models
    except ImportError as exc:  # pragma: no cover
        raise UnknownModelError(f"torchvision:{name} needs the torchvision package") from exc
    names = models.list_models(module=models)  # classification models only
    if name not in names:
        raise UnknownModelError(f"unknown torchvision classification model {name!r}.{_suggest(name, names)} "
                                "(list them with: python -c 'import torchvision; "
                                "print(torchvision.models.list_models(module=torchvision.models))')")
    kwargs = {"weights": None, "num_classes": num_classes}
    if name.startswith(("inception", "googlenet")):
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = True
    net = models.get_model(name, **kwargs)
    if in_chans != 3:
        net = _Adapted(ChannelAdapter(in_chans, 3), net)
    return net


def create_model(spec: str, num_classes: int = 10, input_shape: Sequence[int] = (1, 16, 16), *,
                 width: int | None = None) -> nn.Module:
    """Build the (ReLU, unconverted) model named by ``spec`` with randomly initialised weights.

    Args:
        spec: ``timm:NAME``, ``torchvision:NAME`` or a built-in model (:data:`BUILTIN_MODELS`).
        num_classes: classifier outputs.
        input_shape: one input without the batch dimension: ``(C, H, W)`` for CNNs, ``(D,)`` for ``mlp``.
        width: channel / hidden width of the built-in models (default :data:`DEFAULT_WIDTHS`).

    Raises:
        UnknownModelError: the spec names no model (the message suggests close names).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    source, name = parse_model_spec(spec)
    shape = tuple(int(s) for s in input_shape)
    if source == "timm":
        return _timm_model(name, num_classes, shape[0])
    if source == "torchvision":
        return _torchvision_model(name, num_classes, shape[0])
    if name not in BUILTIN_MODELS:
        raise UnknownModelError(f"unknown model {spec!r}.{_suggest(name, BUILTIN_MODELS)} Use timm:NAME, "
                                f"torchvision:NAME or a built-in model ({', '.join(BUILTIN_MODELS)})")
    width = DEFAULT_WIDTHS[name] if width is None else int(width)
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    if name == "mlp":
        return MLP(in_features=int(math.prod(shape)), num_classes=num_classes, width=max(width, 2))
    if len(shape) != 3:
        raise ValueError(f"{name} takes images (C, H, W), got input shape {shape}")
    if name == "small_cnn":
        return SmallCNN(num_classes=num_classes, in_channels=shape[0], width=width)
    return _CIFAR_BUILDERS[name](num_classes=num_classes, in_channels=shape[0], width=width)
