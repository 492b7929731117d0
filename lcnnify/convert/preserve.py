"""Function-preserving conversion: the LCNN computes what the trained model computed (paper §3.4, applied to a
trained model).

Converting a trained model changes its function in three places:

* spectral normalization divides every conv / linear weight by its operator norm sigma, so each layer's output
  shrinks by 1/sigma -- but the BatchNorm running statistics that follow were measured on the unnormalized conv;
* the gamma-Lipschitz BatchNorm scales its linear part by ``min(1, gamma / L)`` and cuts every gain L above gamma;
* each ReLU becomes a centered softplus, which differs from it by up to ``log(2) / beta``.

:func:`preserve_function` undoes the first two and bounds the third. It runs the converted model once on the
example inputs, node by node over its fx graph (an :class:`torch.fx.Interpreter`, eval mode), and keeps for every
value ``v'`` of the converted model a positive scale ``s`` with ``v' = s v`` (``v``: the original model's value):

* input: ``s = 1``;
* conv / linear ``W x / sigma + b`` seeing scale ``c``: output scale ``k = c / sigma``, and the bias becomes
  ``k b``, so ``W (c x) / sigma + k b = k (W x + b)`` exactly (sigma: the divisor its spectral norm applies in
  eval mode; 1 for a layer left unnormalized);
* BatchNorm (``LipschitzBatchNorm``, fused BN+act, plain BN) seeing scale ``c`` absorbs it:
  ``running_mean <- c mu``, ``running_var <- c^2 var``, ``eps <- c^2 eps``, so
  ``(c z - c mu) / sqrt(c^2 var + c^2 eps) = (z - mu) / sqrt(var + eps)`` exactly, with running statistics (eval)
  and with batch statistics (train) alike; then ``gamma <- max(gamma, (1 + 1e-3) L)`` with
  ``L = max_i |w_i| / sqrt(var_i + eps)`` the largest gain it must pass, for the running variance (eval) and for
  the example batch's variance (training mode clips with the batch's statistics), so the clip is inactive on
  them. Output scale 1.
  GroupNorm / LayerNorm / InstanceNorm (no running statistics) are scale invariant: ``eps <- c^2 eps``, scale 1;
* a centered softplus that replaced a ReLU is positively homogeneous up to its beta,
  ``s0(c x; beta) = c s0(x; c beta)``, so the scale passes; its beta is set so that the approximation error
  ``|s0 - relu| <= log(2) / beta`` is at most ``tolerance`` times the rms of its input on the example inputs:
  ``beta = max(beta0, log(2) / (tolerance * rms))``, capped at 1e4;
* positively homogeneous ops pass the scale: max / average pooling, flatten / reshape / permute / slicing,
  dropout, zero / reflect / replicate padding, interpolation, mean / sum, ReLU or leaky ReLU left as they are;
  add / sub / cat / stack of operands with equal scales keep it; products multiply scales, quotients divide them;
* any op that conversion left unchanged and whose inputs all have scale exactly 1 computes what it computed.

Everything else changes the function there, and the report says so per module (``report.notes``): a sigmoid /
SiLU / GELU gate seeing a scaled input (squeeze-excitation after its normalized convs), branches with different
scales added (a residual without a BatchNorm after its conv), a constant added to a scaled value, an activation
other than ReLU replaced by a centered softplus (SiLU, GELU, ReLU6, leaky ReLU, softplus), a module converted
module by module (not traced). Each note gives the scale the op saw and the relative deviation of its output from
the original op's output on the example inputs. Downstream, the pass continues with the least-squares scale
between the two, so that later BatchNorms still absorb the right magnitude and the model stays close to the
original.

The logits come out multiplied by ``k = output_scale > 0`` (``1 / sigma`` of the last linear times whatever
scale reaches it): argmax and ranking are those of the original model; the cross-entropy sees temperature
``1 / k``. The function is preserved at the example inputs' resolution: a convolution's sigma refers to the input
shape it saw.
"""
from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.fx.node import map_aggregate
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.utils import parametrize

from .. import ops
from .._utils import modes_preserved
from ..errors import ConversionError, ConversionWarning
from ..nn import CenteredSoftplus, LipschitzBatchNorm, is_lcnn_layer

try:  # the base of lcnnify's conv and linear spectral norms
    from ..nn import SpectralNormBase as _LCNNSpectralNorm
except ImportError:  # pragma: no cover - older layout: conv only
    from ..nn import ConvSpectralNorm as _LCNNSpectralNorm
from .report import ConversionReport

__all__ = ["Preservation", "preserve_function", "DEFAULT_TOLERANCE", "MAX_BETA", "GAMMA_MARGIN"]

#: Default bound on the centered-softplus approximation error, relative to the rms of each activation's input.
DEFAULT_TOLERANCE = 1e-4
#: beta is capped here (the range in which the centered softplus is tested).
MAX_BETA = 1e4
#: gamma starts at (1 + GAMMA_MARGIN) times the gain L its BatchNorm must pass.
GAMMA_MARGIN = 1e-3
_SCALE_RTOL = 1e-6  # two scales this close are equal (add / cat of branches)

_RELU_ORIGINALS = frozenset({"ReLU", "F.relu", "F.relu_", "torch.relu", "torch.relu_", "Tensor.relu",
                             "Tensor.relu_"})
_PRESERVED_KEY = "_user_preserved_attributes"  # torch.fx.graph_module._USER_PRESERVED_ATTRIBUTES_KEY


# ------------------------------------------------------------------------------------------------ op tables
def _optional_types(module: str, *names: str) -> tuple[type, ...]:
    try:
        mod = __import__(module, fromlist=list(names))
    except Exception:  # optional dependency
        return ()
    return tuple(getattr(mod, n) for n in names if hasattr(mod, n))


def _homogeneous_modules() -> tuple[type, ...]:
    """Modules m with m(c x) = c m(x) for every c > 0 (in eval and train mode)."""
    return (
        nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Flatten, nn.Unflatten,
        nn.modules.dropout._DropoutNd,
        nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
        nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d,
        nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d,
        nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d,
        nn.CircularPad3d, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle, nn.Upsample,
    ) + _optional_types("timm.layers", "DropPath", "DropBlock2d", "SelectAdaptivePool2d", "BlurPool2d") \
      + _optional_types("torchvision.ops", "StochasticDepth")


_PASS_FUNCTIONS = frozenset({
    torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute, torch.transpose, torch.t,
    torch.mean, torch.sum, torch.clone, torch.chunk, torch.split, torch.narrow, torch.roll, torch.flip,
    torch.amax, torch.neg, operator.neg, operator.getitem, torch.relu, F.relu, F.leaky_relu,
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.interpolate, F.pixel_shuffle, F.pixel_unshuffle,
    F.lp_pool1d, F.lp_pool2d,
})
_PASS_METHODS = frozenset({
    "view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "contiguous", "squeeze", "unsqueeze",
    "expand", "expand_as", "view_as", "reshape_as", "repeat", "mean", "sum", "chunk", "split", "narrow", "clone",
    "roll", "flip", "amax", "neg", "relu", "relu_", "float", "double", "half", "bfloat16", "to", "type_as",
    "__getitem__",
})
_EQUAL_FUNCTIONS = frozenset({operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub,
                              torch.cat, torch.concat, torch.stack, torch.maximum, torch.minimum})
_EQUAL_METHODS = frozenset({"add", "add_", "sub", "sub_", "maximum", "minimum"})
_PRODUCT_FUNCTIONS = frozenset({operator.mul, operator.imul, torch.mul, operator.matmul, torch.matmul, torch.bmm})
_PRODUCT_METHODS = frozenset({"mul", "mul_", "matmul", "bmm"})
_RATIO_FUNCTIONS = frozenset({operator.truediv, operator.itruediv, torch.div})
_RATIO_METHODS = frozenset({"div", "div_"})
_META_METHODS = frozenset({"size", "dim", "numel", "ndimension", "type", "__len__", "stride", "is_contiguous"})
_META_FUNCTIONS = frozenset({getattr, len})


# ------------------------------------------------------------------------------------------------ result
@dataclass
class Preservation:
    """What :func:`preserve_function` did and what holds afterwards.

    Attributes:
        exact: every op on the way to the output was tracked: the converted model computes ``output_scale`` times
            the original output, up to the centered-softplus approximation (``tolerance``).
        output_scale: the positive factor of the logits (a tuple for several outputs).
        tolerance: the centered-softplus error bound, relative to each activation's input rms.
        scales: graph node name -> scale of its value (converted = scale x original; the least-squares fit
            downstream of a change).
        tracked: graph node name -> whether that value is exactly tracked.
        module_scales: module path -> scale of its output (first call site).
        sigmas: module path -> the divisor its spectral norm applies (eval mode).
        betas: module path of each centered softplus -> the beta it got (mean over channels if per-channel).
        changed: ``(path, op, why)`` of every op where the function changes.
        coarse: centered softplus sites whose beta hit :data:`MAX_BETA` before reaching ``tolerance``.
        remarks: ``(path, op, what)`` that hold only approximately but do not change the function (capped beta).
    """

    exact: bool = True
    output_scale: Any = 1.0
    tolerance: float = DEFAULT_TOLERANCE
    scales: dict[str, float] = field(default_factory=dict)
    tracked: dict[str, bool] = field(default_factory=dict)
    module_scales: dict[str, float] = field(default_factory=dict)
    sigmas: dict[str, float] = field(default_factory=dict)
    betas: dict[str, float] = field(default_factory=dict)
    changed: list[tuple[str, str, str]] = field(default_factory=list)
    coarse: list[str] = field(default_factory=list)
    remarks: list[tuple[str, str, str]] = field(default_factory=list)

    def summary(self) -> str:
        if self.exact:
            head = (f"function preserved: logits = {_fmt(self.output_scale)} x the original logits, up to the "
                    f"centered-softplus approximation (|s0 - relu| <= {self.tolerance:g} x each activation's "
                    "input rms)")
        else:
            head = (f"function NOT preserved exactly: {len(self.changed)} op(s) change it ("
                    + ", ".join(p for p, _, _ in self.changed[:5]) + (", ..." if len(self.changed) > 5 else "")
                    + f"); logits ~ {_fmt(self.output_scale)} x the original logits (least-squares fit)")
        if self.betas:
            b = list(self.betas.values())
            head += f"; beta in [{min(b):.4g}, {max(b):.4g}] at {len(b)} activation(s)"
        return head

    __str__ = summary


def _fmt(scale: Any) -> str:
    if isinstance(scale, (tuple, list)):
        return "(" + ", ".join(_fmt(s) for s in scale) + ")"
    return "n/a" if scale is None else f"{scale:.6g}"


# ------------------------------------------------------------------------------------------------ entry point
def preserve_function(model: nn.Module, example_inputs: Any, report: ConversionReport | None = None, *,
                      beta0: float | None = None, tolerance: float = DEFAULT_TOLERANCE) -> Preservation:
    """Make a converted model compute what its original computed (see the module docstring), in place.

    Args:
        model: a model returned by ``lcnnify(...)`` (an fx ``GraphModule`` whose statistics are still those of
            the original model: call this once, right after conversion; ``lcnnify(model,
            preserve_function=True, example_inputs=x)`` does).
        example_inputs: a tensor or tuple the model accepts, representative of the data (activation scales and
            beta come from them; each conv's sigma refers to the shape it sees on them).
        report: the model's ConversionReport (default ``model.lcnn_report``): notes go there, and it tells which
            centered softplus replaced a ReLU (others replaced a different function).
        beta0: lower bound of every beta (default: ``model.lcnn_config.beta0``, else 5).
        tolerance: the centered-softplus approximation error bound relative to its input rms (> 0).

    Returns:
        A :class:`Preservation`, also stored as ``model.lcnn_preservation``.

    Raises:
        ConversionError: no example inputs, a model that is not a traced converted model, or the model fails on
            the inputs.
    """
    if example_inputs is None:
        raise ConversionError(
            "preserve_function=True needs example_inputs: the conv operator norms are measured at the input shape "
            "the model sees, and each centered softplus's beta is set from the scale of its input on real data. "
            "Fix: lcnnify(model, preserve_function=True, example_inputs=x) with x a batch of (training) inputs.")
    if not (tolerance > 0 and math.isfinite(tolerance)):
        raise ConversionError(f"preserve_function: tolerance must be a finite number > 0, got {tolerance}")
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    report = report if report is not None else getattr(model, "lcnn_report", None)
    if beta0 is None:
        cfg = getattr(model, "lcnn_config", None)
        beta0 = float(cfg.beta0) if cfg is not None else 5.0
    result = Preservation(tolerance=tolerance)
    if not isinstance(model, fx.GraphModule):
        why = (f"the model's root ({type(model).__name__}) could not be traced by torch.fx and was converted module "
               "by module, so the scales between its layers cannot be followed")
        result.exact, result.output_scale = False, None
        result.changed.append(("<root>", type(model).__name__, why))
        _note(report, f"preserve_function: {why}; the converted model does NOT compute the original function. Fix: "
                      "make the model traceable (see the report's fallback entries).")
        warnings.warn(f"preserve_function: {why}; the function is not preserved", ConversionWarning, stacklevel=3)
        _store(model, result)
        return result

    originals = {c.path: c.original for c in report.converted} if report is not None else {}
    with modes_preserved(model, training=False):
        with torch.no_grad():
            try:
                model(*inputs)  # every conv learns (and warms up at) the shape it sees
            except Exception as e:
                raise ConversionError(
                    f"preserve_function: the converted model failed on example_inputs of shape(s) "
                    f"{[tuple(t.shape) for t in inputs if isinstance(t, Tensor)]}: {type(e).__name__}: {e}. "
                    "Fix: pass inputs the original model accepts.") from e
            walker = _ScaleWalker(model, result, originals, beta0=float(beta0), tolerance=tolerance)
            hooks = [m.register_forward_pre_hook(walker.calibrate_beta) for m in model.modules()
                     if isinstance(m, CenteredSoftplus)]
            try:
                walker.run(*inputs)
            finally:
                for h in hooks:
                    h.remove()

    for path, op, why in result.changed + result.remarks:
        _note(report, f"preserve_function: '{path}' ({op}) {why}")
    _note(report, f"preserve_function: {result.summary()}")
    if not result.exact:
        warnings.warn(f"preserve_function: {result.summary()}; see model.lcnn_report.notes", ConversionWarning,
                      stacklevel=3)
    _store(model, result)
    return result


def _note(report: ConversionReport | None, text: str) -> None:
    if report is not None:
        report.notes.append(text)


def _store(model: nn.Module, result: Preservation) -> None:
    object.__setattr__(model, "lcnn_preservation", result)
    if isinstance(model, fx.GraphModule):  # survive GraphModule.__deepcopy__
        model.meta.setdefault(_PRESERVED_KEY, {})["lcnn_preservation"] = result


# ------------------------------------------------------------------------------------------------ the walk
def _tensors(value: Any) -> list[Tensor]:
    out: list[Tensor] = []
    map_aggregate(value, lambda v: out.append(v) if isinstance(v, Tensor) and v.is_floating_point() else None)
    return out


def _unscaled(value: Any, scale: float) -> Any:
    """The original model's value of a tracked value (a copy: the reference run may mutate it)."""
    return map_aggregate(value, lambda v: v / scale if isinstance(v, Tensor) and v.is_floating_point() else v)


def spectral_divisor(module: nn.Module) -> float:
    """The number a spectral norm on ``module.weight`` divides the weight by (eval mode, no iteration): the ratio
    of the norms of the weight entering and leaving the normalization in the parametrization chain; 1.0 without
    one. Call it in eval mode (a training-mode torch spectral norm would iterate)."""
    if not parametrize.is_parametrized(module, "weight"):
        return 1.0
    from torch.nn.utils.parametrizations import _SpectralNorm

    plist = module.parametrizations["weight"]
    w = plist.original
    for p in plist:
        w_next = p(w)
        if isinstance(p, (_LCNNSpectralNorm, _SpectralNorm)):
            num = torch.linalg.vector_norm(w.detach().double())
            den = torch.linalg.vector_norm(w_next.detach().double())
            return float(num / den) if float(den) > 0 else 1.0
        w = w_next
    return 1.0


def _is_affine_layer(m: nn.Module) -> bool:
    """A conv or linear that computes W x + b (possibly padded first), with W its (normalized) ``weight``."""
    if isinstance(m, nn.Linear):
        return True
    if not isinstance(m, nn.modules.conv._ConvNd):
        return False
    plain = type(m).forward in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.ConvTranspose1d.forward,
                                nn.ConvTranspose2d.forward, nn.ConvTranspose3d.forward)
    return plain or type(m).__name__ == "Conv2dSame" or is_lcnn_layer(m)


def _is_running_stat_norm(m: nn.Module) -> bool:
    """BatchNorm-like: normalizes with running statistics in eval (nn BatchNorms, LipschitzBatchNorm(Act), timm
    BatchNormAct2d, torchvision FrozenBatchNorm2d)."""
    if isinstance(m, _NormBase) and not isinstance(m, nn.modules.instancenorm._InstanceNorm):
        return True
    return "BatchNorm" in type(m).__name__ and hasattr(m, "running_var") and hasattr(m, "eps")


def _is_scale_invariant_norm(m: nn.Module) -> bool:
    """GroupNorm, LayerNorm and InstanceNorm without running statistics: norm(c x) = norm(x) once eps <- c^2 eps."""
    if isinstance(m, (nn.GroupNorm, nn.LayerNorm)):
        return True
    return isinstance(m, nn.modules.instancenorm._InstanceNorm) and not m.track_running_stats


class _ScaleWalker(fx.Interpreter):
    """Runs the converted graph once, absorbing scales into the layers before each runs (module docstring)."""

    def __init__(self, gm: fx.GraphModule, result: Preservation, originals: dict[str, str], *, beta0: float,
                 tolerance: float) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.result = result
        self.originals = originals
        self.beta0 = beta0
        self.tolerance = tolerance
        self.homogeneous = _homogeneous_modules()
        self.scale: dict[fx.Node, float | None] = {}  # None: does not depend on the input (constant / shape)
        self.exact: dict[fx.Node, bool] = {}
        self.absorbed: dict[int, float] = {}  # id(module) -> the scale its bias / statistics were set for
        self.calibrated: set[int] = set()
        self.paths = {id(m): p for p, m in gm.named_modules()}

    # ------------------------------------------------------------------ beta (a pre-hook on every softplus)
    def calibrate_beta(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Set beta from the rms of the first input the centered softplus sees (log 2 / beta <= tol * rms)."""
        if id(module) in self.calibrated or not args or not isinstance(args[0], Tensor):
            return
        self.calibrated.add(id(module))
        x = args[0].detach().double()
        if module.num_channels is None:
            rms = torch.sqrt(torch.mean(x * x)).reshape(())
        else:
            d = module.channel_dim % x.dim()
            dims = [i for i in range(x.dim()) if i != d]
            rms = torch.sqrt(torch.mean(x * x, dim=dims))
        wanted = math.log(2.0) / (self.tolerance * rms.clamp_min(1e-30))
        beta = wanted.clamp(min=self.beta0, max=MAX_BETA)
        module.log_beta.copy_(beta.log().to(module.log_beta.dtype).expand_as(module.log_beta))
        self.result.betas[self.paths.get(id(module), "?")] = float(beta.mean())
        if bool((wanted > MAX_BETA).any()):  # the cap binds
            path = self.paths.get(id(module), "?")
            self.result.coarse.append(path)
            self.result.remarks.append(
                (path, "CenteredSoftplus", f"beta capped at {MAX_BETA:g}: its input rms ({float(rms.min()):.3g}) is "
                 f"so small that log(2)/beta exceeds {self.tolerance:g} x rms (the ReLU is approximated to "
                 f"{math.log(2.0) / MAX_BETA:.2g} absolute)"))

    # ------------------------------------------------------------------ dispatch
    def run_node(self, n: fx.Node) -> Any:
        if n.op == "placeholder":
            out = super().run_node(n)
            self._set(n, 1.0 if isinstance(out, Tensor) else None, True)
            return out
        if n.op == "get_attr":
            self._set(n, None, True)
            return super().run_node(n)
        if n.op == "output":
            self._record_output(n)
            return super().run_node(n)
        if self._is_meta(n):
            self._set(n, None, True)
            return super().run_node(n)
        ins = [a for a in n.all_input_nodes if self.scale.get(a) is not None]
        if not ins:  # depends on constants only (a buffer reshaped, a shape computed)
            self._set(n, None, True)
            if n.op == "call_module" and self._changed_by_conversion(self.module.get_submodule(n.target)):
                self._changed(n.target, type(self.module.get_submodule(n.target)).__name__,
                              "is a converted layer applied to a constant: its output changed")
            return super().run_node(n)
        exact_in = all(self.exact[a] for a in ins)
        if n.op == "call_module":
            out = self._call_module_node(n, ins, exact_in)
        else:
            out = self._call_op_node(n, ins, exact_in)
        if self._is_inplace(n) and isinstance(n.args[0], fx.Node):  # the mutated input now holds the output
            self._set(n.args[0], self.scale[n], self.exact[n])
        return out

    # ------------------------------------------------------------------ modules
    def _call_module_node(self, n: fx.Node, ins: list[fx.Node], exact_in: bool) -> Any:
        m = self.module.get_submodule(n.target)
        path = str(n.target)
        c = self.scale[n.args[0]] if isinstance(n.args[0], fx.Node) and self.scale.get(n.args[0]) is not None \
            else self.scale[ins[0]]
        if _is_affine_layer(m):
            sigma = spectral_divisor(m)
            if sigma != 1.0 or is_lcnn_layer(m):
                self.result.sigmas.setdefault(path, sigma)
            k = c / sigma
            ok = self._absorb_once(m, path, k, lambda: m.bias.mul_(k) if m.bias is not None else None,
                                   needed=m.bias is not None)
            out = super().run_node(n)
            self._set(n, k, exact_in and ok, module=path)
            return out
        if _is_running_stat_norm(m):
            ok = self._absorb_once(m, path, c, lambda: _absorb_batchnorm(m, c), needed=True)
            ok = self._set_gamma(m, path, n) and ok
            out = super().run_node(n)
            self._set(n, 1.0, exact_in and ok and self._act_ok(m, path), module=path)
            return out
        if _is_scale_invariant_norm(m):
            ok = self._absorb_once(m, path, c, lambda: setattr(m, "eps", m.eps * c * c), needed=True)
            out = super().run_node(n)
            self._set(n, 1.0, exact_in and ok and self._act_ok(m, path), module=path)
            return out
        if isinstance(m, CenteredSoftplus):
            out = super().run_node(n)
            original = self.originals.get(path, "ReLU")
            ok = original in _RELU_ORIGINALS
            if not ok:
                self._changed(path, original, f"was replaced by a centered softplus, a different function than "
                              f"{original} (only ReLU is approximated; smooth_activations='keep' keeps it, at the "
                              "cost of the curvature guarantee)")
            self._set(n, c, exact_in and ok, module=path)
            return out
        if isinstance(m, self.homogeneous) and not self._changed_by_conversion(m):
            out = super().run_node(n)
            self._set(n, c, exact_in, module=path)
            return out
        return self._generic(n, ins, exact_in, type(m).__name__, path)

    def _absorb_once(self, m: nn.Module, path: str, factor: float, absorb, needed: bool) -> bool:
        """Absorb ``factor`` into module ``m`` at its first call site; later sites must see the same factor."""
        if not needed:
            return True
        prev = self.absorbed.get(id(m))
        if prev is None:
            self.absorbed[id(m)] = factor
            if factor != 1.0:
                absorb()
            return True
        if math.isclose(prev, factor, rel_tol=_SCALE_RTOL):
            return True
        self._changed(path, type(m).__name__, f"is called at several sites whose inputs have different scales "
                      f"({prev:.4g} and {factor:.4g}); its statistics / bias can match only the first")
        return False

    def _set_gamma(self, m: nn.Module, path: str, n: fx.Node) -> bool:
        """gamma >= (1 + margin) x the gains the layer must pass, so the clip min(1, gamma / L) is inactive: L of
        the running statistics (eval) and L of the example batch's statistics (training mode normalizes, and
        clips, with the batch's statistics)."""
        if not isinstance(m, LipschitzBatchNorm):
            return True
        x = self.env[n.args[0]].detach()
        dims = [0] + list(range(2, x.dim()))
        batch_var = torch.var(x.to(m.log_gamma_minus_1.dtype), dim=dims, unbiased=False)
        gains = [float(m._gain_terms(batch_var).max())]
        L = m.lipschitz_bound_unclipped()
        exact = True
        if L is not None:
            gains.append(float(L))
        elif not m.frozen:  # batch statistics in eval too: the gain depends on the batch
            gains.append(2.0 * gains[0])
            exact = False
            self._changed(path, type(m).__name__, "normalizes with batch statistics in eval mode too "
                          "(track_running_stats=False): its gain depends on the batch; gamma set to twice the "
                          "example batch's gain")
        if m.frozen:  # frozen: running statistics in training too
            gains = gains[1:]
        target = max(gains) * (1.0 + GAMMA_MARGIN)
        if float(m.gamma) < target:  # then target > gamma >= 1
            m.log_gamma_minus_1.fill_(math.log(target - 1.0))
        return exact

    def _act_ok(self, m: nn.Module, path: str) -> bool:
        """The activation fused in a norm module (timm BatchNormAct2d, GroupNormAct...) computes the original."""
        act = getattr(m, "act", None)
        if not isinstance(act, CenteredSoftplus):
            return True  # none, Identity, or the original activation (its input has scale 1)
        original = self.originals.get(f"{path}.act", "ReLU")
        if original in _RELU_ORIGINALS:
            return True
        self._changed(f"{path}.act", original, f"was replaced by a centered softplus, a different function than "
                      f"{original} (smooth_activations='keep' keeps it)")
        return False

    @staticmethod
    def _changed_by_conversion(m: nn.Module) -> bool:
        return any(is_lcnn_layer(s) for s in m.modules())

    # ------------------------------------------------------------------ functions and methods
    def _call_op_node(self, n: fx.Node, ins: list[fx.Node], exact_in: bool) -> Any:
        t = n.target
        name = ops.op_name(n, {})
        path = self._site_path(n)
        is_fn, is_meth = n.op == "call_function", n.op == "call_method"
        if (is_fn and t in _PASS_FUNCTIONS) or (is_meth and t in _PASS_METHODS):
            first = _first_node(n.args[0]) if n.args else None
            s = self.scale.get(first) if first is not None else None
            if s is None:
                s = self.scale[ins[0]]
            out = super().run_node(n)
            self._set(n, s, exact_in)
            return out
        if t is F.pad:
            if self._pad_ok(n, self.scale[ins[0]]):
                out = super().run_node(n)
                self._set(n, self.scale[ins[0]], exact_in)
                return out
            return self._generic(n, ins, exact_in, name, path,
                                 why="pads a scaled value with a non-zero constant")
        if (is_fn and t in _EQUAL_FUNCTIONS) or (is_meth and t in _EQUAL_METHODS):
            scales = [self.scale[a] for a in ins]
            s = scales[0]
            if not all(math.isclose(x, s, rel_tol=_SCALE_RTOL) for x in scales):
                return self._generic(n, ins, exact_in, name, path,
                                     why="combines branches with different scales (" +
                                     ", ".join(f"{x:.4g}" for x in scales) + "): no BatchNorm after it absorbs them")
            if not math.isclose(s, 1.0, rel_tol=_SCALE_RTOL) and self._has_constant_operand(n):
                return self._generic(n, ins, exact_in, name, path,
                                     why=f"adds a constant to a value of scale {s:.4g}")
            out = super().run_node(n)
            self._set(n, s, exact_in)
            return out
        if (is_fn and t in _PRODUCT_FUNCTIONS) or (is_meth and t in _PRODUCT_METHODS):
            s = math.prod(self.scale[a] for a in ins)  # type: ignore[misc]
            out = super().run_node(n)
            self._set(n, s, exact_in)
            return out
        if (is_fn and t in _RATIO_FUNCTIONS) or (is_meth and t in _RATIO_METHODS):
            if n.kwargs.get("rounding_mode") is None:
                num = self.scale.get(n.args[0]) if isinstance(n.args[0], fx.Node) else None
                den = self.scale.get(n.args[1]) if len(n.args) > 1 and isinstance(n.args[1], fx.Node) else None
                s = (num if num is not None else 1.0) / (den if den is not None else 1.0)
                out = super().run_node(n)
                self._set(n, s, exact_in)
                return out
        return self._generic(n, ins, exact_in, name, path)

    def _pad_ok(self, n: fx.Node, s: float) -> bool:
        if n.target is not F.pad or math.isclose(s, 1.0, rel_tol=_SCALE_RTOL):
            return True
        mode = n.kwargs.get("mode", n.args[2] if len(n.args) > 2 else "constant")
        value = n.kwargs.get("value", n.args[3] if len(n.args) > 3 else None)
        return mode != "constant" or not value

    def _has_constant_operand(self, n: fx.Node) -> bool:
        """A non-zero number, or a value that does not depend on the input, among the operands."""
        first = n.args[0] if n.args else n.kwargs.get("tensors", n.kwargs.get("input"))
        if n.target in (torch.cat, torch.concat, torch.stack):
            operands = list(first)
        else:
            operands = [first, n.args[1] if len(n.args) > 1 else n.kwargs.get("other")]
        for a in operands:
            if isinstance(a, fx.Node) and self.scale.get(a) is None:
                return True
            if isinstance(a, (int, float)) and not isinstance(a, bool) and a != 0:
                return True
        return False

    # ------------------------------------------------------------------ ops that change the function
    def _generic(self, n: fx.Node, ins: list[fx.Node], exact_in: bool, name: str, path: str,
                 why: str | None = None) -> Any:
        scales = [self.scale[a] for a in ins]
        module = self.module.get_submodule(n.target) if n.op == "call_module" else None
        converted_inside = module is not None and self._changed_by_conversion(module)
        if why is None and not converted_inside and all(s == 1.0 for s in scales):
            out = super().run_node(n)  # unchanged op, unchanged inputs
            self._set(n, 1.0, exact_in, module=path if module is not None else None)
            return out
        if why is None:
            why = ("is a module converted module by module (not traced): the scales inside it are not followed"
                   if converted_inside else
                   "is not positively homogeneous and sees a scaled input (scale " +
                   ", ".join(f"{s:.4g}" for s in scales) + ")")
            layers = self._scaling_layers(ins)
            if layers and not converted_inside:
                why += (f" made by the spectral norm(s) of {', '.join(layers)} with no BatchNorm after them. Fix, "
                        f"at the cost of their Lipschitz bound: skip={tuple(layers)!r} leaves them unnormalized")
        ref = None
        if not converted_inside:
            un = {a: _unscaled(self.env[a], self.scale[a]) for a in ins}
            args = fx.node.map_arg(n.args, lambda a: un[a] if a in un else self.env[a])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: un[a] if a in un else self.env[a])
            ref = getattr(self, n.op)(n.target, args, kwargs)
        out = super().run_node(n)
        k, dev = _fit_scale(out, ref, fallback=scales[0])
        detail = f"; its output deviates by {dev:.2%} (relative l2) from {k:.4g} x the original on the example " \
                 "inputs" if dev is not None else ""
        self._changed(path, name, why + detail)
        self._set(n, k, False, module=path if module is not None else None)
        return out

    def _scaling_layers(self, ins: list[fx.Node]) -> list[str]:
        """Spectrally normalized layers between the last scale-1 values and ``ins`` (the scale's makers)."""
        found: list[str] = []
        stack, seen = list(ins), set()
        while stack:
            a = stack.pop()
            if a in seen or self.scale.get(a) is None or self.scale[a] == 1.0:
                continue
            seen.add(a)
            if a.op == "call_module" and a.target in self.result.sigmas and a.target not in found:
                found.append(str(a.target))
            stack.extend(a.all_input_nodes)
        return sorted(found)

    def _changed(self, path: str, op: str, why: str) -> None:
        self.result.changed.append((path, op, why))
        self.result.exact = False

    # ------------------------------------------------------------------ bookkeeping
    def _set(self, n: fx.Node, scale: float | None, exact: bool, module: str | None = None) -> None:
        self.scale[n] = scale
        self.exact[n] = exact
        self.result.scales[n.name] = math.nan if scale is None else float(scale)
        self.result.tracked[n.name] = bool(exact)
        if module is not None and scale is not None:
            self.result.module_scales.setdefault(module, float(scale))

    def _record_output(self, n: fx.Node) -> None:
        leaves: list[fx.Node] = []
        fx.node.map_arg(n.args[0], lambda a: leaves.append(a))
        scales = [self.scale.get(a) for a in leaves]
        self.result.output_scale = scales[0] if len(scales) == 1 else tuple(scales)
        if not all(self.exact.get(a, True) for a in leaves):
            self.result.exact = False

    def _is_meta(self, n: fx.Node) -> bool:
        return (n.op == "call_method" and n.target in _META_METHODS) or (
            n.op == "call_function" and n.target in _META_FUNCTIONS)

    @staticmethod
    def _is_inplace(n: fx.Node) -> bool:
        return n.op != "call_module" and ops.is_inplace(n, {})  # converted modules: readers already redirected

    @staticmethod
    def _site_path(n: fx.Node) -> str:
        stack = n.meta.get("nn_module_stack") or {}
        parent = list(stack.values())[-1][0] if stack else ""
        return f"{parent}.{n.name}" if isinstance(parent, str) and parent else n.name


def _absorb_batchnorm(m: nn.Module, c: float) -> None:
    """running_mean <- c mu, running_var <- c^2 var, eps <- c^2 eps: the normalized value is unchanged."""
    if getattr(m, "running_mean", None) is not None:
        m.running_mean.mul_(c)
    if getattr(m, "running_var", None) is not None:
        m.running_var.mul_(c * c)
    m.eps = float(m.eps) * c * c


def _fit_scale(out: Any, ref: Any, fallback: float) -> tuple[float, float | None]:
    """Least-squares k with out ~ k ref (k > 0), and the relative deviation ||out - k ref|| / ||k ref||."""
    if ref is None:
        return fallback, None
    a, b = _tensors(out), _tensors(ref)
    if not a or len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return fallback, None
    num = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))
    den = sum(float((y.double() ** 2).sum()) for y in b)
    k = num / den if den > 0 and math.isfinite(num / den) and num / den > 0 else fallback
    err = math.sqrt(sum(float(((x.double() - k * y.double()) ** 2).sum()) for x, y in zip(a, b)))
    ref_norm = k * math.sqrt(den) if den > 0 else 0.0
    return k, (err / ref_norm if ref_norm > 0 else None)


def _first_node(arg: Any) -> fx.Node | None:
    if isinstance(arg, fx.Node):
        return arg
    if isinstance(arg, (tuple, list)):
        for a in arg:
            found = _first_node(a)
            if found is not None:
                return found
    return None

