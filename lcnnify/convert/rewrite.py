"""Apply the replacement table to a model, call site by call site.

The model is traced with :mod:`lcnnify.convert.trace` (in train and in eval mode). If both traces agree, the
graph is rewritten node by node:

* every activation *call site* (module, function or method) becomes its own ``CenteredSoftplus`` — a module
  called at two sites becomes two modules (``relu`` and ``relu_1``); a functional call inside module ``a.b``
  becomes module ``a.b.relu`` (first free name), so names are deterministic;
* in-place activations are replaced by out-of-place ones and every later reader of the input is redirected
  to the new value (what the in-place op's aliasing meant);
* convs / linears get a spectral-norm parametrization on ``weight`` (same module, same path);
* BatchNorms become ``LipschitzBatchNorm`` at the same path (same state-dict keys, plus gamma);
* ops that void the guarantee are reported (never changed).

If a module cannot be traced (or its train and eval traces differ, e.g. auxiliary heads), it keeps its own
``forward`` and its children are converted one by one — the *module-level fallback*, always reported.
"""
from __future__ import annotations

import difflib
import operator
import re
from collections import Counter
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .._utils import modes_preserved, redirect_later_readers
from ..config import LCNNConfig
from ..errors import ConversionError
from ..nn import (CenteredSoftplus, LipschitzBatchNorm, conv_spectral_norm, is_lcnn_layer,
                  linear_spectral_norm)
from ..nn.batchnorm_act import LipschitzBatchNormAct
from .. import ops
from . import rules as R
from .adapters import adapter_for
from .report import ConversionReport, Converted, Fallback, Left
from .trace import call_owner, graph_module, is_leaf, trace_both_modes

_HARMLESS_LEAVES: tuple[type, ...] = (
    nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
    nn.ReplicationPad3d, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle, nn.Upsample,
    nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.Softsign,
)
_PLAIN_CONV_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)
_META_METHODS = {"size", "dim", "numel", "ndimension", "type", "__len__"}
_META_FUNCTIONS = {getattr, len}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _type_name(obj: Any) -> str:
    return type(obj).__name__ if isinstance(obj, nn.Module) else getattr(obj, "__name__", str(obj))


class Converter:
    """Converts one model with one config, filling one :class:`ConversionReport`."""

    def __init__(self, config: LCNNConfig, report: ConversionReport,
                 example_inputs: tuple[Any, ...] | None = None, dry_run: bool = False,
                 root_cls: type[fx.GraphModule] = fx.GraphModule) -> None:
        self.config = config
        self.root_cls = root_cls  # class of the GraphModule built for the root (prefix "")
        self.report = report
        self.example_inputs = example_inputs
        self.dry_run = dry_run
        self._skip_res = [(s, re.compile(s[3:])) for s in config.skip if s.startswith("re:")]
        self._skip_names = {s for s in config.skip if not s.startswith("re:")}
        self._skip_hits: set[str] = set()     # skip patterns that matched a call site
        self._seen_paths: set[str] = set()    # every call-site path the skip patterns were tried on
        _check_convert_types(config.convert_types)
        self._opaque_ids: set[int] = set()  # submodules kept untraced (converted module by module)
        # the family -> factory table (pattern -> replacement, not an if-chain)
        self._factories: dict[str, Callable[[nn.Module | None, str, fx.Node | None], nn.Module | None]] = {
            "relu": self._activation,
            "smooth": self._activation,
            "conv": self._conv,
            "linear": self._linear,
            "batchnorm": self._batchnorm,
            "batchnorm_act": self._batchnorm_act,
        }

    # ================================================================== entry point
    def convert(self, module: nn.Module, prefix: str = "") -> nn.Module:
        """Convert ``module`` (whose path in the user's model is ``prefix``); returns the converted module."""
        if is_lcnn_layer(module):  # already an LCNN layer (hand-built, or converted above): nothing to do
            return module
        rule = R.rule_for_module(module)
        if rule is not None:  # a bare layer (e.g. the model IS a conv, or a fallback child)
            return self._convert_leaf_module(module, rule, prefix)
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):  # containers without a forward of their own
            for name, child in list(module.named_children()):
                new = self.convert(child, _join(prefix, name))
                if new is not child:
                    setattr(module, name, new)
            return module
        if prefix and is_leaf(module):
            # a leaf the tracer never enters (dropout, pooling, norms we keep...): tracing it as a root would
            # bake its train-mode branch into a graph (e.g. dropout always on); keep it, report it if it voids
            self._convert_fused_act(module, prefix)
            self._report_leaf_module(module, prefix)
            return module
        opaque: dict[str, str] = {}  # submodule path -> why it is kept as an untraced leaf
        while True:
            g_train, reason, culprit = self._try_trace(module, prefix, opaque)
            if g_train is not None or culprit is None or culprit in opaque:
                break
            # trace around the offending submodule (a leaf), then convert that one module by module
            opaque[culprit] = reason
        if g_train is not None:
            # the user's module hierarchy (Sequential, blocks...) is kept, so that model.features[0] still works
            # and the state-dict keys are exactly the original ones
            gm = graph_module(module, g_train, cls=self.root_cls if not prefix else fx.GraphModule)
            self._opaque_ids = {id(gm.get_submodule(p)) for p in opaque}
            self._rewrite_graph(gm, prefix)
            for path, why in opaque.items():
                self._convert_children(gm.get_submodule(path), _join(prefix, path), why)
            return gm
        return self._convert_children(module, prefix, reason)

    def _try_trace(self, module: nn.Module, prefix: str,
                   opaque: dict[str, str]) -> tuple[fx.Graph | None, str, str | None]:
        """Trace in train and eval mode. Returns (train graph, "", None) when both traces agree, else
        (None, reason, culprit submodule path or None when the module's own forward is at fault)."""
        leaves = [module.get_submodule(p) for p in opaque]
        try:
            traced = trace_both_modes(module, leaves=leaves)
        except Exception as e:  # noqa: BLE001 - any tracing failure means fallback
            where, msg, culprit = _trace_failure(module, prefix, e)
            if not self.config.allow_fallback:
                raise ConversionError(
                    f"torch.fx cannot trace {where}: {msg}. Fix: make that forward traceable by torch.fx (no "
                    "data-dependent control flow), or pass allow_fallback=True to convert it module by module "
                    "(its own forward is then left as it is and reported).") from e
            return None, f"torch.fx cannot trace {where} ({msg})", culprit
        # where the traces differ only in constant booleans equal to the training flag (F.dropout(x, p,
        # training=self.training)), one graph whose flags read the owning module's `training` at run time
        for node, owner in traced.bound_flags:
            self.report.notes.append(
                f"'{_join(prefix, self._site_path(node))}' ({_site_name(node)}) reads "
                f"'{_join(prefix, owner) or '<root>'}'.training at run time (it follows the model's mode)")
        if traced.graph is None:
            culprit = _divergence(traced.comparison)
            why = ("its forward takes different paths in train and eval mode (auxiliary heads or a module "
                   "reading self.training)")
            if not self.config.allow_fallback:
                raise ConversionError(
                    f"cannot convert '{_join(prefix, culprit or '') or '<root>'}': {why}. Fix: pass "
                    "allow_fallback=True to convert it module by module.")
            return None, why, culprit
        return traced.graph, "", None

    # ================================================================== graph route
    def _rewrite_graph(self, gm: fx.GraphModule, prefix: str) -> None:
        graph = gm.graph
        modules = dict(gm.named_modules())
        if self.config.per_channel_beta:
            self._propagate_shapes(gm)
        sites = Counter(n.target for n in graph.nodes if n.op == "call_module")
        seen_sites: Counter[str] = Counter()
        order = {n: i for i, n in enumerate(graph.nodes)}
        tensorish = _tensor_nodes(graph)

        for node in list(graph.nodes):
            rule = R.match(node, modules)
            if rule is None:
                if node.op == "call_module" and id(modules[node.target]) not in self._opaque_ids:
                    self._convert_fused_act(modules[node.target], _join(prefix, node.target))
                self._report_voiding(node, modules, prefix, tensorish)
                continue
            site_path = self._site_path(node)
            if self._skipped(_join(prefix, site_path), modules.get(node.target) if node.op == "call_module"
                             else None):
                self._left(_join(prefix, site_path), rule.name, "skipped by config (skip / convert_types)",
                           voids=R.kept_voids(node, modules))
                continue
            inplace = R.is_inplace_call(node, rule, modules)
            if node.op == "call_module":
                target = node.target
                seen_sites[target] += 1
                module = modules[target]
                if rule.family in ("relu", "smooth", "batchnorm_act"):
                    # one module per call site: the first site keeps the path, later ones get a fresh name
                    name = target if seen_sites[target] == 1 else self._fresh_name(gm, f"{target}_{seen_sites[target] - 1}")
                    new = self._factories[rule.family](module, _join(prefix, name), node)
                    if new is None:
                        continue
                    self._install(gm, name, new)
                    if name != target:
                        node.target = name
                    if rule.family != "batchnorm_act" and inplace:
                        _redirect_inplace_readers(node, order)
                else:
                    if sites[target] > 1 and seen_sites[target] > 1:
                        continue  # shared layer: converted once, noted at its first site
                    if sites[target] > 1:
                        self.report.notes.append(
                            f"'{_join(prefix, target)}' ({type(module).__name__}) is called at {sites[target]} "
                            "call sites; it is converted once and shared (unshare it in your model if the sites "
                            "see different input shapes)")
                    new = self._factories[rule.family](module, _join(prefix, target), node)
                    if new is not None and new is not module:
                        self._install(gm, target, new)
            else:  # functional or method activation call site
                parent = call_owner(node)
                base = rule.name.split(".")[-1].rstrip("_")
                name = self._fresh_name(gm, _join(parent, base))
                new = self._factories[rule.family](None, _join(prefix, name), node)
                if new is None:
                    continue
                self._install(gm, name, new)
                with graph.inserting_after(node):
                    new_node = graph.call_module(name, (node.args[0],))
                new_node.meta = dict(node.meta)
                node.replace_all_uses_with(new_node)
                order[new_node] = order[node]
                graph.erase_node(node)
                if inplace:
                    _redirect_inplace_readers(new_node, order)
        if not self.dry_run:
            _out_of_place_consumers(gm, {n: i for i, n in enumerate(graph.nodes)})
        graph.lint()
        gm.recompile()

    def _convert_fused_act(self, module: nn.Module, path: str) -> None:
        """Norm+act leaves we keep (timm GroupNormAct, LayerNormAct...): convert their ``act`` child."""
        act = getattr(module, "act", None)
        if not isinstance(act, nn.Module) or self._skipped(_join(path, "act"), act):
            return
        rule = R.rule_for_module(act)
        if rule is not None and rule.family in ("relu", "smooth"):
            new = self._activation(act, _join(path, "act"), None)
            if new is not None:
                module.act = new

    def _propagate_shapes(self, gm: fx.GraphModule) -> None:
        if self.example_inputs is None:
            raise ConversionError("per_channel_beta=True needs example_inputs (the channel count of every "
                                  "activation call site comes from a forward pass). Fix: pass example_inputs=...")
        from torch.fx.passes.shape_prop import ShapeProp

        with modes_preserved(gm, training=False), torch.no_grad():
            ShapeProp(gm).propagate(*self.example_inputs)

    # ================================================================== module-level fallback
    def _convert_children(self, module: nn.Module, prefix: str, reason: str) -> nn.Module:
        self.report.fallbacks.append(Fallback(prefix, reason))
        if not prefix:
            self.report.traced = False
        self._left(prefix or "<root>", f"{type(module).__name__}.forward",
                   "not traced: ops in its own forward (functional activations, products, max...) are not "
                   "analysed and call sites of shared children are not unshared", voids=True)
        for name, child in list(module.named_children()):
            path = _join(prefix, name)
            if self._skipped(path, child):
                self._left(path, type(child).__name__, "skipped by config", voids=R.kept_voids(child))
                continue
            new = self.convert(child, path)
            if new is not child:
                setattr(module, name, new)
        return module

    def _convert_leaf_module(self, module: nn.Module, rule: R.Rule, path: str) -> nn.Module:
        if self._skipped(path, module):
            self._left(path, rule.name, "skipped by config", voids=R.kept_voids(module))
            return module
        new = self._factories[rule.family](module, path, None)
        return module if new is None else new

    # ================================================================== factories (family -> replacement)
    def _activation(self, module: nn.Module | None, path: str, node: fx.Node | None) -> nn.Module | None:
        original = _type_name(module) if module is not None else _site_name(node)
        family = R.rule_for_module(module).family if module is not None else R.match(node, {}).family  # type: ignore[union-attr,arg-type]
        if not self._wants_conversion(module, original, family):
            self._left(path, original, "smooth activation kept (smooth_activations='keep' or a per-type override); "
                       "its slope can exceed 1 and its curvature is not penalized",
                       voids=R.kept_voids(module if module is not None else node))
            return None
        channels = None
        if self.config.per_channel_beta:
            meta = node.meta.get("tensor_meta") if node is not None else None
            if meta is None or len(meta.shape) < 2:
                raise ConversionError(f"per_channel_beta: no channel count known for '{path}' ({original}); "
                                      "pass example_inputs or use per_channel_beta=False")
            channels = int(meta.shape[1])
        # an in-place activation (nn.ReLU(inplace=True), F.relu_, x.relu_()) stays in place: same aliasing as the
        # original, and ReLU-level memory (the centered softplus keeps only its output for backward)
        inplace = (getattr(module, "inplace", False) is True if module is not None
                   else node is not None and ops.is_inplace(node, {}))
        new = CenteredSoftplus(beta=self.config.beta0, num_channels=channels, inplace=inplace)
        self.report.converted.append(Converted(path, "activation", original, "CenteredSoftplus",
                                               node.name if node is not None else ""))
        return new

    def _conv(self, module: nn.Module, path: str, node: fx.Node | None) -> nn.Module | None:
        if is_lcnn_layer(module) or not self.config.spectral_norm_conv:
            return None
        original = type(module).__name__
        if type(module).forward not in _PLAIN_CONV_FORWARDS:
            # a conv subclass with its own forward (dynamic same padding, weight standardization...)
            adapter = adapter_for(module)
            if adapter is None:
                self._left(path, original, "conv subclass with its own forward: its operator is not known to be "
                           "the plain convolution, so it is not spectrally normalized", voids=True)
                return None
            if not self.dry_run:
                module = adapter(module)
        if not self.dry_run:
            conv_spectral_norm(module, n_power_iterations=self.config.power_iterations,
                               warmup_iterations=self.config.warmup_iterations)
        self.report.converted.append(Converted(path, "conv", original, "ConvSpectralNorm",
                                               node.name if node is not None else ""))
        return module

    def _linear(self, module: nn.Module, path: str, node: fx.Node | None) -> nn.Module | None:
        if is_lcnn_layer(module) or not self.config.spectral_norm_linear:
            return None
        if not self.dry_run:
            linear_spectral_norm(module)
        self.report.converted.append(Converted(path, "linear", type(module).__name__, "spectral_norm",
                                               node.name if node is not None else ""))
        return module

    def _batchnorm(self, module: nn.Module, path: str, node: fx.Node | None) -> nn.Module | None:
        if not self.config.lipschitz_batchnorm:
            self._left(path, type(module).__name__, "lipschitz_batchnorm=False", voids=R.kept_voids(module))
            return None
        new = LipschitzBatchNorm.from_batchnorm(module, gamma=self.config.gamma0)
        self.report.converted.append(Converted(path, "batchnorm", type(module).__name__, "LipschitzBatchNorm",
                                               node.name if node is not None else ""))
        return new

    def _batchnorm_act(self, module: nn.Module, path: str, node: fx.Node | None) -> nn.Module | None:
        act = getattr(module, "act", None) or nn.Identity()
        drop = getattr(module, "drop", None) or nn.Identity()
        act_rule = R.rule_for_module(act)
        if act_rule is not None and act_rule.family in ("relu", "smooth"):
            act = self._activation(act, _join(path, "act"), None) or act
        elif not isinstance(act, nn.Identity):
            self._left(_join(path, "act"), type(act).__name__, "activation of a fused BN+act kept (no rule)",
                       voids=R.kept_voids(act))
        if not self.config.lipschitz_batchnorm:
            self._left(path, type(module).__name__, "lipschitz_batchnorm=False", voids=R.kept_voids(module))
            if act is not getattr(module, "act", None) and not self.dry_run:
                module.act = act  # the BN stays, its activation is converted as the report says
            return None
        new = LipschitzBatchNormAct.from_batchnorm_act(module, act=act, drop=drop, gamma=self.config.gamma0)
        self.report.converted.append(Converted(path, "batchnorm", type(module).__name__,
                                               "LipschitzBatchNormAct", node.name if node is not None else ""))
        return new

    # ================================================================== policy
    def _wants_conversion(self, module: nn.Module | None, original: str, family: str) -> bool:
        overrides = self.config.convert_types
        for key in ((type(module) if module is not None else None), original):
            if key is not None and key in overrides:
                return overrides[key] == "convert"
        if family == "relu":
            return True
        return self.config.smooth_activations == "convert"

    def _skipped(self, path: str, module: nn.Module | None) -> bool:
        self._seen_paths.add(path)
        hits = ({path} & self._skip_names) | {s for s, r in self._skip_res if r.fullmatch(path)}
        if hits:
            self._skip_hits |= hits
            return True
        if module is not None and self.config.convert_types.get(type(module)) == "keep":
            rule = R.rule_for_module(module)  # (kept activations are reported by _activation instead)
            return rule is not None and rule.family not in ("relu", "smooth")
        return False

    def unmatched_skips(self, model: nn.Module | None = None) -> list[tuple[str, list[str]]]:
        """The skip patterns that matched no call site, each with the closest paths (of call sites and of
        ``model``'s modules), closest first."""
        paths = set(self._seen_paths)
        if model is not None:
            paths |= {n for n, _ in model.named_modules() if n}
        out = []
        for pattern in self.config.skip:
            if pattern not in self._skip_hits:
                probe = pattern[3:] if pattern.startswith("re:") else pattern
                out.append((pattern, difflib.get_close_matches(probe, sorted(paths), n=3, cutoff=0.5)))
        return out

    # ================================================================== reporting
    def _left(self, path: str, op: str, reason: str, voids: bool) -> None:
        self.report.left.append(Left(path, op, reason, voids))

    def _report_leaf_module(self, m: nn.Module, path: str) -> None:
        """Report a module that stays as it is (not traced into, not converted) as the op registry sees it (the
        verdict the bound uses): what voids the guarantee -- also inside an unregistered module, which is
        traced and walked, or is opaque -- and kept bounded activations (gates)."""
        if id(m) in self._opaque_ids:
            return None
        voids = ops.module_voids(m, path)
        for p, op, why in voids:
            self._left(p, op, why, voids=True)
        spec = ops.spec_for_module(m)
        if not voids and spec is not None and spec.family is ops.Family.GATE:
            self._left(path, type(m).__name__, "gating/bounded activation kept (smooth, slope <= 1)", voids=False)
        return None

    def _report_voiding(self, node: fx.Node, modules: dict[str, nn.Module], prefix: str,
                        tensorish: set[fx.Node]) -> None:
        """Report a node left as it is, as the op registry sees it (the verdict the bound uses): voiding ops,
        unknown ops ("unknown op: not analysed"), kept gates."""
        if node not in tensorish or node.op not in ("call_module", "call_function", "call_method"):
            return None   # an input, or a value that does not depend on the input (sizes, parameters)
        path = _join(prefix, self._site_path(node))
        if node.op == "call_module":
            return self._report_leaf_module(modules[node.target], path)

        def dependent(a: Any) -> bool:   # nodes inserted by this rewrite (converted call sites) are not in tensorish
            return isinstance(a, fx.Node) and (a in tensorish or (a.op == "call_module" and any(
                dependent(b) for b in a.all_input_nodes)))

        v = ops.verdict(node, modules, dependent=dependent)
        if v.reason is not None:
            return self._left(path, _site_name(node), v.reason, voids=True)
        if v.spec is not None and v.spec.family is ops.Family.GATE:
            return self._left(path, _site_name(node), "gating/bounded activation kept (smooth, slope <= 1)",
                              voids=False)
        return None

    # ================================================================== naming helpers
    def _site_path(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return str(node.target)
        return _join(call_owner(node), node.name)

    @staticmethod
    def _fresh_name(gm: fx.GraphModule, name: str) -> str:
        taken = {n for n, _ in gm.named_modules()} | {n for n, _ in gm.named_parameters()} | \
                {n for n, _ in gm.named_buffers()}

        def free(candidate: str) -> bool:
            if candidate in taken:
                return False
            parent, _, leaf = candidate.rpartition(".")
            try:
                owner = gm.get_submodule(parent) if parent else gm
            except AttributeError:
                return True
            return not hasattr(owner, leaf)

        if free(name):
            return name
        base = re.sub(r"_\d+$", "", name)
        k = 1
        while not free(f"{base}_{k}"):
            k += 1
        return f"{base}_{k}"

    @staticmethod
    def _install(gm: fx.GraphModule, name: str, module: nn.Module) -> None:
        parent, _, leaf = name.rpartition(".")
        if parent:
            try:
                owner = gm.get_submodule(parent)
            except AttributeError:
                if not gm.add_submodule(name, module):
                    raise ConversionError(f"cannot install converted module at '{name}'") from None
                return
        else:
            owner = gm
        setattr(owner, leaf, module)


def _known_override_keys() -> tuple[set[type], set[str]]:
    """The module types and the names a ``convert_types`` override can refer to (those some rule matches)."""
    types: set[type] = set()
    names: set[str] = set()
    for rule in R.rules():
        names.add(rule.name)
        for t in rule.module_types:
            types.add(t)
            names.add(t.__name__)
        names.update(_function_name(fn) for fn in rule.functions)
        names.update(f"Tensor.{m}" for m in rule.methods)
    return types, names


def _check_convert_types(overrides: Any) -> None:
    """Every ``convert_types`` key must be a type or a name some conversion rule matches (else it would be a
    silent no-op: a typo, or a custom activation lcnnify does not know)."""
    if not overrides:
        return
    types, names = _known_override_keys()
    for key in overrides:
        if isinstance(key, type):
            if any(issubclass(key, t) for t in types):
                continue
            what = f"{key.__module__}.{key.__qualname__}"
            known = sorted({t.__name__ for t in types})
        elif isinstance(key, str):
            if key in names:
                continue
            what, known = repr(key), sorted(names)
            lower = {n.lower(): n for n in known}
            close = [lower[c] for c in difflib.get_close_matches(key.lower(), list(lower), n=3, cutoff=0.5)]
            if close:
                known = close
        else:
            raise ConversionError(f"convert_types keys must be module types or names, got {key!r}")
        register = ("; to convert a custom activation, register it first: lcnnify.ops.register_activation("
                    f"{getattr(key, '__name__', key)}, slope=..., curvature=..., convert='policy')") \
            if _has_registry() else ""
        raise ConversionError(
            f"convert_types: no conversion rule matches {what}, so the override would be silently ignored. "
            f"Fix: use a type (or subclass) or name lcnnify converts, e.g. {', '.join(known[:12])}{register}.")


def _has_registry() -> bool:
    try:
        from .. import ops  # the op registry, where it exists
    except ImportError:
        return False
    return hasattr(ops, "register_activation")


def _site_name(node: fx.Node | None) -> str:
    if node is None:
        return "?"
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return _function_name(node.target)


def _function_name(t: Any) -> str:
    """``F.gelu``, ``torch.relu``, ``operator.mul``...: how the report and ``convert_types`` name a function."""
    mod = getattr(t, "__module__", "") or ""
    name = getattr(t, "__name__", str(t))
    if mod.startswith("torch.nn.functional") or getattr(F, name, None) is t:
        return f"F.{name}"
    if mod.startswith("torch") or mod == "" or mod.startswith("_operator"):
        return f"torch.{name}" if not mod.startswith("_operator") else f"operator.{name}"
    return f"{mod}.{name}"


def _trace_failure(module: nn.Module, prefix: str, exc: BaseException) -> tuple[str, str, str | None]:
    """(where it failed, the error in one line, the culprit submodule path or None) of a tracing error."""
    culprit = _culprit(module, exc)
    where = (f"the forward of '{_join(prefix, culprit[0])}' ({culprit[1]})" if culprit else
             f"the forward of '{prefix or '<root>'}' ({type(module).__name__})")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return where, f"{type(exc).__name__}: {first[:300]}", culprit[0] if culprit else None


def _culprit(module: nn.Module, exc: BaseException) -> tuple[str, str] | None:
    """The innermost submodule of ``module`` whose forward was running when tracing raised ``exc``."""
    names = {id(m): n for n, m in module.named_modules()}
    found = None
    tb = exc.__traceback__
    while tb is not None:
        obj = tb.tb_frame.f_locals.get("self")
        if obj is not None and id(obj) in names and names[id(obj)]:
            found = (names[id(obj)], type(obj).__name__)
        tb = tb.tb_next
    return found


def _divergence(cmp: Any) -> str | None:
    """The innermost submodule (path) common to the first nodes where two traces differ, if any."""
    if cmp.first_difference is None or cmp.first_difference >= len(cmp.nodes):
        return None
    a, b = cmp.nodes[cmp.first_difference]
    sa = list((a.meta.get("nn_module_stack") or {}).values())
    sb = list((b.meta.get("nn_module_stack") or {}).values())
    common = None
    for x, y in zip(sa, sb):
        if x[0] != y[0]:
            break
        common = x[0]
    return common or None


def _tensor_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value is a tensor that depends on the input (not shapes/sizes, not parameters)."""
    out: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op == "placeholder":
            out.add(n)
            continue
        if n.op in ("get_attr", "output"):
            continue
        if (n.op == "call_method" and n.target in _META_METHODS) or (
                n.op == "call_function" and n.target in _META_FUNCTIONS):
            continue
        if n.op == "call_function" and n.target is operator.getitem and n.args[0] not in out:
            continue
        if any(a in out for a in n.all_input_nodes):
            out.add(n)
    return out


def _is_product(node: fx.Node, tensorish: set[fx.Node]) -> bool:
    args = [a for a in node.args if isinstance(a, fx.Node)]
    return sum(a in tensorish for a in args) >= 2


def _redirect_inplace_readers(new_node: fx.Node, order: dict[fx.Node, int]) -> None:
    """After ``x.relu_()`` became ``y = act(x)``, readers of ``x`` placed after the call must read ``y``."""
    src = new_node.args[0]
    if isinstance(src, fx.Node):
        redirect_later_readers(src, new_node, order)


def _out_of_place_consumers(gm: fx.GraphModule, order: dict[fx.Node, int]) -> None:
    """A centered softplus keeps its OUTPUT for backward (as ReLU does), so an in-place op applied to that output
    afterwards (``Hardswish(inplace=True)`` then ``Dropout(inplace=True)``; the original activation kept its
    input and never noticed) would break backward. Such consumers run out of place instead; later readers of
    the activation's output are redirected to the consumer's result, which is what the aliasing meant."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(str(node.target)), CenteredSoftplus):
            continue
        for user in list(node.users):
            module_inplace = user.op == "call_module" and getattr(modules[str(user.target)], "inplace", None) is True
            if not user.args or user.args[0] is not node or not (module_inplace or ops.is_inplace(user, modules)):
                continue
            if module_inplace:
                modules[str(user.target)].inplace = False
            elif user.op == "call_function" and user.kwargs.get("inplace") is True:
                user.kwargs = {**user.kwargs, "inplace": False}
            elif user.op == "call_method" and str(user.target).endswith("_") and \
                    hasattr(torch.Tensor, str(user.target)[:-1]):
                user.target = str(user.target)[:-1]
            else:
                continue  # e.g. operator.iadd: left as it is (rare after an activation)
            redirect_later_readers(node, user, order)
