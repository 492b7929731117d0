r"""The op registry: one entry per op, read by the conversion, the report and the bound.

Every op a traced model can contain (a module type, a torch function, a tensor method) has one
:class:`OpSpec`: how to recognise it, its :class:`Family`, its bound constants, whether (and why) it voids the
curvature guarantee, where its ``inplace`` flag sits, what the conversion turns it into and how the bound
propagates through it. The conversion (:mod:`lcnnify.convert.rules` is a view of this table), the
:class:`~lcnnify.convert.report.ConversionReport` and :func:`lcnnify.bound` all ask this module, so the report
and the bound agree by construction: an op voids the guarantee in the report exactly when it makes the bound
infinite (or uncertified), and an op nobody registered is ``"unknown op: not analysed"`` in both.

"The guarantee" is the data-free bound of :mod:`lcnnify.bounds`: finite, certified Lipschitz and Hessian
bounds of the logits (paper §3.2). An op voids it when it is not twice differentiable with a bounded second
derivative (kinks: ReLU, clamp, abs, max-pool...), when its slope is unbounded over the input space (exp,
powers, data-dependent divisions: LayerNorm, ...), when it multiplies two input-dependent tensors (gating,
attention), or when it is not analysed.

Elementwise activations carry :class:`Constants` ``(slope, curvature, normalized_curvature, kink)``:
``slope >= sup |phi'|``, ``curvature >= sup |phi''|`` (``inf`` at a kink), ``normalized_curvature >=
sup |phi''/phi'|`` (the paper's Theorem 1 factor). Where they depend on the module or the call (LeakyReLU's
slope, Softplus' beta, CenteredSoftplus' beta/4, ELU's alpha) the entry holds a function of the :class:`Call`.

Two facts decided here (the closed forms are in :data:`SELU_KINK_SLOPES` and the Hardswish entry):

* ``Hardswish`` is x * relu6(x + 3) / 6: piecewise quadratic, its derivative (x/3 + 1/2 in between) jumps at
  x = -3 (from 0 to -1/2) and at x = 3 (from 3/2 to 1): two kinks, curvature unbounded. It is converted by the
  smooth-activation policy (family SMOOTH) but voids the guarantee when kept.
* ``SELU`` is scale * (x if x > 0 else alpha (e^x - 1)): its derivative jumps at 0 from scale*alpha = 1.7581
  to scale = 1.0507 (torch's fixed constants): a kink, curvature unbounded. ``ELU`` with alpha = 1 and ``CELU``
  are C^1 with a bounded second derivative: they keep the bound finite.

Users add their own activations::

    lcnnify.ops.register_activation(MyAct, slope=1.0, curvature=0.25)                 # kept, analysed
    lcnnify.ops.register_activation(MyReLU, slope=1.0, kink="kink at 0", convert="always")
"""
from __future__ import annotations

import importlib
import inspect
import math
import operator
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any, Callable, Iterable, Iterator, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from .nn.batchnorm_act import LipschitzBatchNormAct
from .nn.centered_softplus import CenteredSoftplus, centered_softplus
from .nn.lipschitz_batchnorm import LipschitzBatchNorm

__all__ = ["Family", "Inplace", "Constants", "OpSpec", "Call", "Verdict", "register", "register_activation",
           "unregister", "registry", "spec_for_module", "spec_for_function", "spec_for_method", "lookup",
           "verdict", "is_inplace", "inplace_source", "activation_constants", "UNKNOWN_OP", "OPAQUE_MODULE",
           "void_sites", "graph_voids", "module_voids", "dropout_types"]

INF = math.inf
UNKNOWN_OP = "unknown op: not analysed"
OPAQUE_MODULE = "opaque module (torch.fx cannot trace into it): not analysed"
TOO_DEEP = "submodule nesting too deep: not analysed"
KINK = "not differentiable at its kink: curvature unbounded"


class Family(str, Enum):
    """What an op is, for the conversion and the guarantee."""

    RELU = "relu"                #: ReLU-like activation: always converted to a CenteredSoftplus
    SMOOTH = "smooth"            #: other activation, converted by the ``smooth_activations`` policy
    LCNN = "lcnn"                #: an LCNN layer (CenteredSoftplus, LipschitzBatchNorm): already converted
    GATE = "gate"                #: bounded activation kept as it is (sigmoid, tanh...): analysed
    KINK = "kink"                #: piecewise-linear op kept as it is (clamp, abs, hardtanh, PReLU): voids
    LINEAR = "linear"            #: conv, linear, BatchNorm, pools, padding, means: a linear map
    STRUCTURAL = "structural"    #: views, reshapes, slicing, sizes, dropout, type casts
    MULTI_INPUT = "multi_input"  #: add / sub / neg / cat / stack of branches
    PRODUCT = "product"          #: mul / div / matmul: linear with a constant, voids with two inputs
    VOIDING = "voiding"          #: voids the guarantee (max-pool, data-dependent norms, softmax, exp...)


class Inplace(str, Enum):
    """Where an op's ``inplace`` flag sits."""

    NEVER = "never"
    ALWAYS = "always"            #: ``F.relu_``, ``x.relu_()``: mutates its input
    ARGUMENT = "argument"        #: keyword ``inplace`` or positional ``OpSpec.inplace_index``
    ATTRIBUTE = "attribute"      #: the module's ``inplace`` attribute


@dataclass(frozen=True)
class Constants:
    """Bound constants of an elementwise map phi: ``slope >= sup |phi'|``, ``curvature >= sup |phi''|``
    (``inf``: a kink or jump), ``normalized_curvature >= sup |phi''/phi'|`` (paper Theorem 1), and ``kink``:
    why the curvature is unbounded (None when it is bounded)."""

    slope: float
    curvature: float
    normalized_curvature: float = INF
    kink: str | None = None


ConstantsLike = Union[Constants, Callable[["Call"], Constants], None]
VoidsLike = Union[str, Callable[["Call"], Union[str, None]], None]


@dataclass(frozen=True)
class OpSpec:
    """One registry entry.

    Attributes:
        name: readable name (``nn.ReLU``, ``F.relu``, ``Tensor.clamp``).
        family: :class:`Family`.
        modules / functions / methods: what it matches (module types match subclasses; first entry wins).
        params: positional parameter names of the call (methods: ``input`` is the tensor itself), so that
            operands passed by keyword are found (``torch.add(input=h, other=y, alpha=3)``).
        constants: :class:`Constants`, or a function of the :class:`Call` (elementwise activations only).
        voids: why the op voids the guarantee (a string, or a function of the call returning one or None).
            Activations void when their constants say ``kink``.
        inplace / inplace_index: where the ``inplace`` flag sits (:class:`Inplace`).
        convert: what the conversion makes of it: ``"activation"`` (CenteredSoftplus), ``"conv"``,
            ``"linear"``, ``"batchnorm"``, ``"batchnorm_act"``; None: left as it is.
        propagate: the bound's rule (``"activation"``, ``"conv"``, ``"nonneg"``, ``"add"``...; see
            :mod:`lcnnify.bounds.propagate`).
    """

    name: str
    family: Family
    modules: tuple[type, ...] = ()
    functions: tuple[Callable[..., Any], ...] = ()
    methods: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    constants: ConstantsLike = None
    voids: VoidsLike = None
    inplace: Inplace = Inplace.NEVER
    inplace_index: int | None = None
    convert: str | None = None
    propagate: str = "infinite"

    def constants_for(self, call: "Call") -> Constants | None:
        c = self.constants
        return c(call) if callable(c) else c

    def void_reason(self, call: "Call") -> str | None:
        """Why this call voids the guarantee, or None."""
        v = self.voids
        why = v(call) if callable(v) else v
        if why is None and self.constants is not None:
            c = self.constants_for(call)
            if c is not None and (c.kink is not None or not math.isfinite(c.curvature)
                                  or not math.isfinite(c.slope)):
                why = c.kink or KINK
        return why


# ==========================================================================================================
# a call site


@dataclass
class Call:
    """One call site of an op, as the report (fx arguments) or the bound (values) sees it.

    ``args`` / ``kwargs`` are the node's own (fx.Node for tensors); ``value`` maps an fx.Node to what is known of
    its value (the bound: the recorded tensor; the report: parameters/buffers of ``get_attr`` nodes, else the
    node); ``dependent`` says whether an fx.Node depends on the model input.
    """

    op: str
    target: Any
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    module: nn.Module | None = None
    spec: OpSpec | None = None
    value: Callable[[Any], Any] = lambda a: a
    dependent: Callable[[Any], bool] = lambda a: False

    def _params(self) -> tuple[str, ...]:
        if self.spec is not None and self.spec.params:
            return self.spec.params
        return _signature_params(self.target) if self.op == "call_function" else ()

    def raw(self, name: str, index: int | None = None, default: Any = None) -> Any:
        """The argument ``name`` as passed (keyword, or positional by the registered parameter order)."""
        if name in self.kwargs:
            return self.kwargs[name]
        params = self._params()
        i = params.index(name) if name in params else index
        if i is not None and i < len(self.args):
            return self.args[i]
        return default

    def get(self, name: str, index: int | None = None, default: Any = None) -> Any:
        """The argument's value (see :attr:`value`)."""
        a = self.raw(name, index, _MISSING)
        return default if a is _MISSING else self.value(a)

    def operands(self) -> list[Any]:
        """All arguments, positional then keyword (nested lists flattened)."""
        out: list[Any] = []
        fx.node.map_aggregate((self.args, self.kwargs), lambda a: out.append(a) or a)
        return out

    def dependent_operands(self) -> list[fx.Node]:
        return [a for a in self.operands() if isinstance(a, fx.Node) and self.dependent(a)]

    def is_dependent(self, name: str, index: int | None = None) -> bool:
        a = self.raw(name, index)
        return isinstance(a, fx.Node) and self.dependent(a)


_MISSING = object()
_SIG_CACHE: dict[Any, tuple[str, ...]] = {}


def _signature_params(fn: Any) -> tuple[str, ...]:
    try:
        return _SIG_CACHE[fn]
    except (KeyError, TypeError):
        pass
    try:
        ps = tuple(p.name for p in inspect.signature(fn).parameters.values()
                   if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    except (TypeError, ValueError):
        ps = ()
    try:
        _SIG_CACHE[fn] = ps
    except TypeError:
        pass
    return ps


@dataclass(frozen=True)
class Verdict:
    """What the registry says of one call: its spec (None: unknown) and why it voids (None: it does not)."""

    spec: OpSpec | None
    reason: str | None
    name: str


# ==========================================================================================================
# constants (closed forms; numeric suprema rounded up, checked on a fine grid in tests/test_bounds.py)

_SIG_C = 1.0 / (6.0 * math.sqrt(3.0))      # max |sigmoid''| = 0.0962250...
_TANH_C = 4.0 / (3.0 * math.sqrt(3.0))     # max |tanh''| = 0.7698003...
_SELU_SCALE, _SELU_ALPHA = 1.0507009873554805, 1.6732632423543772
#: (left, right) derivative of SELU at 0: scale * alpha and scale
SELU_KINK_SLOPES = (_SELU_SCALE * _SELU_ALPHA, _SELU_SCALE)

SIGMOID = Constants(0.25, _SIG_C, 1.0)
TANH = Constants(1.0, _TANH_C, 2.0)
SILU = Constants(1.0999, 0.5)
GELU = Constants(1.1290, 0.797885)
MISH = Constants(1.0885, 0.6443)
IDENTITY = Constants(1.0, 0.0, 0.0)


def _kink(slope: float, why: str = KINK) -> Constants:
    return Constants(slope, INF, INF, why)


def _softplus(beta: float) -> Constants:
    return Constants(1.0, beta / 4.0, beta)


def _num(x: Any, default: float) -> float:
    if isinstance(x, Tensor):
        return float(x.detach().abs().max()) if x.numel() else default
    try:
        return float(x)
    except (TypeError, ValueError):
        return default


def _elu(alpha: float) -> Constants:
    if alpha == 1.0:
        return Constants(1.0, 1.0, 1.0)
    return _kink(max(1.0, abs(alpha)), f"derivative jumps at 0 (alpha = {alpha:g} != 1): curvature unbounded")


def _csp_constants(call: Call) -> Constants:
    if call.module is not None:
        lb = call.module.log_beta.detach()
        # the forward computes beta = exp(log_beta) in float32 or float64: take the larger of the two
        return _softplus(max(float(lb.exp().max()), float(lb.to(torch.float64).exp().max())))
    beta = call.get("beta", 1)
    if isinstance(beta, Tensor):
        return _softplus(float(beta.detach().to(torch.float64).max()))
    if isinstance(beta, (int, float)):
        return _softplus(float(beta))
    return _softplus(INF)  # not known here (the report): smooth, constant unknown


def _threshold(call: Call) -> Constants:
    th, val = call.get("threshold", 1), call.get("value", 2)
    if isinstance(th, (int, float)) and isinstance(val, (int, float)) and th == val:
        return _kink(1.0)
    return _kink(INF, "threshold jumps from `value` to `threshold`: not continuous")


# ==========================================================================================================
# void reasons that depend on the call

_PRODUCT = ("product of two input-dependent tensors (gating / attention): curvature and Lipschitz constant "
            "grow with unbounded activations")


def _mul_voids(call: Call) -> str | None:
    return _PRODUCT if len(call.dependent_operands()) >= 2 else None


def _div_voids(call: Call) -> str | None:
    if call.raw("rounding_mode") is not None:
        return "rounding division is piecewise constant: not differentiable"
    if call.is_dependent("other", 1):
        return "division by an input-dependent tensor: Lipschitz constant unbounded"
    return None


def _matmul_voids(call: Call) -> str | None:
    if len(call.dependent_operands()) >= 2:
        return _PRODUCT
    const = call.get("other", 1) if call.is_dependent("input", 0) else call.get("input", 0)
    if not isinstance(const, Tensor) and isinstance(const, fx.Node):
        return None  # the report: a constant operand whose value is not known here
    if not isinstance(const, Tensor) or const.dim() != 2:
        return "matrix product with a batched or non-tensor constant: not analysed"
    return None


_INTERP_NONNEG_MODES = {"nearest", "nearest-exact", "linear", "bilinear", "trilinear", "area"}


def _interp_voids(call: Call) -> str | None:
    mode = call.module.mode if call.module is not None else call.get("mode", 3, "nearest")
    if isinstance(mode, str) and mode not in _INTERP_NONNEG_MODES:
        return f"interpolation mode {mode!r} has negative weights: not analysed"
    return None


def _plain_conv_voids(call: Call) -> str | None:
    m = call.module
    if m is None or getattr(m, "transposed", False):
        return "transposed convolution: not analysed" if m is not None else None
    if type(m).forward in _PLAIN_CONV_FORWARDS or dynamic_same_padding(m):
        return None
    return "conv subclass with its own forward: not the plain convolution operator"


def dynamic_same_padding(m: nn.Module) -> bool:
    """timm's Conv2dSame (also once parametrized: a subclass) pads the input to TF "same" in its forward."""
    return any(c.__name__ == "Conv2dSame" for c in type(m).__mro__) or bool(getattr(m, "same_pad", False))


def _bn_voids(call: Call) -> str | None:
    m = call.module
    if m is None:
        return None
    if isinstance(m, LipschitzBatchNorm):
        if m.running_var is None:
            return "batch statistics (no running statistics): data-dependent normalization"
    elif getattr(m, "running_var", None) is None and hasattr(m, "track_running_stats"):
        return "BatchNorm with batch statistics (no running statistics): data-dependent normalization"
    act, drop = getattr(m, "act", None), getattr(m, "drop", None)
    if isinstance(act, nn.Module):
        spec = spec_for_module(act)
        if spec is None:
            return f"fused BN activation {type(act).__name__}: {UNKNOWN_OP}"
        why = spec.void_reason(Call("call_module", type(act), module=act, spec=spec))
        if why is not None:
            return f"act ({type(act).__name__}): {why}"
    if isinstance(drop, nn.Module) and not isinstance(drop, (nn.Identity,) + dropout_types()):
        return f"fused BN drop {type(drop).__name__}: {UNKNOWN_OP}"
    return None


def _f_bn_voids(call: Call) -> str | None:
    if call.raw("running_var", 2) is None or call.get("training", 5, False) is True:
        return "batch norm with batch statistics: data-dependent normalization"
    return None


def _conv_fn_voids(call: Call) -> str | None:
    if call.is_dependent("weight", 1):
        return "convolution with an input-dependent weight"
    if len(call.dependent_operands()) > 1 or not call.is_dependent("input", 0):
        return "convolution / linear map with an input-dependent operand other than its input"
    return None


def _single_input_voids(call: Call) -> str | None:
    if call.dependent_operands() and not call.is_dependent("input", 0):
        return f"{UNKNOWN_OP} (input-dependent argument other than its input)"
    deps = call.dependent_operands()
    if len(deps) > 1 and not (call.op == "call_method" and str(call.target) in _SHAPE_ONLY_SECOND):
        return f"{UNKNOWN_OP} (several input-dependent operands)"
    return None


_SHAPE_ONLY_SECOND = {"expand_as", "view_as", "reshape_as", "type_as", "to"}


# ==========================================================================================================
# optional third-party types (resolved once, lazily: neither timm nor torchvision is required)


def _optional(module: str, *names: str) -> tuple[type, ...]:
    """The types ``names`` of an optional package's ``module`` that exist in the installed version."""
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - timm and torchvision are optional
        return ()
    return tuple(getattr(mod, n) for n in names if hasattr(mod, n))


def _timm(*names: str) -> tuple[type, ...]:
    return _optional("timm.layers", *names)


def _timm_me(*names: str) -> tuple[type, ...]:
    """timm's memory-efficient activation variants (same functions, custom autograd)."""
    return _optional("timm.layers.activations_me", *names)


def _torchvision(*names: str) -> tuple[type, ...]:
    return _optional("torchvision.ops", *names)


def dropout_types() -> tuple[type, ...]:
    """Dropout, drop-path and stochastic-depth module types (their forward reads ``self.training``)."""
    return (nn.modules.dropout._DropoutNd,) + _timm("DropPath", "DropBlock2d") + _torchvision("StochasticDepth")


def _fns(*names: str, mod: Any = torch) -> tuple[Callable[..., Any], ...]:
    return tuple(getattr(mod, n) for n in names if hasattr(mod, n))


_PLAIN_CONV_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)


# ==========================================================================================================
# the table


def _act(name: str, family: Family, constants: ConstantsLike, *, modules: tuple = (), functions: tuple = (),
         methods: tuple = (), params: tuple = ("input",), inplace: Inplace = Inplace.NEVER,
         inplace_index: int | None = None, convert: str | None = None) -> OpSpec:
    return OpSpec(name, family, modules, functions, methods, params, constants, None, inplace, inplace_index,
                  convert, "activation")


def _builtin_specs() -> list[OpSpec]:
    R, S, G, K, L = Family.RELU, Family.SMOOTH, Family.GATE, Family.KINK, Family.LINEAR
    ST, MI, P, V = Family.STRUCTURAL, Family.MULTI_INPUT, Family.PRODUCT, Family.VOIDING
    A, ARG, ALW = Inplace.ATTRIBUTE, Inplace.ARGUMENT, Inplace.ALWAYS
    lrelu = lambda c: _kink(max(1.0, abs(_num(  # noqa: E731
        c.module.negative_slope if c.module is not None else c.get("negative_slope", 1, 0.01), 0.01))))
    softplus = lambda c: _softplus(_num(c.module.beta if c.module is not None else c.get("beta", 1, 1.0), 1.0))  # noqa: E731
    elu = lambda c: _elu(_num(c.module.alpha if c.module is not None else c.get("alpha", 1, 1.0), 1.0))  # noqa: E731

    def celu(c: Call) -> Constants:
        a = abs(_num(c.module.alpha if c.module is not None else c.get("alpha", 1, 1.0), 1.0))
        return Constants(1.0, 1.0 / a, 1.0 / a) if a > 0 else _kink(1.0)

    def prelu(c: Call) -> Constants:
        w = c.module.weight if c.module is not None else c.get("weight", 1, None)
        return _kink(max(1.0, _num(w, INF)))

    hswish_kink = "kinks at -3 and +3 (the derivative jumps by 1/2): curvature unbounded"
    selu_kink = (f"derivative jumps at 0 (from scale*alpha = {SELU_KINK_SLOPES[0]:.4f} to scale = "
                 f"{SELU_KINK_SLOPES[1]:.4f}): curvature unbounded")
    selu = _kink(SELU_KINK_SLOPES[0], selu_kink)
    hsig = _kink(1.0 / 6.0, "kinks at -3 and +3: curvature unbounded")
    maxpool_why = "max-pool is not differentiable (piecewise linear): curvature unbounded"

    specs: list[OpSpec] = [
        # ---------------------------------------------------------------- LCNN layers (already converted)
        _act("CenteredSoftplus", Family.LCNN, _csp_constants, modules=(CenteredSoftplus,),
             functions=(centered_softplus,), params=("input", "beta")),
        OpSpec("LipschitzBatchNormAct", Family.LCNN, (LipschitzBatchNormAct,), voids=_bn_voids,
               propagate="batchnorm"),
        OpSpec("LipschitzBatchNorm", Family.LCNN, (LipschitzBatchNorm,), voids=_bn_voids, propagate="batchnorm"),
        # ---------------------------------------------------------------- ReLU family: always converted
        _act("nn.ReLU", R, _kink(1.0), modules=(nn.ReLU,), inplace=A, convert="activation"),
        _act("nn.ReLU6", R, _kink(1.0), modules=(nn.ReLU6,), inplace=A, convert="activation"),
        _act("nn.LeakyReLU", R, lrelu, modules=(nn.LeakyReLU,), inplace=A, convert="activation"),
        _act("nn.Softplus", R, softplus, modules=(nn.Softplus,), convert="activation"),
        _act("F.relu", R, _kink(1.0), functions=(F.relu, torch.relu), params=("input", "inplace"),
             inplace=ARG, inplace_index=1, convert="activation"),
        _act("F.relu_", R, _kink(1.0), functions=(F.relu_, torch.relu_), inplace=ALW, convert="activation"),
        _act("F.relu6", R, _kink(1.0), functions=(F.relu6,), params=("input", "inplace"), inplace=ARG,
             inplace_index=1, convert="activation"),
        _act("F.leaky_relu", R, lrelu, functions=(F.leaky_relu,), params=("input", "negative_slope", "inplace"),
             inplace=ARG, inplace_index=2, convert="activation"),
        _act("F.leaky_relu_", R, lrelu, functions=(F.leaky_relu_,), params=("input", "negative_slope"),
             inplace=ALW, convert="activation"),
        _act("F.softplus", R, softplus, functions=(F.softplus,), params=("input", "beta", "threshold"),
             convert="activation"),
        _act("Tensor.relu", R, _kink(1.0), methods=("relu",), convert="activation"),
        _act("Tensor.relu_", R, _kink(1.0), methods=("relu_",), inplace=ALW, convert="activation"),
        # ---------------------------------------------------------------- other activations: policy
        _act("nn.SiLU", S, SILU, modules=(nn.SiLU,) + _timm("Swish", "SiLU") + _timm_me("SwishMe"), inplace=A, convert="activation"),
        _act("nn.GELU", S, lambda c: GELU, modules=(nn.GELU,) + _timm("GELU", "GELUTanh"), convert="activation"),
        _act("nn.Hardswish", S, _kink(1.5, hswish_kink), modules=(nn.Hardswish,) + _timm("HardSwish") + _timm_me("HardSwishMe"),
             inplace=A, convert="activation"),
        _act("nn.Mish", S, MISH, modules=(nn.Mish,) + _timm("Mish") + _timm_me("MishMe"), inplace=A, convert="activation"),
        _act("nn.SELU", S, selu, modules=(nn.SELU,), inplace=A, convert="activation"),
        _act("nn.CELU", S, celu, modules=(nn.CELU,), inplace=A, convert="activation"),
        _act("nn.ELU", S, elu, modules=(nn.ELU,), inplace=A, convert="activation"),
        _act("timm.HardMish", S, _kink(1.5, "kinks at -2 and 0: curvature unbounded"), modules=_timm("HardMish") + _timm_me("HardMishMe"),
             inplace=A, convert="activation"),
        _act("F.silu", S, SILU, functions=(F.silu,), params=("input", "inplace"), inplace=ARG, inplace_index=1,
             convert="activation"),
        _act("F.gelu", S, GELU, functions=(F.gelu,), params=("input", "approximate"), convert="activation"),
        _act("F.hardswish", S, _kink(1.5, hswish_kink), functions=(F.hardswish,), params=("input", "inplace"),
             inplace=ARG, inplace_index=1, convert="activation"),
        _act("F.mish", S, MISH, functions=(F.mish,), params=("input", "inplace"), inplace=ARG, inplace_index=1,
             convert="activation"),
        _act("F.elu", S, elu, functions=(F.elu,), params=("input", "alpha", "inplace"), inplace=ARG,
             inplace_index=2, convert="activation"),
        _act("F.elu_", S, elu, functions=(F.elu_,) + _fns("elu_", mod=torch._C._nn), params=("input", "alpha"),
             inplace=ALW, convert="activation"),
        _act("F.celu", S, celu, functions=(F.celu,), params=("input", "alpha", "inplace"), inplace=ARG,
             inplace_index=2, convert="activation"),
        _act("F.celu_", S, celu, functions=_fns("celu_", mod=F) + _fns("celu_"), params=("input", "alpha"),
             inplace=ALW, convert="activation"),
        _act("F.selu", S, selu, functions=(F.selu, torch.selu), params=("input", "inplace"), inplace=ARG,
             inplace_index=1, convert="activation"),
        _act("F.selu_", S, selu, functions=_fns("selu_", mod=F) + _fns("selu_"), inplace=ALW,
             convert="activation"),
        # ---------------------------------------------------------------- bounded activations kept (gates)
        _act("nn.Identity", Family.STRUCTURAL, IDENTITY, modules=(nn.Identity,)),
        _act("nn.Sigmoid", G, SIGMOID, modules=(nn.Sigmoid,) + _timm("Sigmoid")),
        _act("nn.Tanh", G, TANH, modules=(nn.Tanh,) + _timm("Tanh")),
        _act("nn.Hardsigmoid", G, hsig, modules=(nn.Hardsigmoid,) + _timm("HardSigmoid") + _timm_me("HardSigmoidMe"), inplace=A),
        _act("nn.Softsign", G, Constants(1.0, 2.0, 2.0), modules=(nn.Softsign,)),
        _act("nn.LogSigmoid", G, Constants(1.0, 0.25, 1.0), modules=(nn.LogSigmoid,)),
        _act("nn.Tanhshrink", G, Constants(1.0, _TANH_C), modules=(nn.Tanhshrink,)),
        _act("torch.sigmoid", G, SIGMOID, functions=(torch.sigmoid, F.sigmoid)),
        _act("Tensor.sigmoid", G, SIGMOID, methods=("sigmoid",)),
        _act("Tensor.sigmoid_", G, SIGMOID, methods=("sigmoid_",), inplace=ALW),
        _act("torch.tanh", G, TANH, functions=(torch.tanh, F.tanh)),
        _act("Tensor.tanh", G, TANH, methods=("tanh",)),
        _act("Tensor.tanh_", G, TANH, methods=("tanh_",), inplace=ALW),
        _act("F.hardsigmoid", G, hsig, functions=(F.hardsigmoid,), params=("input", "inplace"), inplace=ARG,
             inplace_index=1),
        _act("F.softsign", G, Constants(1.0, 2.0, 2.0), functions=(F.softsign,)),
        _act("F.logsigmoid", G, Constants(1.0, 0.25, 1.0), functions=(F.logsigmoid,)),
        _act("F.tanhshrink", G, Constants(1.0, _TANH_C), functions=(F.tanhshrink,)),
        # ---------------------------------------------------------------- piecewise-linear ops kept: kinks
        _act("nn.Hardtanh", K, _kink(1.0), modules=(nn.Hardtanh,), inplace=A),
        _act("nn.PReLU", K, prelu, modules=(nn.PReLU,)),
        _act("F.prelu", K, prelu, functions=(F.prelu,), params=("input", "weight")),
        _act("nn.Threshold", K, lambda c: _threshold(replace(c, kwargs={"threshold": c.module.threshold,
                                                                       "value": c.module.value})),
             modules=(nn.Threshold,), inplace=A),
        _act("F.threshold", K, _threshold, functions=(F.threshold,) + _fns("threshold"),
             params=("input", "threshold", "value", "inplace"), inplace=ARG, inplace_index=3),
        _act("F.threshold_", K, _threshold, functions=_fns("threshold_", mod=F) + _fns("threshold_"),
             params=("input", "threshold", "value"), inplace=ALW),
        _act("F.hardtanh", K, _kink(1.0), functions=(F.hardtanh,), params=("input", "min_val", "max_val", "inplace"),
             inplace=ARG, inplace_index=3),
        _act("F.hardtanh_", K, _kink(1.0), functions=(F.hardtanh_,), inplace=ALW),
        _act("torch.abs", K, _kink(1.0), functions=(torch.abs, torch.absolute)),
        _act("Tensor.abs", K, _kink(1.0), methods=("abs", "absolute")),
        _act("Tensor.abs_", K, _kink(1.0), methods=("abs_", "absolute_"), inplace=ALW),
        _act("torch.clamp", K, _kink(1.0), functions=(torch.clamp, torch.clip, torch.clamp_min, torch.clamp_max),
             params=("input", "min", "max")),
        _act("Tensor.clamp", K, _kink(1.0), methods=("clamp", "clip", "clamp_min", "clamp_max"),
             params=("input", "min", "max")),
        _act("Tensor.clamp_", K, _kink(1.0), methods=("clamp_", "clip_", "clamp_min_", "clamp_max_"),
             params=("input", "min", "max"), inplace=ALW),
        OpSpec("torch.sort", K, functions=(torch.sort, torch.msort), methods=("sort", "msort"),
               params=("input", "dim"), constants=_kink(1.0, "sorting is not differentiable where entries tie"),
               propagate="activation"),
        OpSpec("torch.topk", K, functions=(torch.topk,), methods=("topk",), params=("input", "k"),
               constants=_kink(1.0, "top-k selection is not differentiable where entries tie"),
               propagate="activation"),
        # ---------------------------------------------------------------- linear maps
        OpSpec("nn.ConvNd", L, (nn.Conv1d, nn.Conv2d, nn.Conv3d), voids=_plain_conv_voids, convert="conv",
               propagate="conv"),
        OpSpec("nn.Linear", L, (nn.Linear,), convert="linear", propagate="linear"),
        OpSpec("timm.BatchNormAct2d", L, _timm("BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d"),
               voids=_bn_voids, convert="batchnorm_act", propagate="batchnorm"),
        OpSpec("nn.BatchNorm", L, (nn.modules.batchnorm._BatchNorm,) + _torchvision("FrozenBatchNorm2d"),
               voids=_bn_voids, convert="batchnorm", propagate="batchnorm"),
        OpSpec("F.convNd", L, functions=(F.conv1d, F.conv2d, F.conv3d),
               params=("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
               voids=_conv_fn_voids, propagate="f_conv"),
        OpSpec("F.linear", L, functions=(F.linear,), params=("input", "weight", "bias"), voids=_conv_fn_voids,
               propagate="f_linear"),
        OpSpec("F.batch_norm", L, functions=(F.batch_norm,),
               params=("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
               voids=_f_bn_voids, propagate="f_batchnorm"),
        OpSpec("pooling / padding", L, (
            nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
            nn.AdaptiveAvgPool3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d,
            nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
            nn.ReplicationPad2d, nn.ReplicationPad3d, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)
               + tuple(getattr(nn, f"CircularPad{d}d") for d in (1, 2, 3) if hasattr(nn, f"CircularPad{d}d"))
               + _timm("AvgPool2dSame", "BlurPool2d"),
               propagate="nonneg"),
        OpSpec("F.avg_pool / F.pad", L, functions=(
            F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
            F.adaptive_avg_pool3d, F.pad, F.pixel_shuffle, F.pixel_unshuffle) + _fns("channel_shuffle", mod=F)
               + _fns("pad_same", mod=_timm_padding()), voids=_single_input_voids, propagate="nonneg"),
        OpSpec("mean / sum", L, functions=(torch.mean, torch.sum), methods=("mean", "sum"), params=("input", "dim"),
               voids=_single_input_voids, propagate="nonneg"),
        OpSpec("nn.Upsample", L, (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d),
               voids=_interp_voids, propagate="nonneg"),
        OpSpec("F.interpolate", L, functions=(F.interpolate,) + _fns("upsample", mod=F),
               params=("input", "size", "scale_factor", "mode"), voids=_interp_voids, propagate="nonneg"),
        # ---------------------------------------------------------------- structure
        OpSpec("reshape / view / slice", ST, (nn.Flatten, nn.Unflatten), functions=(
            operator.getitem, torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.swapaxes,
            torch.squeeze, torch.unsqueeze, torch.narrow, torch.select, torch.roll, torch.flip, torch.t,
            torch.movedim, torch.moveaxis, torch.chunk, torch.split, torch.unbind, torch.tile,
            torch.repeat_interleave, torch.clone, torch.broadcast_to, torch.ravel), methods=(
            "view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "contiguous", "expand",
            "expand_as", "view_as", "reshape_as", "repeat", "narrow", "select", "roll", "flip", "chunk", "split",
            "unbind", "t", "movedim", "moveaxis", "swapaxes", "clone", "to", "float", "double", "half", "bfloat16",
            "type", "type_as", "__getitem__", "unflatten", "ravel", "tile", "repeat_interleave", "broadcast_to",
            "cpu", "cuda"), voids=_single_input_voids, propagate="nonneg"),
        OpSpec("detach", ST, methods=("detach", "detach_", "requires_grad_"), functions=(torch.detach,),
               propagate="identity"),
        OpSpec("dropout", ST, dropout_types(), propagate="dropout"),
        OpSpec("F.dropout", ST, functions=(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                                           F.feature_alpha_dropout), params=("input", "p", "training", "inplace"),
               inplace=ARG, inplace_index=3, propagate="f_dropout"),
        OpSpec("shape / size / constants", ST, functions=(
            getattr, len, torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
            torch.randn_like, torch.randint_like), methods=(
            "size", "dim", "numel", "ndimension", "nelement", "element_size", "get_device", "is_contiguous",
            "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "zero_"), propagate="constant"),
        # ---------------------------------------------------------------- several inputs
        OpSpec("add", MI, functions=(operator.add, operator.iadd, torch.add), methods=("add", "add_", "__add__",
               "__radd__", "__iadd__"), params=("input", "other", "alpha"), propagate="add"),
        OpSpec("sub", MI, functions=(operator.sub, operator.isub, torch.sub, torch.subtract),
               methods=("sub", "sub_", "subtract", "__sub__", "__isub__"), params=("input", "other", "alpha"),
               propagate="sub"),
        OpSpec("neg", MI, functions=(operator.neg, torch.neg, torch.negative), methods=("neg", "neg_", "negative"),
               propagate="neg"),
        OpSpec("pos", MI, functions=(operator.pos,), propagate="identity"),
        OpSpec("cat / stack", MI, functions=(torch.cat, torch.concat, torch.concatenate, torch.stack, torch.hstack,
                                             torch.vstack), params=("tensors", "dim"), propagate="cat"),
        # ---------------------------------------------------------------- products
        OpSpec("mul", P, functions=(operator.mul, operator.imul, torch.mul, torch.multiply),
               methods=("mul", "mul_", "multiply", "__mul__", "__rmul__", "__imul__"), params=("input", "other"),
               voids=_mul_voids, propagate="scale"),
        OpSpec("div", P, functions=(operator.truediv, operator.itruediv, torch.div, torch.true_divide, torch.divide),
               methods=("div", "div_", "divide", "true_divide", "__truediv__", "__itruediv__"),
               params=("input", "other"), voids=_div_voids, propagate="scale"),
        OpSpec("matmul", P, functions=(operator.matmul, torch.matmul, torch.mm), methods=("matmul", "mm",
               "__matmul__"), params=("input", "other"), voids=_matmul_voids, propagate="matmul"),
        OpSpec("bmm / einsum", P, functions=(torch.bmm, torch.einsum, torch.baddbmm, torch.addmm),
               methods=("bmm",), voids="batched product / einsum: not analysed"),
        # ---------------------------------------------------------------- voiding
        OpSpec("max-pool", V, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d) + _timm("MaxPool2dSame"),
               functions=(F.max_pool1d, F.max_pool2d, F.max_pool3d, F.max_pool1d_with_indices,
                          F.max_pool2d_with_indices, F.max_pool3d_with_indices),
               params=("input", "kernel_size", "stride", "padding", "dilation"), voids=maxpool_why,
               propagate="maxpool"),
        OpSpec("adaptive max-pool", V, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d),
               functions=(F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d),
               voids=maxpool_why, propagate="adaptive_maxpool"),
        OpSpec("LayerNorm", V, (nn.LayerNorm,) + _fns("RMSNorm", mod=nn), functions=(F.layer_norm,)
               + _fns("rms_norm", mod=F), voids="LayerNorm divides by a data-dependent std: Lipschitz constant "
               "unbounded near zero variance"),
        OpSpec("GroupNorm", V, (nn.GroupNorm,), functions=(F.group_norm,),
               voids="GroupNorm divides by a data-dependent std: Lipschitz constant unbounded"),
        OpSpec("InstanceNorm", V, (nn.modules.instancenorm._InstanceNorm,), functions=(F.instance_norm,),
               voids="InstanceNorm divides by a data-dependent std: Lipschitz constant unbounded"),
        OpSpec("LocalResponseNorm", V, (nn.LocalResponseNorm,), functions=(F.local_response_norm,),
               voids="LocalResponseNorm is a data-dependent division"),
        OpSpec("F.normalize", V, functions=(F.normalize,), voids="normalization by a data-dependent norm: "
               "Lipschitz constant unbounded near zero"),
        OpSpec("softmax", V, (nn.Softmax, nn.LogSoftmax, nn.Softmax2d), functions=(F.softmax, torch.softmax,
               F.log_softmax, torch.log_softmax), methods=("softmax", "log_softmax"),
               voids="softmax inside the network (attention / gating): not analysed"),
        OpSpec("attention", V, (nn.MultiheadAttention,), functions=(F.scaled_dot_product_attention,),
               voids="attention (products of input-dependent tensors): curvature unbounded"),
        OpSpec("max / min", V, functions=(torch.max, torch.min, torch.amax, torch.amin, torch.maximum,
                                           torch.minimum, torch.fmax, torch.fmin, torch.where),
               methods=("max", "min", "amax", "amin", "maximum", "minimum", "fmax", "fmin", "where"),
               voids="max / min / where select between values: not differentiable where they tie"),
        OpSpec("round", V, functions=(torch.round, torch.floor, torch.ceil, torch.trunc, torch.sign, torch.sgn),
               methods=("round", "floor", "ceil", "trunc", "sign", "sgn", "round_", "floor_", "ceil_", "trunc_"),
               voids="piecewise constant (rounding / sign): not continuous"),
        OpSpec("exp / pow / log", V, functions=(torch.exp, torch.exp2, torch.expm1, operator.pow, torch.pow,
                                                 torch.square, torch.log, torch.log2, torch.log10, torch.log1p,
                                                 torch.sqrt, torch.rsqrt, torch.reciprocal, torch.float_power),
               methods=("exp", "exp_", "expm1", "pow", "pow_", "__pow__", "__rpow__", "square", "log", "log_",
                        "log1p", "log2", "sqrt", "sqrt_", "rsqrt", "reciprocal", "float_power"),
               voids="exponential / power / logarithm: slope or curvature unbounded over the input space"),
    ]
    return specs


def _timm_padding() -> Any:
    try:
        import timm.layers.padding as p
        return p
    except Exception:  # noqa: BLE001 - timm is optional
        return None


# ==========================================================================================================
# the registry


class _Registry:
    def __init__(self) -> None:
        self._user: list[OpSpec] = []
        self._builtin: list[OpSpec] | None = None
        self._functions: dict[Any, OpSpec] | None = None
        self._methods: dict[str, OpSpec] | None = None
        self._leaves: tuple[type, ...] | None = None

    def specs(self) -> list[OpSpec]:
        if self._builtin is None:
            self._builtin = _builtin_specs()
        return self._user + self._builtin

    def _index(self) -> None:
        functions: dict[Any, OpSpec] = {}
        methods: dict[str, OpSpec] = {}
        for s in reversed(self.specs()):        # first entry wins
            for f in s.functions:
                functions[f] = s
            for m in s.methods:
                methods[m] = s
        self._functions, self._methods = functions, methods

    def function(self, f: Any) -> OpSpec | None:
        if self._functions is None:
            self._index()
        try:
            return self._functions.get(f)  # type: ignore[union-attr]
        except TypeError:   # unhashable target
            return None

    def method(self, name: str) -> OpSpec | None:
        if self._methods is None:
            self._index()
        return self._methods.get(name)  # type: ignore[union-attr]

    def module(self, m: nn.Module) -> OpSpec | None:
        for s in self.specs():
            if s.modules and isinstance(m, s.modules):
                return s
        return None

    def leaves(self) -> tuple[type, ...]:
        if self._leaves is None:
            self._leaves = tuple(dict.fromkeys(t for s in self.specs() for t in s.modules))
        return self._leaves

    def add(self, spec: OpSpec) -> None:
        self._user.insert(0, spec)
        self._functions = self._methods = self._leaves = None

    def remove(self, spec: OpSpec) -> None:
        self._user = [s for s in self._user if s is not spec]
        self._functions = self._methods = self._leaves = None


_REGISTRY = _Registry()


def registry() -> list[OpSpec]:
    """Every entry, user registrations first (they take precedence)."""
    return list(_REGISTRY.specs())


def register(spec: OpSpec) -> OpSpec:
    """Add an entry (it takes precedence over the built-in ones). Returns it (for :func:`unregister`)."""
    if not isinstance(spec, OpSpec):
        raise TypeError(f"register() takes an OpSpec, got {type(spec).__name__}")
    _REGISTRY.add(spec)
    return spec


def unregister(spec: OpSpec) -> None:
    """Remove an entry added with :func:`register`."""
    _REGISTRY.remove(spec)


def register_activation(module_type: type | None = None, *, slope: float, curvature: float = INF,
                        normalized_curvature: float = INF, kink: str | None = None,
                        functions: Iterable[Callable[..., Any]] = (), methods: Iterable[str] = (),
                        convert: str = "never", name: str | None = None) -> OpSpec:
    """Register an elementwise activation (module type and/or functions / tensor methods).

    Args:
        slope: sup |phi'|; curvature: sup |phi''| (``inf`` or a ``kink`` reason for a kink);
        normalized_curvature: sup |phi''/phi'| (for the paper's Theorem 1 value; ``inf`` if unknown).
        convert: ``"never"`` (kept and analysed with these constants), ``"always"`` (converted to a
            CenteredSoftplus like ReLU), ``"policy"`` (converted unless ``smooth_activations="keep"``).
    Returns:
        The :class:`OpSpec` (pass it to :func:`unregister` to remove it).
    """
    if convert not in ("never", "always", "policy"):
        raise ValueError(f"register_activation: convert must be 'never', 'always' or 'policy', got {convert!r}")
    if not (slope >= 0 and curvature >= 0):
        raise ValueError("register_activation: slope and curvature must be >= 0")
    if module_type is None and not functions and not methods:
        raise ValueError("register_activation: give a module type, functions or methods")
    family = {"never": Family.GATE if kink is None and math.isfinite(curvature) else Family.KINK,
              "always": Family.RELU, "policy": Family.SMOOTH}[convert]
    label = name or (module_type.__name__ if module_type is not None else
                     getattr(next(iter(functions), None), "__name__", None) or next(iter(methods), "activation"))
    return register(_act(label, family, Constants(float(slope), float(curvature), float(normalized_curvature),
                                                   kink if kink is not None or math.isfinite(curvature) else KINK),
                         modules=(module_type,) if module_type is not None else (), functions=tuple(functions),
                         methods=tuple(methods), inplace=Inplace.ATTRIBUTE if module_type is not None else
                         Inplace.NEVER, convert=None if convert == "never" else "activation"))


def spec_for_module(m: nn.Module) -> OpSpec | None:
    """The entry whose module types ``m`` is an instance of (first match), or None."""
    return _REGISTRY.module(m)


def spec_for_function(f: Any) -> OpSpec | None:
    return _REGISTRY.function(f)


def spec_for_method(name: str) -> OpSpec | None:
    return _REGISTRY.method(str(name))


def lookup(node: fx.Node, modules: dict[str, nn.Module]) -> OpSpec | None:
    """The entry of an fx node (call_module / call_function / call_method), or None."""
    if node.op == "call_module":
        m = modules.get(str(node.target))
        return spec_for_module(m) if m is not None else None
    if node.op == "call_function":
        return spec_for_function(node.target)
    if node.op == "call_method":
        return spec_for_method(str(node.target))
    return None


def node_call(node: fx.Node, modules: dict[str, nn.Module], *, value: Callable[[Any], Any] | None = None,
              dependent: Callable[[Any], bool] | None = None, spec: OpSpec | None = None) -> Call:
    """The :class:`Call` of an fx node (``value`` defaults to resolving ``get_attr`` nodes)."""
    module = modules.get(str(node.target)) if node.op == "call_module" else None
    if value is None:
        root = modules.get("")

        def value(a: Any) -> Any:
            if isinstance(a, fx.Node) and a.op == "get_attr" and root is not None:
                obj: Any = root
                try:
                    for part in str(a.target).split("."):
                        obj = getattr(obj, part)
                    return obj
                except AttributeError:
                    return a
            return a
    return Call(node.op, node.target, tuple(node.args), dict(node.kwargs), module,
                spec if spec is not None else lookup(node, modules), value, dependent or (lambda a: False))


def op_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """A readable name of the op of a node (``F.relu``, ``Tensor.clamp``, ``operator.mul``, ``MaxPool2d``)."""
    if node.op == "call_module":
        m = modules.get(str(node.target))
        return type(m).__name__ if m is not None else str(node.target)
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    t = node.target
    mod = getattr(t, "__module__", "") or ""
    name = getattr(t, "__name__", str(t))
    if mod.startswith("torch.nn.functional"):
        return f"F.{name}"
    if mod.startswith("_operator"):
        return f"operator.{name}"
    if mod.startswith("torch") or mod == "":
        return f"torch.{name}"
    return f"{mod}.{name}"


def verdict(node: fx.Node, modules: dict[str, nn.Module], *, dependent: Callable[[Any], bool],
            value: Callable[[Any], Any] | None = None) -> Verdict:
    """What the registry says of ``node``: its entry and why it voids the guarantee (None: it does not).

    An unknown function / method is ``"unknown op: not analysed"``; an unknown module is the caller's to
    trace into (see :func:`module_voids`) and gets :data:`OPAQUE_MODULE` here."""
    spec = lookup(node, modules)
    name = op_name(node, modules)
    if spec is None:
        if node.op == "call_module":
            m = modules.get(str(node.target))
            return Verdict(None, None if isinstance(m, fx.GraphModule) else OPAQUE_MODULE, name)
        return Verdict(None, UNKNOWN_OP, name)
    call = node_call(node, modules, value=value, dependent=dependent, spec=spec)
    return Verdict(spec, spec.void_reason(call), name)


# ==========================================================================================================
# in-place


def is_inplace(node: fx.Node, modules: dict[str, nn.Module], spec: OpSpec | None = None) -> bool:
    """Whether the call mutates its first argument (later readers of it must read the new value)."""
    if node.op == "call_method" and str(node.target).endswith("_") and not str(node.target).startswith("__"):
        return True     # x.relu_(), x.add_(y), x.clamp_(...): torch's naming convention
    if node.op == "call_function" and node.target in _INPLACE_OPERATORS:
        return True     # x += y on tensors
    spec = spec if spec is not None else lookup(node, modules)
    if spec is None:
        return False
    if spec.inplace is Inplace.ALWAYS:
        return True
    if spec.inplace is Inplace.ATTRIBUTE and node.op == "call_module":
        return getattr(modules.get(str(node.target)), "inplace", False) is True
    if spec.inplace is Inplace.ARGUMENT:
        if node.kwargs.get("inplace") is True:
            return True
        i = spec.inplace_index
        return i is not None and len(node.args) > i and node.args[i] is True
    return False


_INPLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv)


def inplace_source(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    """The tensor node an in-place call mutates, or None."""
    first = node.args[0] if node.args else None
    if isinstance(first, fx.Node) and is_inplace(node, modules):
        return first
    return None


def activation_constants(activation: nn.Module) -> Constants:
    """The bound constants of an activation module; KeyError if it is not a registered activation."""
    spec = spec_for_module(activation)
    if spec is None or spec.constants is None:
        raise KeyError(f"no bound constants registered for {type(activation).__name__}")
    return spec.constants_for(Call("call_module", type(activation), module=activation, spec=spec))


# ==========================================================================================================
# walking a graph without running it (the report, and the bound's fast pre-check)


def dependent_nodes(graph: fx.Graph, modules: dict[str, nn.Module]) -> set[fx.Node]:
    """Nodes whose value depends on the graph's inputs (sizes, shapes and ``*_like`` constants do not)."""
    out: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder":
            out.add(n)
        elif n.op in ("call_module", "call_function", "call_method") and any(a in out for a in n.all_input_nodes):
            spec = lookup(n, modules)
            if spec is not None and spec.propagate == "constant":
                continue
            out.add(n)
    return out


def void_sites(gm: fx.GraphModule, depth: int = 0
               ) -> Iterator[tuple[tuple[fx.Node, ...], dict[str, nn.Module], str, str]]:
    """Every call in ``gm`` that voids the guarantee, found from the registry alone (no forward), recursing into
    GraphModule and traceable unregistered submodules (at most 8 levels deep).

    Yields ``(nodes, modules, op, reason)``: ``nodes`` the ``call_module`` nodes leading into the submodule
    that holds the site, then the site's own node; ``modules`` the submodules of the graph that holds it;
    ``op`` a readable name of its op. The report (:func:`graph_voids`) and the bound's pre-check walk this."""
    modules = dict(gm.named_modules())
    dep = dependent_nodes(gm.graph, modules)
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method") or node not in dep:
            continue
        v = verdict(node, modules, dependent=lambda a: a in dep)
        if node.op == "call_module" and v.spec is None:
            m = modules[str(node.target)]
            sub = None if depth >= 8 else m if isinstance(m, fx.GraphModule) else traced_or_none(m)
            if sub is None:
                yield (node,), modules, type(m).__name__, (TOO_DEEP if depth >= 8 else OPAQUE_MODULE)
                continue
            for nodes, mods, op, why in void_sites(sub, depth + 1):
                yield (node, *nodes), mods, op, why
        elif v.reason is not None:
            yield (node,), modules, v.name, v.reason


def graph_voids(gm: fx.GraphModule, prefix: str = "", depth: int = 0) -> list[tuple[str, str, str]]:
    """``(path, op, reason)`` of every node of ``gm`` that voids the guarantee (:func:`void_sites`); ``path``
    is the dotted module path, ending in the node's name for a functional call."""
    return [(prefix + ".".join(str(n.target) if n.op == "call_module" else n.name for n in nodes), op, why)
            for nodes, _, op, why in void_sites(gm, depth)]


def module_voids(m: nn.Module, path: str, depth: int = 0) -> list[tuple[str, str, str]]:
    """``(path, op, reason)`` of what voids the guarantee inside module ``m``: its registry entry's verdict, or,
    for an unregistered module, what :func:`graph_voids` finds in its eval-mode trace; a module that cannot be
    traced is :data:`OPAQUE_MODULE`."""
    spec = spec_for_module(m)
    if spec is not None:
        why = spec.void_reason(Call("call_module", type(m), module=m, spec=spec))
        return [] if why is None else [(path, type(m).__name__, why)]
    if depth > 8:
        return [(path, type(m).__name__, TOO_DEEP)]
    gm = m if isinstance(m, fx.GraphModule) else traced_or_none(m)
    if gm is None:
        return [(path, type(m).__name__, OPAQUE_MODULE)]
    return graph_voids(gm, f"{path}.", depth)


def traced_or_none(m: nn.Module) -> fx.GraphModule | None:
    """``m`` traced with lcnnify's tracer in eval mode (:func:`lcnnify.convert.trace.trace_module`), or None if
    it cannot be traced (or is its own leaf)."""
    # imported here: the tracer reads its leaves from this registry, and lcnnify.convert imports this module
    from .convert.trace import trace_module

    try:
        gm = trace_module(m, training=False)
    except Exception:  # noqa: BLE001 - untraceable: opaque
        return None
    if any(n.op == "call_module" and gm.get_submodule(str(n.target)) is m for n in gm.graph.nodes):
        return None
    return gm


def leaf_types() -> tuple[type, ...]:
    """Module types the tracer must not trace into: every registered module type."""
    return _REGISTRY.leaves()
