r"""The bound propagation: an ``fx.Interpreter`` that runs the graph once and, node by node, bounds the map
input -> node (paper §3.2).

Every input-dependent node n gets (L_n, K_n), bounds on the Lipschitz constant and on the norm of the Hessian
tensor of the map input -> value of n, written to ``node.meta["lcnnify_bound"]`` (and to
``Bound.per_node``). The input is (1, 0). A node computing a map h of ONE input node g with ||Dh|| <= a and
||D^2 h|| <= k gets, by the chain rule D^2(h o g)[u, v] = D^2h[Dg u, Dg v] + Dh D^2g[u, v]:

    L' = a L,   K' = a K + k L^2.

What each op is, and whether it voids the bound, comes from the op registry (:mod:`lcnnify.ops`); its
``propagate`` field names the rule applied here:

* ``activation``: elementwise phi with |phi'| <= slope, |phi''| <= curvature: a = slope, k = curvature
  (for |phi''(g) (Dg u)(Dg v)| <= c |Dg u|_2 |Dg v|_inf);
* ``conv`` / ``linear`` / ``batchnorm`` / ``f_*``: linear maps (k = 0) with their operator norm (certified,
  :mod:`lcnnify.bounds.operator_norms`); conv/BN biases are constants and do not matter;
* ``nonneg``: pools, reshapes, slicing, padding, means, upsampling: non-negative linear maps, Schur's test;
* ``add`` / ``sub``: (sum |c_i| L_i, sum |c_i| K_i) over the operands, wherever they are passed (positional
  or keyword) and with ``alpha``: torch.add(h, y, alpha=3) = h + 3 y; an operand broadcast to a larger
  shape is a duplication, norm sqrt(numel_out / numel_in);
* ``cat``: the map x -> (f(x), g(x)) has ||D(f,g)u||^2 = ||Df u||^2 + ||Dg u||^2, so (sqrt(sum L_i^2),
  sqrt(sum K_i^2));
* ``scale`` / ``matmul``: a product with a constant is linear (its largest magnitude, or ||W||_2); a product
  of two input-dependent tensors is infinite (the registry voids it);
* ``maxpool``: Lipschitz with a = sqrt(m), m the largest number of windows an input element lies in
  (|max_w x - max_w y| <= max_{i in w} |x_i - y_i|), and K = inf;
* ``dropout`` (eval: the identity), ``identity``, ``constant`` (sizes, ``zeros_like``: not input-dependent);
* ``infinite``: L = K = inf (voiding ops without a finite Lipschitz constant, unknown ops).

A submodule the registry does not know is traced (lcnnify's tracer, eval mode) and analysed recursively;
one that cannot be traced voids the bound.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn

from .. import ops
from ..nn.lipschitz_batchnorm import LipschitzBatchNorm
from ..nn.conv_operator import ConvGeometry
from ..nn.spectral_norm import find_conv_spectral_norm
from .operator_norms import (MARGIN, conv_norm_bound, flat_tensors, matrix_norm, matrix_power_estimate,
                             nonneg_linear_norm)

__all__ = ["BoundInterpreter", "Context", "META_KEY", "static_reasons"]

INF = math.inf
META_KEY = "lcnnify_bound"


def _mul(a: float, b: float) -> float:
    """a * b with 0 * inf = 0: an exact zero factor kills an unknown one."""
    return 0.0 if a == 0.0 or b == 0.0 else a * b


def _compose(a: float, k: float, state: tuple[float, float]) -> tuple[float, float]:
    L, K = state
    return _mul(a, L), _mul(a, K) + _mul(k, _mul(L, L))


def _fmt(x: float) -> str:
    return f"{x:.4g}"


class Context:
    """Options and results shared by the (nested) interpreters of one :func:`lcnnify.bound` call."""

    def __init__(self, certify: bool, dense_limit: int, rtol: float, power_iterations: int,
                 progress: Any = None) -> None:
        self.certify = certify
        self.dense_limit = dense_limit
        self.rtol = rtol
        self.power_iterations = power_iterations
        self.progress = progress
        self.reasons: list[str] = []
        self.notes: list[str] = []
        self.per_node: dict[str, tuple[float, float]] = {}
        self.chain: list[tuple[float, float, int]] = []   # (Lipschitz factor, normalized curvature, width)
        self.estimated = False


class _Void(Exception):
    """The op cannot be analysed: its value is (inf, inf) and the bound is not certified."""


class ForwardFailed(Exception):
    """The graph could not be run on the example input (wrong input shape...)."""


def describe(node: fx.Node, modules: dict[str, nn.Module], prefix: str = "") -> str:
    """``name [target: Type]`` / ``name [Tensor.method]`` / ``name [function]`` of a node."""
    name = f"{prefix}{node.name}"
    if node.op == "call_module":
        m = modules.get(str(node.target))
        return f"{name} [{node.target}: {type(m).__name__}]"
    if node.op == "call_method":
        return f"{name} [Tensor.{node.target}]"
    if node.op == "call_function":
        return f"{name} [{getattr(node.target, '__name__', str(node.target))}]"
    return name


def static_reasons(gm: fx.GraphModule, prefix: str = "", depth: int = 0) -> list[str]:
    """Why the bound of ``gm`` is void, from the op registry alone (no forward, no operator norm): the nodes
    whose op voids the guarantee (:func:`lcnnify.ops.void_sites`, the walk the report makes), each described
    as the propagation describes it. Empty when nothing voids."""
    return [f"{describe(nodes[-1], modules, prefix + ''.join(f'{n.name}/' for n in nodes[:-1]))}: {why}"
            for nodes, modules, _, why in ops.void_sites(gm, depth)]


class BoundInterpreter(fx.Interpreter):
    """Runs ``gm`` once (no grad; the caller puts the model in eval mode) and propagates (L, K) bounds."""

    def __init__(self, gm: fx.GraphModule, ctx: Context, prefix: str = "", depth: int = 0) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.ctx = ctx
        self.prefix = prefix
        self.depth = depth
        self.modules = dict(gm.named_modules())
        self.vals: dict[fx.Node, Any] = {}
        self.state: dict[fx.Node, tuple[float, float]] = {}
        self.in_states: Sequence[tuple[float, float] | None] = ()
        self.out_state: tuple[float, float] | None = None

    # ---------------------------------------------------------------- driver
    def analyse(self, inputs: Sequence[Any], in_states: Sequence[tuple[float, float] | None]
                ) -> tuple[float, float] | None:
        """(L, K) of the output w.r.t. the inputs whose state is given (None: the output is a constant)."""
        self.in_states = in_states
        try:
            with torch.no_grad():
                self.run(*inputs)
        except ForwardFailed:
            raise
        except _ForwardError as e:
            raise ForwardFailed(str(e)) from e
        return self.out_state

    def run_node(self, n: fx.Node) -> Any:
        try:
            val = super().run_node(n)
        except Exception as e:  # noqa: BLE001 - the model itself failed on this input
            raise _ForwardError(f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}") from e
        self.vals[n] = val
        if n.op == "placeholder":
            i = sum(1 for p in self.vals if p.op == "placeholder") - 1
            st = self.in_states[i] if i < len(self.in_states) else None
            if st is not None:
                self._record(n, st)
        elif n.op == "output":
            self.out_state = self._output(n)
        elif n.op != "get_attr":
            self._propagate(n)
        if self.ctx.progress is not None and self.depth == 0:
            self.ctx.progress.update(1)
        return val

    def _record(self, n: fx.Node, st: tuple[float, float]) -> None:
        self.state[n] = st
        self.ctx.per_node[self.prefix + n.name] = st
        n.meta[META_KEY] = st

    def _propagate(self, n: fx.Node) -> None:
        deps = [a for a in n.all_input_nodes if a in self.state]
        if not deps or not flat_tensors(self.vals.get(n)):
            return  # a constant (parameters, shapes, sizes...)
        v = ops.verdict(n, self.modules, dependent=lambda a: a in self.state, value=self._value)
        try:
            if n.op == "call_module" and v.spec is None:
                st = self._submodule(n)
            else:
                if v.reason is not None:
                    self._void(n, v.reason)
                if v.spec is None:
                    raise _Void(None)
                call = ops.node_call(n, self.modules, value=self._value, dependent=lambda a: a in self.state,
                                     spec=v.spec)
                st = getattr(self, f"_p_{v.spec.propagate}")(n, call)
        except _Void as e:
            if e.args and e.args[0]:
                self._void(n, str(e.args[0]))
            self.ctx.chain.append((INF, INF, 1))
            st = (INF, INF)
        except Exception as e:  # noqa: BLE001 - an analysis failure must not pass as a bound
            msg = (str(e).strip().splitlines() or [""])[0][:200]
            self._void(n, f"not analysed (analysis failed: {type(e).__name__}: {msg})")
            self.ctx.chain.append((INF, INF, 1))
            st = (INF, INF)
        if st is None:
            return
        self._record(n, st)
        src = ops.inplace_source(n, self.modules)
        if src is not None and src in self.state:
            self.state[src] = st   # later readers of the mutated tensor see the new value

    def _value(self, a: Any) -> Any:
        return self.vals.get(a, a) if isinstance(a, fx.Node) else a

    def _output(self, node: fx.Node) -> tuple[float, float] | None:
        outs: list[fx.Node] = []
        fx.node.map_arg(node.args[0], lambda a: outs.append(a) or a)
        outs = [a for a in outs if a in self.state]
        if not outs:
            return None
        if len(outs) == 1:
            return self.state[outs[0]]
        self.ctx.notes.append(f"{self.prefix or 'model'}: several outputs; the bound is for all of them "
                              f"concatenated")
        return (math.sqrt(sum(self.state[o][0] ** 2 for o in outs)),
                math.sqrt(sum(self.state[o][1] ** 2 for o in outs)))

    def _void(self, node: fx.Node, why: str) -> None:
        self.ctx.reasons.append(f"{describe(node, self.modules, self.prefix)}: {why}")

    def _width(self, node: fx.Node) -> int:
        ts = flat_tensors(self.vals.get(node))
        return int(sum(t.numel() for t in ts)) if ts else 1

    def _apply(self, node: fx.Node, src: tuple[float, float], locals_: Iterable[tuple[float, float, float]]
               ) -> tuple[float, float]:
        """Compose single-input local maps (a, k, normalized curvature) in order."""
        st = src
        width = self._width(node)
        for a, k, nc in locals_:
            st = _compose(a, k, st)
            self.ctx.chain.append((a, nc, width))
        return st

    def _src(self, node: fx.Node, call: ops.Call) -> fx.Node:
        """The one input-dependent operand of a single-input op."""
        deps = call.dependent_operands()
        if node.op == "call_module":
            if node.kwargs or any(a is not node.args[0] for a in deps) or not node.args:
                raise _Void("module called with an input-dependent argument other than its input")
            return node.args[0]
        if len(set(deps)) == 1:
            return deps[0]
        first = node.args[0] if node.args else None
        if node.op == "call_method" and str(node.target) in ops._SHAPE_ONLY_SECOND and first in deps:
            return first
        raise _Void("several input-dependent operands (product or unknown combination): not analysed")

    # ---------------------------------------------------------------- rules (OpSpec.propagate)
    def _p_infinite(self, node: fx.Node, call: ops.Call) -> tuple[float, float]:
        raise _Void(None)

    def _p_constant(self, node: fx.Node, call: ops.Call) -> None:
        return None

    def _p_identity(self, node: fx.Node, call: ops.Call) -> tuple[float, float]:
        return self.state[self._src(node, call)]

    def _p_activation(self, node: fx.Node, call: ops.Call) -> tuple[float, float]:
        src = self._src(node, call)
        c = call.spec.constants_for(call)  # type: ignore[union-attr]
        return self._apply(node, self.state[src], [(c.slope, c.curvature, c.normalized_curvature)])

    def _p_dropout(self, node: fx.Node, call: ops.Call) -> tuple[float, float]:
        if call.module is not None and call.module.training:
            raise _Void("dropout in training mode")
        return self.state[self._src(node, call)]

    def _p_f_dropout(self, node: fx.Node, call: ops.Call) -> tuple[float, float]:
        src = self._src(node, call)
        if not call.get("training", 2, True):
            return self.state[src]
        p = float(call.get("p", 1, 0.5))
        self.ctx.notes.append(f"{self.prefix}{node.name}: functional dropout with training=True in the graph: "
                              f"bounded by its largest scale 1/(1-p)")
        return self._apply(node, self.state[src], [(1.0 / (1.0 - p) if p < 1 else 0.0, 0.0, 0.0)])

    def _p_add(self, node: fx.Node, call: ops.Call, sign: float = 1.0) -> tuple[float, float]:
        out_numel = self._width(node)
        alpha = call.get("alpha", 2, 1.0)
        coefs = {"input": 1.0, "other": abs(float(alpha))}
        L = K = 0.0
        seen: list[Any] = []
        for name, idx in (("input", 0), ("other", 1)):
            a = call.raw(name, idx)
            seen.append(a)
            if isinstance(a, fx.Node) and a in self.state:
                f = coefs[name] * math.sqrt(out_numel / max(1, self._width(a)))
                L += _mul(f, self.state[a][0])
                K += _mul(f, self.state[a][1])
        if any(a in self.state for a in call.dependent_operands() if not any(a is s for s in seen)):
            raise _Void("add / sub with an input-dependent argument other than its two operands")
        return L, K

    def _p_sub(self, node: fx.Node, call: ops.Call) -> tuple[float, float]:
        return self._p_add(node, call)

    def _p_neg(self, node: fx.Node, call: ops.Call) -> tuple[float, float]:
        return self._apply(node, self.state[self._src(node, call)], [(1.0, 0.0, 0.0)])

    def _p_cat(self, node: fx.Node, call: ops.Call) -> tuple[float, float]:
        items = call.raw("tensors", 0)
        items = list(items) if isinstance(items, (list, tuple)) else [items]
        deps = [i for i in items if isinstance(i, fx.Node) and i in self.state]
        if len(deps) != len(call.dependent_operands()):
            raise _Void("concatenation with an input-dependent argument other than its tensors")
        return (math.sqrt(sum(self.state[i][0] ** 2 for i in deps)),
                math.sqrt(sum(self.state[i][1] ** 2 for i in deps)))

    def _p_scale(self, node: fx.Node, call: ops.Call) -> tuple[float, float]:
        deps = call.dependent_operands()
        if len(set(deps)) > 1 or call.spec.void_reason(call) is not None:  # type: ignore[union-attr]
            raise _Void(None)
        div = call.spec.name == "div"  # type: ignore[union-attr]
        x = deps[0]
        other_name, other_idx = ("other", 1) if call.raw("input", 0) is x else ("input", 0)
        if div and other_name == "input":
            raise _Void(None)
        cval = call.get(other_name, other_idx, 1.0)
        if isinstance(cval, Tensor):
            cabs = cval.detach().abs().to(torch.float64)
            if div:
                mag = INF if not cabs.numel() or float(cabs.min()) == 0.0 else 1.0 / float(cabs.min())
            else:
                mag = float(cabs.max()) if cabs.numel() else 0.0
        else:
            mag = abs(float(cval))
            mag = (INF if mag == 0.0 else 1.0 / mag) if div else mag
        a = mag * math.sqrt(self._width(node) / max(1, self._width(x)))
        return self._apply(node, self.state[x], [(a, 0.0, 0.0)])

    def _p_matmul(self, node: fx.Node, call: ops.Call) -> tuple[float, float]:
        deps = call.dependent_operands()
        if len(set(deps)) != 1 or call.spec.void_reason(call) is not None:  # type: ignore[union-attr]
            raise _Void(None)
        x = deps[0]
        const = call.get("other", 1) if call.raw("input", 0) is x else call.get("input", 0)
        return self._apply(node, self.state[x], [(self._matrix(const), 0.0, 0.0)])

    def _p_nonneg(self, node: fx.Node, call: ops.Call) -> tuple[float, float]:
        """A non-negative linear map of ``src``: norm by Schur's test / dense Jacobian."""
        src = self._src(node, call)
        val = self.vals[src]
        if not isinstance(val, Tensor):   # getitem / indexing of a tuple of tensors: a projection
            if node.op == "call_function" and node.target is __import__("operator").getitem:
                return self._apply(node, self.state[src], [(1.0, 0.0, 0.0)])
            raise _Void("op on a container of tensors: not analysed")
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), self._value)
        pos_args = [i for i, a in enumerate(node.args) if a is src]
        pos_kwargs = [k for k, a in node.kwargs.items() if a is src]
        if node.op == "call_module":
            mod = self.modules[str(node.target)]
            fn: Callable[[Tensor], Any] = lambda x: mod(x)  # noqa: E731
        elif node.op == "call_method":
            name = str(node.target)

            def fn(x: Tensor) -> Any:
                a = _replace(args, pos_args, x)
                return getattr(a[0], name)(*a[1:], **_replace(kwargs, pos_kwargs, x))
        else:
            target = node.target

            def fn(x: Tensor) -> Any:
                return target(*_replace(args, pos_args, x), **_replace(kwargs, pos_kwargs, x))
        a = nonneg_linear_norm(fn, val)
        return self._apply(node, self.state[src], [(a, 0.0, 0.0)])

    def _p_linear(self, node: fx.Node, call: ops.Call) -> tuple[float, float]:
        src = self._src(node, call)
        return self._apply(node, self.state[src], [(self._matrix(call.module.weight), 0.0, 0.0)])  # type: ignore

    def _p_f_linear(self, node: fx.Node, call: ops.Call) -> tuple[float, float]:
        if not call.is_dependent("input", 0):
            raise _Void("linear map with an input-dependent weight")
        src = call.raw("input", 0)
        return self._apply(node, self.state[src], [(self._matrix(call.get("weight", 1)), 0.0, 0.0)])

    def _matrix(self, w: Any) -> float:
        if not isinstance(w, Tensor) or w.dim() != 2:
            raise _Void("linear map with a weight that is not a matrix: not analysed")
        if not self.ctx.certify and min(w.shape) > 512:
            self.ctx.estimated = True
            return matrix_power_estimate(w, self.ctx.power_iterations)
        return matrix_norm(w)

    def _p_conv(self, node: fx.Node, call: ops.Call) -> tuple[float, float]:
        src = self._src(node, call)
        m = call.module
        shape = tuple(self.vals[src].shape[1:])
        sn = find_conv_spectral_norm(m)  # type: ignore[arg-type]
        if sn is not None:
            if sn.input_shape is None:
                self._void(node, "spectrally normalized conv that has not run yet: its weight is not normalized "
                                 "(the first forward will normalize it); the bound is for the current weight")
            elif tuple(sn.input_shape) != shape:
                self._void(node, f"sigma refers to input shape {tuple(sn.input_shape)} but the conv sees {shape}: "
                                 f"a forward at this shape re-normalizes it; the bound is for the current weight")
        geometry = ConvGeometry.from_conv(m)  # type: ignore[arg-type]
        if ops.dynamic_same_padding(m) and not geometry.dynamic_same:   # (a parametrized Conv2dSame)
            geometry = dataclasses.replace(geometry, dynamic_same=True)   # resolved for the input shape below
        v0 = sn.v if sn is not None and sn.v.numel() else None
        val = self._conv_norm(node, m.weight, geometry, shape, v0)  # type: ignore[union-attr]
        return self._apply(node, self.state[src], [(val, 0.0, 0.0)])

    def _conv_norm(self, node: fx.Node, w: Tensor, geometry: ConvGeometry, shape: tuple[int, ...],
                   v0: Tensor | None = None) -> float:
        if self.ctx.progress is not None:
            self.ctx.progress.set_postfix_str(f"{self.prefix}{node.name}: conv norm on {shape}", refresh=True)
        val, how = conv_norm_bound(w, geometry, shape, certify=self.ctx.certify, dense_limit=self.ctx.dense_limit,
                                   rtol=self.ctx.rtol, power_iterations=self.ctx.power_iterations, v0=v0)
        if not self.ctx.certify:
            self.ctx.estimated = True
        elif "above the estimate" in how:
            self.ctx.notes.append(f"{self.prefix}{node.name}: {how}")
        return val

    def _p_f_conv(self, node: fx.Node, call: ops.Call) -> tuple[float, float]:
        w = call.get("weight", 1)
        if not isinstance(w, Tensor) or not call.is_dependent("input", 0):
            raise _Void("convolution with an input-dependent or non-tensor weight")
        src = call.raw("input", 0)
        geometry = ConvGeometry.from_weight(tuple(w.shape), stride=call.get("stride", 3, 1),
                                            padding=call.get("padding", 4, 0), dilation=call.get("dilation", 5, 1),
                                            groups=int(call.get("groups", 6, 1)))
        val = self._conv_norm(node, w, geometry, tuple(self.vals[src].shape[1:]))
        return self._apply(node, self.state[src], [(val, 0.0, 0.0)])

    def _p_f_batchnorm(self, node: fx.Node, call: ops.Call) -> tuple[float, float]:
        if not call.is_dependent("input", 0) or len(call.dependent_operands()) > 1:
            raise _Void("batch norm with input-dependent statistics or weights")
        rv = call.get("running_var", 2)
        if call.get("training", 5, False) or not isinstance(rv, Tensor):
            raise _Void("batch norm with batch statistics: data-dependent normalization")
        gain = _bn_gain(call.get("weight", 3), rv, float(call.get("eps", 7, 1e-5)))
        return self._apply(node, self.state[call.raw("input", 0)], [(gain * (1.0 + MARGIN), 0.0, 0.0)])

    def _p_batchnorm(self, node: fx.Node, call: ops.Call) -> tuple[float, float]:
        src = self._src(node, call)
        m = call.module
        if isinstance(m, LipschitzBatchNorm):
            rv = m.running_var
            if rv is None or (m.training and not getattr(m, "frozen", False)):
                raise _Void("batch statistics (no running statistics or training mode): data-dependent "
                            "normalization")
            gain = min(_bn_gain(m.weight, rv, m.eps), float(m.gamma.detach().to(torch.float64)))
        else:
            rv = getattr(m, "running_var", None)
            if rv is None or (m.training and isinstance(m, nn.modules.batchnorm._BatchNorm)):  # type: ignore
                raise _Void("BatchNorm with batch statistics: data-dependent normalization")
            gain = _bn_gain(getattr(m, "weight", None), rv, float(m.eps))  # type: ignore[union-attr]
        locals_ = [(gain * (1.0 + MARGIN), 0.0, 0.0)]
        drop = getattr(m, "drop", None)
        if isinstance(drop, nn.Module) and drop.training and not isinstance(drop, nn.Identity):
            raise _Void("fused BN drop in training mode")
        act = getattr(m, "act", None)
        if isinstance(act, nn.Module):
            c = ops.activation_constants(act)      # the registry voided unknown / kinked ones already
            locals_.append((c.slope, c.curvature, c.normalized_curvature))
        return self._apply(node, self.state[src], locals_)

    def _p_maxpool(self, node: fx.Node, call: ops.Call) -> tuple[float, float]:
        src = self._src(node, call)
        m = call.module
        if m is not None and type(m) not in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d):
            raise _Void(None)  # dynamic padding (timm MaxPool2dSame): Lipschitz factor not computed
        nd = self.vals[src].dim() - 2
        if m is not None:
            ks, st, pd, dl = m.kernel_size, m.stride, m.padding, m.dilation
        else:
            ks = call.get("kernel_size", 1, 1)
            st = call.get("stride", 2, None) or ks
            pd, dl = call.get("padding", 3, 0), call.get("dilation", 4, 1)

        def tup(v: Any) -> tuple[int, ...]:
            return tuple(int(x) for x in v) if isinstance(v, (tuple, list)) else (int(v),) * nd
        ks, st, pd, dl = tup(ks), tup(st if st is not None else ks), tup(pd), tup(dl)
        inp, out = self.vals[src].shape[-nd:], flat_tensors(self.vals[node])[0].shape[-nd:]
        mult = 1
        for i in range(nd):
            cover = [0] * int(inp[i])
            for o in range(int(out[i])):
                for t in range(ks[i]):
                    p = o * st[i] - pd[i] + t * dl[i]
                    if 0 <= p < inp[i]:
                        cover[p] += 1
            mult *= max(cover) if cover else 1
        self.ctx.notes.append(f"{self.prefix}{node.name}: max-pool Lipschitz factor sqrt({mult}) = "
                              f"{_fmt(math.sqrt(mult))} (an input element lies in up to {mult} window(s))")
        return self._apply(node, self.state[src], [(math.sqrt(mult), INF, INF)])

    def _p_adaptive_maxpool(self, node: fx.Node, call: ops.Call) -> tuple[float, float]:
        src = self._src(node, call)
        out_t = flat_tensors(self.vals[node])[0]
        nd = out_t.dim() - 2
        inp, out = self.vals[src].shape[-nd:], out_t.shape[-nd:]
        mult = 1
        for i in range(nd):
            n, o = int(inp[i]), int(out[i])
            cover = [0] * n
            for j in range(o):
                for p in range((j * n) // o, -((-(j + 1) * n) // o)):
                    cover[p] += 1
            mult *= max(cover) if cover else 1
        return self._apply(node, self.state[src], [(math.sqrt(mult), INF, INF)])

    # ---------------------------------------------------------------- submodules
    def _submodule(self, node: fx.Node) -> tuple[float, float] | None:
        m = self.modules[str(node.target)]
        if self.depth >= 8:
            raise _Void(ops.TOO_DEEP)
        if not isinstance(m, fx.GraphModule):
            if node.kwargs or any(isinstance(a, fx.Node) and a in self.state for a in node.args[1:]):
                raise _Void(ops.OPAQUE_MODULE)
        gm = m if isinstance(m, fx.GraphModule) else ops.traced_or_none(m)
        if gm is None:
            raise _Void(ops.OPAQUE_MODULE)
        sub = BoundInterpreter(gm, self.ctx, prefix=f"{self.prefix}{node.name}/", depth=self.depth + 1)
        inputs = fx.node.map_arg(node.args, self._value)
        states = [self.state.get(a) if isinstance(a, fx.Node) else None for a in node.args]
        out = sub.analyse(inputs, states)
        if out is None:
            raise _Void("submodule output does not depend on its input")
        return out


class _ForwardError(Exception):
    pass


def _bn_gain(weight: Tensor | None, running_var: Tensor, eps: float) -> float:
    inv = torch.rsqrt(running_var.detach().to(torch.float64) + float(eps))
    if weight is not None:
        inv = weight.detach().to(torch.float64).abs() * inv
    return float(inv.max()) if inv.numel() else 0.0


def _replace(container: Any, positions: Sequence[Any], x: Tensor) -> Any:
    if isinstance(container, dict):
        out = dict(container)
        for k in positions:
            out[k] = x
        return out
    out_l = list(container)
    for i in positions:
        out_l[i] = x
    return tuple(out_l)
