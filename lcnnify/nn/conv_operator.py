"""A convolution as a linear operator: its geometry, the map ``x -> A_W x``, its exact adjoint and weight-gradient.

A convolution with weight W (no bias), stride, padding (any ``padding_mode``, also TF-style dynamic "same"),
dilation and groups is, for a fixed input shape ``(C, *spatial)``, a linear operator ``A_W`` that is also linear
in W. :class:`ConvGeometry` holds everything but W and the input shape; :class:`ConvOperator` fixes the input
shape and provides

* ``forward(x, w)   = A_W x``            (batched: x of shape ``(N, C, *spatial)``),
* ``adjoint(y, w)   = A_W^T y``          (exact: ``conv_transpose`` with the output_padding that restores the
  input size, a crop for asymmetric zero padding, or the vector-Jacobian product of ``F.pad`` for the
  reflect / replicate / circular modes),
* ``weight_grad(x, y) = G``  with ``<y, A_W x> = <W, G>`` for every W (the conv weight-gradient at input x and
  output-gradient y), which is what makes ``sigma = <u, A_W v>`` differentiable in W without a graph.

For one input of an ungrouped 2-d convolution on the CPU (the power iteration's vectors) the three are computed as
matrix products with the im2col matrix of the input, reading the weight as it is stored (see
:meth:`ConvOperator.prepare_weight` for which layers use it in an iteration).

Used by the spectral normalization of convolutions (paper §3.4.1) and by the certified bound.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConversionError

__all__ = ["ConvGeometry", "ConvOperator", "tf_same_padding"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
#: prepare_weight: 2-d convs with at least this many output pixels (compute-bound at batch 1) are applied through
#: the convolution kernels with a channels-last weight copy; fewer (weight-bound) through the batch-1 matrix path
_CONV_PATH_MIN_PIXELS = 64
#: axpby_weight_grad on the matrix path: weights of at least this many bytes are done in row blocks of about
#: _ROW_BLOCK_BYTES, each scaled and accumulated while it is in cache (one pass over memory instead of two)
_BLOCKED_MIN_BYTES = 1 << 22
_ROW_BLOCK_BYTES = 1 << 19


def tf_same_padding(spatial: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                    dilation: Sequence[int]) -> tuple[int, ...]:
    """F.pad amounts (last dim first) of TF/timm "same" padding: per dim the total
    ``max((ceil(i/s) - 1) s + (k - 1) d + 1 - i, 0)``, split left = total // 2, right = the rest
    (as ``timm.layers.padding.pad_same``)."""
    pads: list[int] = []
    for i, k, st, d in reversed(list(zip(spatial, kernel, stride, dilation))):
        total = max((math.ceil(i / st) - 1) * st + (k - 1) * d + 1 - i, 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


def _uses_dynamic_same_padding(conv: nn.Module) -> bool:
    """timm's Conv2dSame (and the *Same std convs with dynamic padding) pad the input in forward."""
    return type(conv).__name__ == "Conv2dSame" or bool(getattr(conv, "same_pad", False))


def _ints(x: Any, n: int) -> tuple[int, ...]:
    t = tuple(int(s) for s in x) if isinstance(x, (tuple, list)) else (int(x),) * n
    return t * n if len(t) == 1 and n > 1 else t


@dataclass(frozen=True)
class ConvGeometry:
    """Everything that defines a convolution's linear map except its weight and its input shape.

    ``rpad`` are the padding amounts in ``F.pad`` order (last spatial dim first: ``(left_last, right_last,
    left_second_to_last, ...)``), applied with ``padding_mode`` before a padding-free convolution.
    ``dynamic_same``: the padding is TF-style "same", computed from the input size at forward time (timm's
    ``Conv2dSame``); ``rpad`` is then ignored and :meth:`resolved` gives the geometry for a given input.

    Read-only mapping access (``geometry["stride"]``) is kept for code written against the former dict form.
    """

    ndim: int
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str
    rpad: tuple[int, ...]
    dynamic_same: bool = False

    def __post_init__(self) -> None:
        nd = self.ndim
        if nd not in _CONV:
            raise ValueError(f"ConvGeometry: ndim must be 1, 2 or 3, got {nd}")
        for name in ("kernel_size", "stride", "dilation"):
            if len(getattr(self, name)) != nd:
                raise ValueError(f"ConvGeometry: {name}={getattr(self, name)} has not {nd} entries")
        if len(self.rpad) != 2 * nd:
            raise ValueError(f"ConvGeometry: rpad={self.rpad} must have 2 * ndim = {2 * nd} entries")
        if self.padding_mode not in _PADDING_MODES:
            raise ValueError(f"ConvGeometry: padding_mode must be one of {_PADDING_MODES}, got {self.padding_mode!r}")
        if self.groups < 1 or self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"ConvGeometry: groups={self.groups} must divide in_channels={self.in_channels} and "
                             f"out_channels={self.out_channels}")

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_conv(cls, conv: nn.Module) -> "ConvGeometry":
        """The geometry of an ``nn.Conv1d/2d/3d`` (or timm ``Conv2dSame``); ConversionError for anything else."""
        if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or getattr(conv, "transposed", False):
            raise ConversionError(
                f"conv_spectral_norm: expected an nn.Conv1d/Conv2d/Conv3d, got {type(conv).__name__}; "
                f"fix: use linear_spectral_norm for nn.Linear, and leave transposed convolutions unconverted")
        if isinstance(conv.weight, nn.parameter.UninitializedParameter):
            raise ConversionError(
                f"conv_spectral_norm: {type(conv).__name__} has an uninitialized (lazy) weight; fix: run one "
                f"forward pass (or pass example_inputs) before converting")
        return cls(ndim=len(conv.kernel_size), in_channels=int(conv.in_channels),
                   out_channels=int(conv.out_channels), kernel_size=tuple(int(k) for k in conv.kernel_size),
                   stride=tuple(int(s) for s in conv.stride), dilation=tuple(int(d) for d in conv.dilation),
                   groups=int(conv.groups), padding_mode=str(conv.padding_mode),
                   rpad=tuple(int(p) for p in conv._reversed_padding_repeated_twice),
                   dynamic_same=_uses_dynamic_same_padding(conv))

    @classmethod
    def from_weight(cls, weight_shape: Sequence[int], *, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
                    groups: int = 1, input_spatial: Sequence[int] | None = None) -> "ConvGeometry":
        """The geometry of the functional ``F.conv{n}d(x, weight, stride=, padding=, dilation=, groups=)``
        (zero padding; ``padding`` an int, a tuple, ``'valid'`` or ``'same'``; ``'same'`` as torch pads it:
        total ``d (k - 1)``, the extra one on the right)."""
        nd = len(weight_shape) - 2
        kernel = tuple(int(k) for k in weight_shape[2:])
        stride, dilation = _ints(stride, nd), _ints(dilation, nd)
        if isinstance(padding, str):
            if padding == "valid":
                pairs = [(0, 0)] * nd
            elif padding == "same":
                pairs = [(d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for d, k in zip(dilation, kernel)]
            else:
                raise ValueError(f"ConvGeometry.from_weight: padding {padding!r} is not 'same' or 'valid'")
        else:
            pairs = [(p, p) for p in _ints(padding, nd)]
        rpad: list[int] = []
        for left, right in reversed(pairs):
            rpad += [left, right]
        return cls(ndim=nd, in_channels=int(weight_shape[1]) * int(groups), out_channels=int(weight_shape[0]),
                   kernel_size=kernel, stride=stride, dilation=dilation, groups=int(groups), padding_mode="zeros",
                   rpad=tuple(rpad))

    @classmethod
    def coerce(cls, geometry: "ConvGeometry | Mapping[str, Any]") -> "ConvGeometry":
        """A ConvGeometry from itself or from a mapping with the same field names (missing dynamic_same: False)."""
        if isinstance(geometry, ConvGeometry):
            return geometry
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in geometry.items() if k in names})

    # ------------------------------------------------------------------ derived quantities
    @property
    def pads(self) -> tuple[tuple[int, int], ...]:
        """(left, right) padding per spatial dim, first spatial dim first."""
        nd = self.ndim
        return tuple((self.rpad[2 * (nd - 1 - i)], self.rpad[2 * (nd - 1 - i) + 1]) for i in range(nd))

    def resolved(self, spatial: Sequence[int]) -> "ConvGeometry":
        """The static geometry for inputs of spatial size ``spatial`` (dynamic "same" padding computed)."""
        if not self.dynamic_same:
            return self
        return dataclasses.replace(self, rpad=tf_same_padding(spatial, self.kernel_size, self.stride, self.dilation),
                                   dynamic_same=False)

    def output_spatial(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Spatial output size for inputs of spatial size ``spatial`` (entries < 1: empty output)."""
        g = self.resolved(spatial)
        return tuple((s + left + right - d * (k - 1) - 1) // st + 1
                     for s, (left, right), d, k, st in zip(spatial, g.pads, g.dilation, g.kernel_size, g.stride))

    # ------------------------------------------------------------------ read-only mapping access
    def __getitem__(self, key: str) -> Any:
        if key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default


class ConvOperator:
    """The convolution ``A_W`` (no bias) of a :class:`ConvGeometry` on inputs of shape ``input_shape = (C,
    *spatial)``: :meth:`forward`, its exact :meth:`adjoint`, and :meth:`weight_grad` (see the module docstring).

    All three are batched over a leading dimension and are plain torch ops (differentiable).
    ``kind``: 0 = symmetric zero padding (conv / conv_transpose with ``padding``), 1 = asymmetric zero padding
    (pad / crop), 2 = reflect, replicate or circular padding (pad and its vector-Jacobian product).
    """

    def __init__(self, geometry: "ConvGeometry | Mapping[str, Any]", input_shape: Sequence[int]) -> None:
        geometry = ConvGeometry.coerce(geometry)
        nd = geometry.ndim
        input_shape = tuple(int(s) for s in input_shape)
        if len(input_shape) != nd + 1 or input_shape[0] != geometry.in_channels:
            raise ValueError(
                f"input_shape {input_shape} does not fit a Conv{nd}d with in_channels={geometry.in_channels}; "
                f"expected (C, *spatial) with C={geometry.in_channels} and {nd} spatial dims")
        spatial = input_shape[1:]
        geometry = geometry.resolved(spatial)
        self.geometry = geometry
        self.nd = nd
        self.stride, self.dilation, self.groups = geometry.stride, geometry.dilation, geometry.groups
        self.mode, self.rpad = geometry.padding_mode, geometry.rpad
        self._conv, self._conv_t = _CONV[nd], _CONV_T[nd]
        pads = geometry.pads
        out = geometry.output_spatial(spatial)
        if any(o < 1 for o in out):
            raise ValueError(f"input_shape {input_shape} is too small for this convolution (kernel "
                             f"{geometry.kernel_size}, dilation {self.dilation}, padding {pads}): empty output")
        padded = [s + left + right for s, (left, right) in zip(spatial, pads)]
        self.output_padding = tuple(p - ((o - 1) * st + d * (k - 1) + 1) for p, o, st, d, k in
                                    zip(padded, out, self.stride, self.dilation, geometry.kernel_size))
        self.input_shape = input_shape
        self.output_shape = (geometry.out_channels, *out)
        self.weight_shape = (geometry.out_channels, geometry.in_channels // geometry.groups, *geometry.kernel_size)
        if self.mode == "zeros" and all(left == right for left, right in pads):
            self.kind = 0
            self.padding = tuple(left for left, _ in pads)
        elif self.mode == "zeros":
            self.kind = 1
            self.padding = (0,) * nd
            self.crop = (slice(None), slice(None)) + tuple(slice(left, left + s) for (left, _), s in zip(pads, spatial))
        else:
            self.kind = 2
            self.padding = (0,) * nd

    def _pad(self, x: Tensor) -> Tensor:
        return x if self.kind == 0 else F.pad(x, self.rpad, mode="constant" if self.kind == 1 else self.mode)

    def _fast_layout(self, t: Tensor) -> Tensor:
        # 2-d: channels-last operands take oneDNN kernels; contiguous NCHW with batch 1 and a small spatial size
        # takes the im2col fallback (measured: up to ~10x slower for the deep layers of a ResNet)
        return t.contiguous(memory_format=torch.channels_last) if self.nd == 2 and t.dim() == 4 else t

    # ------------------------------------------------------------------ batch-1 matrix path
    # A single input (the power iteration's vectors) through an ungrouped 2-d conv on the CPU: written as
    # matrix products with the im2col matrix ``X = unfold(pad(x))`` of shape (C k_h k_w, L), L = output pixels:
    #     A_W x = W_mat X,     A_W^T y = fold(W_mat^T Y),     G = Y X^T,
    # W_mat = W.view(C_out, C k_h k_w) (the weight as it is stored: no reordered copy), Y = y.view(C_out, L).
    # The products are taken in the orientation (L rows) that the BLAS runs fastest for small L.
    def _matrix_path(self, x: Tensor, w: Tensor) -> bool:
        return self.nd == 2 and self.groups == 1 and x.dim() == 4 and x.shape[0] == 1 and x.device.type == "cpu" \
            and w.is_contiguous()

    def _pointwise(self) -> bool:
        # 1x1 kernel, stride 1, no padding: the im2col matrix is the input itself
        pw = self.__dict__.get("_is_pointwise")
        if pw is None:
            g = self.geometry
            pw = self.__dict__["_is_pointwise"] = self.kind == 0 and all(k == 1 for k in g.kernel_size) and \
                all(st == 1 for st in self.stride) and not any(self.padding)
        return pw

    def cols(self, x: Tensor) -> Tensor:
        """``X^T``: the transposed im2col matrix (L, C k_h k_w) of one input ``x`` of shape ``(1, *input_shape)``
        (2-d convs), so that ``A_W x = (X^T W_mat^T)^T`` and ``G(x, y) = Y X^T`` (viewed as the weight)."""
        if self._pointwise():
            return x.reshape(x.shape[1], -1).t()
        return F.unfold(self._pad(x), self.geometry.kernel_size, dilation=self.dilation, padding=self.padding,
                        stride=self.stride)[0].t()

    def _forward_cols(self, cols_t: Tensor, w: Tensor) -> Tensor:
        out = cols_t.mm(w.view(w.shape[0], -1).t())  # (L, C_out)
        return out.t().reshape(1, *self.output_shape)

    def prepare_weight(self, w: Tensor) -> Tensor:
        """``w`` in the memory layout :meth:`forward` / :meth:`adjoint` are fastest with (same values); worth
        it when the same weight is applied several times (an iteration)."""
        if self.nd == 2 and self.groups == 1 and w.device.type == "cpu" and w.is_contiguous() \
                and math.prod(self.output_shape[1:]) < _CONV_PATH_MIN_PIXELS:
            return w  # weight-bound: the batch-1 matrix path reads the weight as stored (no reordered copy)
        return self._fast_layout(w)

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        """A_W x for x of shape ``(N, *input_shape)``."""
        if self._matrix_path(x, w):
            return self._forward_cols(self.cols(x), w)
        return self._conv(self._pad(self._fast_layout(x)), w, None, self.stride, self.padding, self.dilation,
                          self.groups)

    def forward_and_cols(self, x: Tensor, w: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(A_W x, cols)``: ``cols`` (or None) can be handed to :meth:`axpby_weight_grad` for the same ``x``,
        which then skips the im2col of ``x``."""
        if self._matrix_path(x, w):
            cols_t = self.cols(x)
            return self._forward_cols(cols_t, w), cols_t
        return self.forward(x, w), None

    def adjoint(self, y: Tensor, w: Tensor) -> Tensor:
        """A_W^T y for y of shape ``(N, *output_shape)`` (exact adjoint of :meth:`forward`)."""
        if self._matrix_path(y, w):
            cout = w.shape[0]
            ct = y.reshape(cout, -1).t().mm(w.view(cout, -1))  # (L, C k_h k_w) = (W_mat^T Y)^T
            spatial = self.input_shape[1:]
            if self.kind:
                spatial = tuple(s + left + right for s, (left, right) in zip(spatial, self.geometry.pads))
            if self._pointwise():
                return ct.t().reshape(1, *self.input_shape)
            z = F.fold(ct.t()[None], spatial, self.geometry.kernel_size, dilation=self.dilation,
                       padding=self.padding, stride=self.stride)
        else:
            z = self._conv_t(self._fast_layout(y), w, None, self.stride, self.padding, self.output_padding,
                             self.groups, self.dilation)
        if self.kind == 0:
            return z
        if self.kind == 1:
            return z[self.crop]
        with torch.enable_grad():  # adjoint of F.pad(mode) = its vector-Jacobian product
            x0 = torch.zeros((y.shape[0], *self.input_shape), dtype=z.dtype, device=z.device, requires_grad=True)
            (g,) = torch.autograd.grad(F.pad(x0, self.rpad, mode=self.mode), x0, grad_outputs=z,
                                       create_graph=z.requires_grad)
        return g

    def weight_grad(self, x: Tensor, y: Tensor, w: Tensor | None = None) -> Tensor:
        """G = d<y, A_W x>/dW (independent of W): the conv weight-gradient at input x and output-gradient y,
        so that ``<y, A_W x> = <W, G>`` for every W (summed over the batch). ``w``, if given, only supplies the
        weight's shape and memory layout."""
        if w is None:
            w = torch.zeros(self.weight_shape, dtype=x.dtype, device=x.device)
        if self._matrix_path(x, w):
            return y.reshape(w.shape[0], -1).mm(self.cols(x)).view(w.shape)
        return torch.ops.aten.convolution_backward(
            y.contiguous(), self._pad(x.contiguous()), w, None, list(self.stride), list(self.padding),
            list(self.dilation), False, [0] * self.nd, self.groups, [False, True, False])[1]

    def axpby_weight_grad(self, g: Tensor, beta: Tensor, x: Tensor, y: Tensor, alpha: Tensor,
                          cols: Tensor | None = None, buffer: Callable[[], Tensor] | None = None) -> Tensor:
        """``beta * g + alpha * G(x, y)`` (``alpha``, ``beta`` 0-dim tensors; ``g`` weight-shaped, not modified).

        On the batch-1 matrix path: ``beta * g`` is written into ``buffer()`` (memory for the result, if given)
        and the product ``Y X^T`` accumulated into it (no separate G), with ``cols`` from
        :meth:`forward_and_cols` for this ``x`` if at hand. Otherwise G is computed (conv weight-gradient) and
        the result built in it."""
        if self._matrix_path(x, g):
            cout = g.shape[0]
            if cols is None:
                cols = self.cols(x)
            out = torch.empty_like(g) if buffer is None else buffer()
            gm, om, ym = g.view(cout, -1), out.view(cout, -1), y.reshape(cout, -1) * alpha
            row_bytes = gm.shape[1] * g.element_size()
            rows = cout if cout * row_bytes < _BLOCKED_MIN_BYTES else max(1, _ROW_BLOCK_BYTES // row_bytes)
            for i in range(0, cout, rows):
                block = om[i:i + rows]
                torch.mul(gm[i:i + rows], beta, out=block).addmm_(ym[i:i + rows], cols)
            return out
        return self.weight_grad(x, y, g).mul_(alpha).addcmul_(g, beta)

    def __repr__(self) -> str:
        return f"ConvOperator({self.input_shape} -> {self.output_shape}, kind={self.kind})"
