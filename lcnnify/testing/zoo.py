"""The model zoo: which timm / torchvision CNNs lcnnify is checked on, and the per-model check.

Two lists:

* the **family sweep** — one representative, the smallest by parameter count, of every timm model family that
  is a CNN (a family is a timm model module: ``timm.list_modules()``; families whose blocks mix tokens by
  self-attention, recurrence or token MLPs are excluded in :data:`TIMM_NOT_CNN`, each with its reason), and
  likewise of every torchvision classification family (the module of the model builder:
  ``torchvision.models.list_models(module=torchvision.models)``; :data:`TORCHVISION_NOT_CNN`). The choice is
  computed by :func:`select_representatives` and cached in :data:`FAMILY_REPRESENTATIVES`;
* the **curated list** (:data:`TIMM_MODELS`, :data:`TORCHVISION_MODELS`): hand-picked variants that exercise
  layers a family's smallest member may not have (TF "SAME" padding, CondConv, MixedConv, NF weight
  standardization, ...).

:func:`check_model` converts one model, trains it a few SGD steps with the curvature penalty and checks the LCNN
contract on what actually EXECUTES (see its docstring).
"""
from __future__ import annotations

import copy
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

# ====================================================================================== the curated list
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

#: the fast representative slice of the family sweep that runs in the default test suite: BatchNormAct + ReLU6
#: (timm efficientnet family), element-wise products (starnet), channel shuffle (shufflenet), no norm + dropout
#: + max-pool + concatenation (squeezenet)
FAST_SLICE: list[str] = ["timm:mobilenetv2_035", "timm:starnet_s050", "torchvision:shufflenet_v2_x0_5",
                         "torchvision:squeezenet1_1"]

# ====================================================================================== the families
_ATTN = "self-attention blocks ({}): a transformer / hybrid, not a CNN"
#: timm model modules that are not CNN families, and why. Every other module of ``timm.list_modules()`` is a CNN
#: family and gets a representative; a family that fails the check stays in the sweep as a failure.
TIMM_NOT_CNN: dict[str, str] = {
    # plain / distilled / multimodal vision transformers
    **{m: _ATTN.format("ViT") for m in (
        "beit", "cait", "convit", "crossvit", "deepseek_vit", "deit", "eva", "gemma4_vit", "naflexvit", "pit",
        "qwen3_vit", "tnt", "vision_transformer", "vision_transformer_relpos", "vision_transformer_sam", "xcit",
        "volo")},
    # hierarchical / windowed transformers
    **{m: _ATTN.format("hierarchical transformer") for m in (
        "coat", "davit", "gcvit", "hiera", "hieradet_sam2", "mvitv2", "nest", "pvt_v2", "swin_transformer",
        "swin_transformer_v2", "swin_transformer_v2_cr", "twins", "tiny_vit")},
    # conv + attention hybrids (every member runs attention)
    "vision_transformer_hybrid": _ATTN.format("ResNet stem + ViT"),
    "byoanet": _ATTN.format("bottleneck / halo / lambda attention in every ResNet stage"),
    "maxxvit": _ATTN.format("CoAtNet / MaxViT: window and grid attention"),
    "mobilevit": _ATTN.format("MobileViT transformer blocks"),
    "efficientformer": _ATTN.format("attention in the last stage"),
    "efficientformer_v2": _ATTN.format("attention in the last stages"),
    "efficientvit_mit": _ATTN.format("multi-scale ReLU linear attention"),
    "efficientvit_msra": _ATTN.format("cascaded group attention"),
    "levit": _ATTN.format("LeViT attention"),
    "edgenext": _ATTN.format("split depth-wise transposed (cross-covariance) attention"),
    "visformer": _ATTN.format("attention in stages 2-3"),
    "nextvit": _ATTN.format("E-MHSA in every stage"),
    "swiftformer": _ATTN.format("efficient additive attention: an L2-normalized global query, element-wise"),
    "shvit": _ATTN.format("single-head attention"),
    "lowformer": _ATTN.format("lowtention (scaled dot-product attention)"),
    "iformer": _ATTN.format("single-head modulation attention"),
    "vitamin": _ATTN.format("ViTamin transformer stages"),
    "csatv2": _ATTN.format("transformer blocks after a DCT stem"),
    "cpubone": _ATTN.format("ConvAttention (scaled dot-product attention) in every variant"),
    "mobilenetv5": _ATTN.format("Mobile MQA blocks in every variant"),
    # token mixing that is neither convolution nor attention
    "mlp_mixer": "token-mixing MLPs (MLP-Mixer / ResMLP / gMLP): not a CNN",
    "sequencer": "bidirectional LSTM token mixing: not a CNN",
    "efficientvim": "state-space (Mamba-style hidden state mixer) token mixing: not a CNN",
}
#: torchvision model modules (``get_model_builder(name).__module__``) that are not CNNs, and why.
TORCHVISION_NOT_CNN: dict[str, str] = {
    "vision_transformer": _ATTN.format("ViT"),
    "swin_transformer": _ATTN.format("Swin"),
    "maxvit": _ATTN.format("MaxViT: window and grid attention"),
}
#: candidate input sizes, smallest first (the check uses the smallest one the model accepts in train and eval)
INPUT_SIZES: tuple[int, ...] = (64, 96, 128, 160, 192, 224, 256, 299, 320, 331)


@dataclass(frozen=True)
class Representative:
    """One entry of the family sweep: ``spec`` (``timm:NAME`` / ``torchvision:NAME``) of ``family``, with its
    parameter count (``num_classes=10``) and the smallest input size in :data:`INPUT_SIZES` it accepts."""

    family: str
    spec: str
    parameters: int
    size: int


#: The family sweep, as computed by :func:`select_representatives` (timm 1.0.31, torchvision 0.29.1);
#: regenerate with ``python benchmarks/zoo.py --select``. A test checks it against the installed libraries.
FAMILY_REPRESENTATIVES: list[Representative] = [
    Representative("timm:byobnet", "timm:mobileone_s1", 3557002, 64),
    Representative("timm:convmixer", "timm:convmixer_768_32", 20348938, 64),
    Representative("timm:convnext", "timm:convnext_zepto_rms", 1901226, 64),
    Representative("timm:cspnet", "timm:cs3darknet_focus_s", 2766858, 64),
    Representative("timm:cspnext", "timm:cspnext_tiny", 2352550, 64),
    Representative("timm:densenet", "timm:densenet121", 6964106, 64),
    Representative("timm:dla", "timm:dla46x_c", 814010, 64),
    Representative("timm:dpn", "timm:dpn48b", 8301556, 64),
    Representative("timm:efficientnet", "timm:mobilenetv2_035", 408938, 64),
    Representative("timm:fasternet", "timm:fasternet_t0", 2637310, 64),
    Representative("timm:fastvit", "timm:fastvit_t8", 3264922, 64),
    Representative("timm:focalnet", "timm:focalnet_tiny_srf", 27665806, 64),
    Representative("timm:ghostnet", "timm:ghostnet_050", 1319102, 64),
    Representative("timm:hardcorenas", "timm:hardcorenas_b", 3908354, 64),
    Representative("timm:hgnet", "timm:hgnetv2_b0", 3968040, 64),
    Representative("timm:hrnet", "timm:hrnet_w18_small", 11158954, 64),
    Representative("timm:inception_next", "timm:inception_next_atto", 3205130, 64),
    Representative("timm:inception_resnet_v2", "timm:inception_resnet_v2", 54321834, 96),
    Representative("timm:inception_v3", "timm:inception_v3", 21806058, 96),
    Representative("timm:inception_v4", "timm:inception_v4", 41158186, 96),
    Representative("timm:lcnetv2", "timm:lcnetv2_small", 2860362, 64),
    Representative("timm:mambaout", "timm:mambaout_femto", 6163066, 64),
    Representative("timm:metaformer", "timm:poolformerv2_s12", 11383842, 64),
    Representative("timm:mobilenetv3", "timm:lcnet_035", 376180, 64),
    Representative("timm:nasnet", "timm:nasnetalarge", 84760480, 64),
    Representative("timm:nfnet", "timm:nf_regnet_b0", 7812898, 64),
    Representative("timm:pnasnet", "timm:pnasnet5large", 81779878, 64),
    Representative("timm:rdnet", "timm:rdnet_tiny", 22832418, 64),
    Representative("timm:regnet", "timm:regnetx_002", 2319482, 64),
    Representative("timm:repghost", "timm:repghostnet_050", 1045778, 64),
    Representative("timm:repvit", "timm:repvit_m1", 4722948, 64),
    Representative("timm:res2net", "timm:res2next50", 22642954, 64),
    Representative("timm:resnest", "timm:resnest14d", 8583178, 64),
    Representative("timm:resnet", "timm:resnet10t", 4927618, 64),
    Representative("timm:resnetv2", "timm:resnetv2_18", 11179850, 64),
    Representative("timm:rexnet", "timm:rexnet_100", 3528683, 64),
    Representative("timm:selecsls", "timm:selecsls42", 29086762, 64),
    Representative("timm:senet", "timm:legacy_seresnet18", 11270722, 64),
    Representative("timm:sknet", "timm:skresnet18", 11450186, 64),
    Representative("timm:starnet", "timm:starnet_s050", 415018, 64),
    Representative("timm:tresnet", "timm:tresnet_m", 29360522, 64),
    Representative("timm:vgg", "timm:vgg11", 128807306, 64),
    Representative("timm:vovnet", "timm:ese_vovnet19b_slim_dw", 1389882, 64),
    Representative("timm:xception", "timm:legacy_xception", 20827442, 64),
    Representative("timm:xception_aligned", "timm:xception41p", 24879242, 64),
    Representative("torchvision:alexnet", "torchvision:alexnet", 57044810, 64),
    Representative("torchvision:convnext", "torchvision:convnext_tiny", 27827818, 64),
    Representative("torchvision:densenet", "torchvision:densenet121", 6964106, 64),
    Representative("torchvision:efficientnet", "torchvision:efficientnet_b0", 4020358, 64),
    Representative("torchvision:googlenet", "torchvision:googlenet", 9960638, 64),
    Representative("torchvision:inception", "torchvision:inception_v3", 24371444, 299),
    Representative("torchvision:mnasnet", "torchvision:mnasnet0_5", 950322, 64),
    Representative("torchvision:mobilenetv2", "torchvision:mobilenet_v2", 2236682, 64),
    Representative("torchvision:mobilenetv3", "torchvision:mobilenet_v3_small", 1528106, 64),
    Representative("torchvision:regnet", "torchvision:regnet_y_400mf", 3907554, 64),
    Representative("torchvision:resnet", "torchvision:resnet18", 11181642, 64),
    Representative("torchvision:shufflenetv2", "torchvision:shufflenet_v2_x0_5", 352042, 64),
    Representative("torchvision:squeezenet", "torchvision:squeezenet1_1", 727626, 64),
    Representative("torchvision:vgg", "torchvision:vgg11", 128807306, 64),
]


def timm_families() -> dict[str, list[str]]:
    """timm's CNN families: model module -> model names (``timm.list_models(module=...)``), minus
    :data:`TIMM_NOT_CNN` and timm's own unit-test configurations (``test_*``, not published architectures)."""
    import timm

    return {m: [n for n in timm.list_models(module=m) if not n.startswith("test_")]
            for m in sorted(timm.list_modules()) if m not in TIMM_NOT_CNN}


def torchvision_families() -> dict[str, list[str]]:
    """torchvision's CNN classification models: builder module -> model names, minus :data:`TORCHVISION_NOT_CNN`."""
    import torchvision
    from torchvision.models import get_model_builder, list_models

    out: dict[str, list[str]] = {}
    for name in list_models(module=torchvision.models):
        module = get_model_builder(name).__module__.rsplit(".", 1)[-1]
        if module not in TORCHVISION_NOT_CNN:
            out.setdefault(module, []).append(name)
    return out


def create(spec: str, num_classes: int = 10) -> nn.Module:
    """``timm:NAME`` or ``torchvision:NAME`` -> an untrained model (no weights are downloaded). Created on the
    current default device (``with torch.device("meta"):`` gives a model without memory)."""
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


def _create_meta(spec: str) -> nn.Module:
    """The model with its parameters on the meta device (no memory, no initialisation cost); builders that
    compute with tensors while building (torchvision RegNet) are built on the CPU with parameters moved to meta."""
    try:
        with torch.device("meta"):
            return create(spec)
    except NotImplementedError:
        return create(spec).to("meta")


_MATMULS = {torch.matmul, torch.bmm, torch.baddbmm, torch.einsum, torch.Tensor.__matmul__, torch.Tensor.matmul,
            torch.Tensor.bmm, F.scaled_dot_product_attention, F.multi_head_attention_forward}


class _TokenMixingRecorder(TorchFunctionMode):
    """Records products of two activations by matrix multiplication (attention's q k^T and attn v)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MATMULS:
            operands = [a for a in (*args, *kwargs.values())
                        if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter)]
            if len(operands) >= 2:
                self.found.add(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


def token_mixing_ops(model: nn.Module, size: int) -> list[str]:
    """What in ``model`` mixes tokens other than by convolution: matrix products of two activations
    (self-attention) and recurrent modules, found by one eval forward at ``size`` (on the model's device; a meta
    model costs nothing)."""
    found = {type(m).__name__ for m in model.modules() if isinstance(m, (nn.RNNBase, nn.MultiheadAttention))}
    device = next(model.parameters()).device
    rec = _TokenMixingRecorder()
    was = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), rec:
            model(torch.zeros(1, 3, size, size, device=device))
    finally:
        for m, flag in was.items():
            m.training = flag
    return sorted(found | rec.found)


def smallest_input_size(model: nn.Module, sizes: Iterable[int] = INPUT_SIZES) -> int | None:
    """The smallest of ``sizes`` at which ``model`` runs forward in train mode (batch 2) and in eval mode
    (shape checks only when ``model`` is on the meta device). None when none does."""
    device = next(model.parameters()).device
    was = {m: m.training for m in model.modules()}
    try:
        for s in sizes:
            x = torch.zeros(2, 3, s, s, device=device)
            try:
                with torch.no_grad():
                    model.train()
                    model(x)
                    model.eval()
                    model(x)
            except Exception:  # noqa: BLE001 - too small an input is reported by any exception type
                continue
            return s
        return None
    finally:
        for m, flag in was.items():
            m.training = flag


def select_representatives(progress: Callable[[str], None] | None = None) -> list[Representative]:
    """Compute the family sweep: for each CNN family (:func:`timm_families`), its smallest member by parameter
    count that runs no token mixing (:func:`token_mixing_ops`) and accepts one of :data:`INPUT_SIZES`; the
    same for each torchvision CNN family (:func:`torchvision_families`). Builds every candidate on the meta
    device (a few minutes)."""
    out: list[Representative] = []
    for lib, families, fix in (("timm", timm_families(), "add it to TIMM_NOT_CNN"),
                               ("torchvision", torchvision_families(), "update TORCHVISION_NOT_CNN")):
        for family, names in families.items():
            for params, name in sorted((_count(f"{lib}:{n}"), n) for n in names):
                meta = _create_meta(f"{lib}:{name}")
                size = smallest_input_size(meta)
                if size is not None and not token_mixing_ops(meta, size):
                    out.append(Representative(f"{lib}:{family}", f"{lib}:{name}", params, size))
                    break
                if progress:
                    progress(f"{lib}:{name} skipped: size {size}, token mixing {token_mixing_ops(meta, size or 224)}")
            else:
                raise RuntimeError(f"{lib} family {family!r} has no convolutional member: {fix}")
            if progress:
                progress(f"{out[-1]}")
    return out


def _count(spec: str) -> int:
    return sum(p.numel() for p in _create_meta(spec).parameters())


# ====================================================================================== the check
#: ReLU-family activations: every one must become a CenteredSoftplus
_RELU_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.PReLU, nn.RReLU, nn.Threshold)
#: functions that must not run outside an LCNN layer unless the conversion report names them
_RELU_FUNCS = {"relu", "relu6", "leaky_relu", "hardtanh", "threshold", "prelu", "rrelu"}
_LINEAR_FUNCS = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
                 "linear", "batch_norm"}


@dataclass
class ZooResult:
    """The outcome of :func:`check_model` for one model.

    ``status``: ``"converted"`` (traced, every check passed), ``"fallback"`` (every check passed, some module
    converted module by module because it could not be traced) or ``"failed"`` (``error`` and/or ``problems``
    say why; ``clear_error`` tells whether the conversion refused with an :class:`lcnnify.errors.LCNNError`)."""

    spec: str
    family: str = ""
    size: int = 0
    status: str = "failed"
    ok: bool = False
    traced: bool = True
    converted: dict[str, int] = field(default_factory=dict)
    left: dict[str, int] = field(default_factory=dict)
    voiding: int = 0
    fallbacks: list[str] = field(default_factory=list)
    train_step_ok: bool = False
    max_norm_error: float = 0.0
    seconds_convert: float = 0.0
    seconds_total: float = 0.0
    problems: list[str] = field(default_factory=list)
    error: str = ""
    clear_error: bool = False

    @property
    def reason(self) -> str:
        """One line: why the model failed ("" when it passed)."""
        if self.ok:
            return ""
        return self.error or "; ".join(self.problems[:3]) + (" ..." if len(self.problems) > 3 else "")


class _ExecutionRecorder(TorchFunctionMode):
    """Records, for every torch function called outside an LCNN layer, its name and the innermost module path."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []
        self.stack: list[str] = [""]
        self.depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.depth == 0:
            self.calls.append((getattr(func, "__name__", str(func)), self.stack[-1]))
        return func(*args, **(kwargs or {}))


def _executed(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[str, nn.Module, tuple]],
                                                           list[tuple[str, str]]]:
    """One no-grad forward of ``model``: (its output, the modules that ran with their input shape, the torch
    functions called outside LCNN layers with the module they were called from)."""
    from lcnnify.nn import is_lcnn_layer

    rec = _ExecutionRecorder()
    seen: list[tuple[str, nn.Module, tuple]] = []

    def enter(path: str, lcnn: bool):
        def hook(mod, args):
            shape = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else ()
            seen.append((path, mod, shape))
            rec.stack.append(path)
            rec.depth += lcnn
        return hook

    def leave(lcnn: bool):
        def hook(mod, args, out):
            rec.stack.pop()
            rec.depth -= lcnn
        return hook

    handles = []
    for path, m in model.named_modules():
        lcnn = is_lcnn_layer(m)
        # prepend: count the depth before the layer's own pre-hooks (power-iteration warm-ups) run
        handles.append(m.register_forward_pre_hook(enter(path, lcnn), prepend=True))
        handles.append(m.register_forward_hook(leave(lcnn), always_call=True))
    try:
        with torch.no_grad(), rec:
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, seen, rec.calls


def _logits(out: Any) -> torch.Tensor:
    """The main output of a classifier (torchvision GoogLeNet / Inception return (logits, aux...) in train)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return next(iter(out.values()))
    return out[0]


def _modes(model: nn.Module) -> list[tuple[str, bool]]:
    return [(n, m.training) for n, m in model.named_modules()]


def _bare(op: str) -> str:
    """``F.relu_`` / ``torch.relu`` / ``Tensor.relu`` -> ``relu``."""
    return op.rsplit(".", 1)[-1].rstrip("_").lower()


def _is_fixed_linear_op(mod: nn.Module) -> bool:
    """A module :mod:`lcnnify.ops` registers as a linear op the conversion keeps as it is (no ``convert``) and
    that does not void the guarantee: average pools, padding, timm's BlurPool2d."""
    try:
        from lcnnify.ops import Call, Family, spec_for_module
    except ImportError:  # pragma: no cover - a registry-less lcnnify
        return False
    spec = spec_for_module(mod)
    if spec is None or spec.family != Family.LINEAR or spec.convert is not None:
        return False
    return spec.void_reason(Call("call_module", type(mod), module=mod, spec=spec)) is None


def _execution_problems(lc: nn.Module, report: Any, seen, calls) -> list[str]:
    """What ran that is neither an LCNN layer nor named in the conversion report."""
    from lcnnify.nn import LipschitzBatchNorm, find_conv_spectral_norm, is_lcnn_layer

    left_paths = {item.path for item in report.left} | {f.path for f in report.fallbacks}
    # fixed linear ops the op registry knows and keeps (pools, padding, blur filters: F.conv2d with a fixed
    # averaging kernel inside is no un-normalized layer)
    fixed_paths = {path for path, mod, _ in seen if _is_fixed_linear_op(mod)}

    def reported(path: str) -> bool:
        return "" in left_paths or any(path == p or path.startswith(p + ".") for p in left_paths | fixed_paths)

    problems: list[str] = []
    for path, mod, shape in seen:
        if reported(path) or is_lcnn_layer(mod):
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and not reported(path):
                sn = find_conv_spectral_norm(mod)
                if sn is not None and shape and sn.input_shape != shape[1:]:
                    problems.append(f"{path}: spectral norm computed for input {sn.input_shape}, sees {shape[1:]}")
            continue
        kind = type(mod).__name__
        if isinstance(mod, _RELU_MODULES):
            problems.append(f"{path}: {kind} still executed")
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm) or kind.startswith("FrozenBatchNorm"):
            if not isinstance(mod, LipschitzBatchNorm):
                problems.append(f"{path}: plain {kind} still executed")
        elif isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)):
            problems.append(f"{path}: {kind} executed without spectral normalization")
        elif type(mod).__module__ in ("torch.nn.modules.activation", "torch.nn.modules.normalization"):
            problems.append(f"{path}: {kind} executed but neither converted nor in the report")
    # functional calls from outside any reported module: allowed as often as the report names them
    allowed: dict[str, int] = {}
    for item in report.left:
        allowed[_bare(item.op)] = allowed.get(_bare(item.op), 0) + 1
    counts: dict[str, int] = {}
    for func, path in calls:
        name = _bare(func)
        if (name in _RELU_FUNCS or name in _LINEAR_FUNCS) and not reported(path):
            counts[name] = counts.get(name, 0) + 1
    for name, n in sorted(counts.items()):
        if n > allowed.get(name, 0):
            what = "ReLU-family activation" if name in _RELU_FUNCS else "un-normalized linear op"
            problems.append(f"functional {name} ({what}) executed {n}x outside LCNN layers "
                            f"(report names {allowed.get(name, 0)})")
    return problems


def execution_problems(lc: nn.Module, x: torch.Tensor) -> list[str]:
    """Run ``lc`` (a converted model, in its current mode) on ``x`` and list what executed that is neither an
    LCNN layer nor named in ``lc.lcnn_report``: ReLU-family activations (modules, or functions called more
    often than the report names them), plain BatchNorm, convs / linears without spectral normalization (modules
    or functional calls), convs normalized for another input shape, and any torch.nn activation or
    normalization module the report does not name."""
    _, seen, calls = _executed(lc, x)
    return _execution_problems(lc, lc.lcnn_report, seen, calls)


def lanczos_operator_norm(module: nn.Module, input_shape: tuple[int, ...], steps: int = 64, seed: int = 0) -> float:
    """||A||_2 of the linear part of ``module`` on inputs of shape ``input_shape`` (no batch), where
    ``A v = module(v) - module(0)`` is the module's own forward (its padding, stride, groups, dynamic "SAME"
    padding...) and ``A^T`` its autograd vector-Jacobian product: independent of any spectral-norm code.

    ``steps`` Lanczos steps on A^T A with full re-orthogonalization (float64 recurrence), never stopped early (a
    small Ritz residual only says a Ritz value is near SOME eigenvalue, not the top one), from a seeded random
    start; exact (the eigenvalues of the dense Gram matrix) when the input has at most 512 entries. Lanczos
    approaches ||A|| from below."""
    from torch.nn.utils import parametrize

    w = next(module.parameters())
    zero = torch.zeros((1, *input_shape), dtype=w.dtype, device=w.device)
    n = zero.numel()
    with parametrize.cached():
        if n <= 512:
            with torch.no_grad():
                basis = torch.eye(n, dtype=w.dtype, device=w.device).view(n, *input_shape)
                dense = (module(basis) - module(zero)).reshape(n, -1).double()  # row i: A e_i
            return float(torch.linalg.eigvalsh(dense @ dense.T)[-1].clamp_min(0.0).sqrt())
        with torch.no_grad():
            offset = module(zero)

        def gram(v: torch.Tensor) -> torch.Tensor:  # A^T A v
            x = v.to(w.dtype).view_as(zero).requires_grad_(True)
            with torch.enable_grad():
                out = module(x) - offset
                (g,) = torch.autograd.grad(out, x, out.detach())
            return g.reshape(-1).double()

        gen = torch.Generator().manual_seed(seed)
        m_max = min(steps, n)
        q = torch.zeros(m_max, n, dtype=torch.float64, device=w.device)  # the Lanczos basis, one row per step
        q0 = torch.randn(n, generator=gen, dtype=torch.float64).to(w.device)
        q[0] = q0 / q0.norm()
        alphas: list[float] = []
        betas: list[float] = []
        for k in range(m_max):
            z = gram(q[k])
            alphas.append(float(z @ q[k]))
            basis = q[:k + 1]
            for _ in range(2):  # full re-orthogonalization (twice is enough)
                z -= basis.T @ (basis @ z)
            beta = float(z.norm())
            if beta <= 1e-12 * max(abs(alphas[-1]), 1e-300) or k == m_max - 1:
                break
            betas.append(beta)
            q[k + 1] = z / beta
        m = len(alphas)
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if m > 1:
            off = torch.tensor(betas[:m - 1], dtype=torch.float64)
            t += torch.diag(off, 1) + torch.diag(off, -1)
        return float(torch.linalg.eigvalsh(t)[-1].clamp_min(0.0).sqrt())


def operator_norms(lc: nn.Module, input_shapes: dict[str, tuple[int, ...]] | None = None,
                   tol: float = 1e-3) -> dict[str, float]:
    """The operator norm of every spectrally normalized layer as it is now: convs by
    :func:`lanczos_operator_norm` at the input shape they were seen with (``input_shapes``, path -> shape without
    batch; default: the shape their normalization knows), with a 4x longer second run from another start when
    the first is below 1 - ``tol`` (Lanczos approaches from below: the larger estimate is kept); linears by
    ``torch.linalg.matrix_norm(W, 2)`` (an SVD)."""
    from lcnnify.nn import find_conv_spectral_norm, is_lcnn_layer

    norms: dict[str, float] = {}
    for path, m in lc.named_modules():
        sn = find_conv_spectral_norm(m)
        if sn is not None:
            shape = (input_shapes or {}).get(path) or sn.input_shape
            if shape is not None:
                est = lanczos_operator_norm(m, tuple(shape))
                if est < 1.0 - tol:
                    est = max(est, lanczos_operator_norm(m, tuple(shape), steps=256, seed=1))
                norms[path] = est
        elif isinstance(m, nn.Linear) and is_lcnn_layer(m):
            with torch.no_grad():
                norms[path] = float(torch.linalg.matrix_norm(m.weight.detach().double(), 2))
    return norms


def below_sigma_floor(module: nn.Module) -> bool:
    """True when ``module``'s spectral normalization divides by its floor ``min_sigma`` instead of sigma: the
    weight entering it has operator norm below ``min_sigma`` (a zero or near-zero weight, e.g. a zero-initialised
    gain), and the layer is the plain map W / min_sigma, of operator norm < 1, by design. Found without the
    layer's estimate: the divisor is ||W_in||_F / ||W_out||_F (Frobenius norms of the weight entering the last
    parametrization and of the weight the layer uses)."""
    from torch.nn.utils import parametrize

    if not parametrize.is_parametrized(module, "weight"):
        return False
    plist = module.parametrizations["weight"]
    w_in = plist.original
    for p in list(plist)[:-1]:
        w_in = p(w_in)
    with torch.no_grad():
        n_in = float(torch.linalg.vector_norm(w_in.detach().double()))
        n_out = float(torch.linalg.vector_norm(module.weight.detach().double()))
    floor = float(getattr(plist[-1], "min_sigma", 0.0))
    if n_out == 0.0:
        return n_in == 0.0
    return floor > 0 and n_in / n_out <= floor * (1 + 1e-4)


def _freeze_first_norm(model: nn.Module) -> None:
    """Put the first normalization layer in eval mode (a user freezing a BN): conversion must keep such flags."""
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            m.eval()
            return


def check_model(spec: str, size: int | None = None, batch: int = 8, steps: int = 3, num_classes: int = 10,
                lr: float = 0.05, norm_tol: float = 1e-3, roundtrip: bool = True, family: str = "",
                factory: Callable[[], nn.Module] | None = None) -> ZooResult:
    """Convert ``spec`` (:func:`create`), train it and check the LCNN contract:

    1. conversion with ``example_inputs`` of shape (2, 3, size, size) (``size``: the smallest of
       :data:`INPUT_SIZES` the model accepts, when None);
    2. ``steps`` SGD steps (momentum 0.9, :func:`lcnnify.param_groups`) on cross-entropy +
       ``model.curvature_penalty()`` at batch ``batch``: loss, outputs, gradients and parameters finite;
    3. in eval, what EXECUTES: no ReLU-family activation (module or function), no plain BatchNorm, no conv or
       linear without spectral normalization (modules and functional calls), convs normalized for the input
       shape they see; anything else the report does not name is a problem;
    4. eval operator norms 1 +- ``norm_tol`` (:func:`operator_norms`; at most 1 + ``norm_tol`` for a layer whose
       weight is below its normalization's floor, :func:`below_sigma_floor`), two eval forwards identical
       (dropout off), outputs finite;
    5. the state dict loads (strict) into a fresh conversion of the same architecture and gives the same eval
       output;
    6. the original model is not mutated: state dict, module types, and every module's train/eval flag (one
       norm layer is frozen in eval mode before conversion, as a user fine-tuning with frozen BN does).

    ``factory`` (optional) builds the model instead of :func:`create` (called twice, under seeds 0 and 1).
    """
    from lcnnify import lcnnify, param_groups
    from lcnnify.errors import LCNNError

    res = ZooResult(spec, family=family)
    t_start = time.perf_counter()
    stage = "create"
    try:
        torch.manual_seed(0)
        make = factory or (lambda: create(spec, num_classes))
        model = make()
        if size is None:  # probed on a copy: a train-mode forward would update the original's statistics
            size = smallest_input_size(_create_meta(spec) if factory is None else copy.deepcopy(model))
            if size is None:
                raise ValueError(f"accepts none of the input sizes {INPUT_SIZES}")
        res.size = size
        model.train()
        _freeze_first_norm(model)
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        modes_before = _modes(model)
        types_before = [type(m) for m in model.modules()]
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(batch, 3, size, size, generator=gen)
        y = torch.randint(0, num_classes, (batch,), generator=gen)

        stage = "convert"
        t0 = time.perf_counter()
        lc = lcnnify(model, example_inputs=x[:2])
        res.seconds_convert = time.perf_counter() - t0
        rep = lc.lcnn_report
        res.traced, res.converted, res.left = rep.traced, rep.converted_counts, rep.left_counts
        res.voiding = len(rep.voiding)
        res.fallbacks = [f"{f.path or '<root>'}: {f.reason}" for f in rep.fallbacks]

        stage = "train"
        lc.train()
        opt = torch.optim.SGD(param_groups(lc, 5e-4), lr=lr, momentum=0.9)
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            logits = _logits(lc(x))
            if tuple(logits.shape) != (batch, num_classes):
                res.problems.append(f"output shape {tuple(logits.shape)} != {(batch, num_classes)}")
                break
            loss = F.cross_entropy(logits, y) + lc.curvature_penalty()
            loss.backward()
            bad = [n for n, p in lc.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            if not torch.isfinite(logits).all() or not torch.isfinite(loss):
                res.problems.append(f"step {step}: non-finite outputs or loss ({float(loss):.3g})")
            if bad:
                res.problems.append(f"step {step}: non-finite gradients in {bad[:3]}")
            opt.step()
            badp = [n for n, p in lc.named_parameters() if not torch.isfinite(p).all()]
            if badp:
                res.problems.append(f"step {step}: non-finite parameters after the step: {badp[:3]}")
            if res.problems:
                break
        res.train_step_ok = not res.problems

        stage = "eval"
        lc.eval()
        out1, seen, calls = _executed(lc, x)
        res.problems += _execution_problems(lc, rep, seen, calls)
        with torch.no_grad():
            out2 = lc(x)
        out1, out2 = _logits(out1), _logits(out2)
        if not torch.isfinite(out1).all():
            res.problems.append("eval: non-finite outputs")
        elif not torch.equal(out1, out2):
            res.problems.append(f"eval: two forwards differ (max {float((out1 - out2).abs().max()):.3g}): "
                                f"dropout or another random op still active in eval")

        stage = "operator norms"
        norms = operator_norms(lc, {p: sh[1:] for p, _, sh in seen if sh}, tol=norm_tol)
        # 1 +- tol, or (a weight below the normalization's floor, by design) at most 1 + tol
        errors = {p: (abs(n - 1.0) if n >= 1.0 or not below_sigma_floor(lc.get_submodule(p)) else 0.0)
                  for p, n in norms.items()}
        res.max_norm_error = max(errors.values(), default=0.0)
        off = sorted(((e, p) for p, e in errors.items() if e > norm_tol), reverse=True)
        if off:
            res.problems.append(f"eval operator norms off by > {norm_tol:g} in {len(off)}/{len(norms)} layers: "
                                + ", ".join(f"{p} {norms[p]:.4f}" for _, p in off[:3]))
        if not norms:
            res.problems.append("no spectrally normalized layer found")

        if roundtrip:
            stage = "state_dict round trip"
            torch.manual_seed(1)
            fresh = lcnnify(make(), example_inputs=x[:2])
            fresh.load_state_dict(lc.state_dict())
            fresh.eval()
            with torch.no_grad():
                out3 = _logits(fresh(x))
            scale = float(out1.abs().max()) + 1e-6
            err = float((out3 - out1).abs().max())
            if not err <= 1e-4 * scale:
                res.problems.append(f"state_dict round trip: eval outputs differ by {err:.3g} (scale {scale:.3g})")

        stage = "original untouched"
        after = model.state_dict()
        changed = [k for k in before if k not in after or not torch.equal(before[k], after[k])]
        if changed or before.keys() != after.keys():
            res.problems.append(f"original model's state dict changed: {changed[:3]}")
        if [type(m) for m in model.modules()] != types_before:
            res.problems.append("original model's modules changed")
        flipped = [n or "<root>" for (n, a), (_, b) in zip(modes_before, _modes(model)) if a != b]
        if flipped:
            res.problems.append(f"original model's train/eval flags changed: {flipped[:3]}")
    except Exception as e:  # noqa: BLE001 - a zoo sweep records failures
        res.clear_error = isinstance(e, LCNNError)
        where = traceback.extract_tb(e.__traceback__)[-1]
        res.error = (f"{stage}: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
                     f" [{where.filename.rsplit('/', 2)[-1]}:{where.lineno}]")
    res.ok = not res.error and not res.problems
    res.status = "failed" if not res.ok else ("fallback" if res.fallbacks else "converted")
    res.seconds_total = time.perf_counter() - t_start
    return res
