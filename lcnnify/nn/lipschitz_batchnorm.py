"""gamma-Lipschitz batch normalization (paper §3.4.2).

In eval mode BN is the affine map  BN(x) = w * (x - mu) / sqrt(var + eps) + b  with per-channel gain
|w_i| / sqrt(running_var_i + eps), so ||BN||_2 = L = max_i |w_i| / sqrt(running_var_i + eps) (w = 1 without
affine). The gamma-Lipschitz BN scales the linear part by

    s = min(1, gamma / L),   i.e.  gLBN(x) = s * w * (x - mu) / sqrt(var + eps) + b,

so its Lipschitz constant is s * L = min(L, gamma) <= gamma. gamma >= 1 is learnable and penalized through
log(gamma) (paper eq. 5); it is stored as ``log_gamma_minus_1`` with gamma = 1 + exp(log_gamma_minus_1), which
makes gamma >= 1 hold by construction (in floating point too: 1 + a non-negative number).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["LipschitzBatchNorm"]

_VALID_DIMS = {None: (2, 3, 4, 5), 1: (2, 3), 2: (4,), 3: (5,)}


def _gamma_to_raw(gamma: float) -> float:
    gamma = float(gamma)
    if not (gamma >= 1.0 and math.isfinite(gamma)):
        raise ValueError(f"LipschitzBatchNorm: gamma must be a finite number >= 1 (paper §3.4.2), got {gamma}")
    return math.log(max(gamma - 1.0, 1e-8))


class LipschitzBatchNorm(_NormBase):
    r"""gamma-Lipschitz BatchNorm for (N, C), (N, C, L), (N, C, H, W) and (N, C, D, H, W) inputs (paper §3.4.2).

    .. math:: \mathrm{BN}_\gamma(x) = \min\Bigl(1, \frac{\gamma}{L}\Bigr)\,
              \frac{w\,(x-\mu)}{\sqrt{\sigma^2+\epsilon}} + b,\qquad
              L = \max_i \frac{|w_i|}{\sqrt{\mathrm{running\_var}_i+\epsilon}}

    * Normalization is exactly ``nn.BatchNorm``: batch statistics in training mode (running statistics updated
      with ``momentum``, or a cumulative average when ``momentum=None``; ``num_batches_tracked`` counted), running
      statistics in eval mode. The scale factor is folded into the BN weight, so the whole layer is one
      ``F.batch_norm`` call.
    * L always uses the running statistics (as the reference implementation), also in training mode (the values
      before this batch's update). Its eval-mode gain is therefore exactly ``min(L, gamma) <= gamma``.
    * ``track_running_stats=False`` (no running statistics; BN always normalizes with the batch statistics):
      L uses the biased variance of the current batch, detached, i.e. the bound holds for the affine map that
      the layer applies to that batch with its statistics held fixed.
    * gamma = 1 + exp(log_gamma_minus_1) >= 1 by construction (initial value ``gamma``, default 10); it gets a
      gradient only while clipping is active (gamma < L).
    * ``frozen=True`` (used for torchvision's FrozenBatchNorm2d): always the running statistics, never updated,
      weight and bias not trainable.

    state_dict keys: those of ``nn.BatchNorm`` (weight, bias, running_mean, running_var, num_batches_tracked)
    plus ``log_gamma_minus_1``. Unlike SyncBatchNorm, statistics are not synchronized across processes.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as ``nn.BatchNorm2d``.
        gamma: initial gamma (>= 1).
        dim: 1, 2 or 3 to check inputs like BatchNorm1d/2d/3d; None accepts any 2d-5d input.
        bias: as ``nn.BatchNorm`` (``bias=False`` keeps only the weight).
        frozen: behave like a frozen BN (see above).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, gamma: float = 10.0,
                 dim: int | None = None, bias: bool = True, frozen: bool = False) -> None:
        if dim not in _VALID_DIMS:
            raise ValueError(f"LipschitzBatchNorm: dim must be 1, 2, 3 or None, got {dim}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype,
                         bias=bias)
        self.dim = dim
        self.frozen = bool(frozen)
        if self.frozen and not track_running_stats:
            raise ValueError("LipschitzBatchNorm: frozen=True needs track_running_stats=True")
        self.log_gamma_minus_1 = nn.Parameter(
            torch.tensor(_gamma_to_raw(gamma), device=device, dtype=dtype if dtype is not None else None))

    # ------------------------------------------------------------------ gamma / L
    @property
    def gamma(self) -> Tensor:
        """gamma = 1 + exp(log_gamma_minus_1) >= 1 (differentiable scalar)."""
        return 1.0 + self.log_gamma_minus_1.exp()

    def log_gamma(self) -> Tensor:
        """log(gamma) = softplus(log_gamma_minus_1), computed stably (the penalty term of paper eq. 5)."""
        return F.softplus(self.log_gamma_minus_1)

    def _gain_terms(self, var: Tensor) -> Tensor:
        inv_std = torch.rsqrt(var + self.eps)
        return inv_std if self.weight is None else self.weight.abs() * inv_std

    def lipschitz_bound_unclipped(self) -> Tensor | None:
        """L = max_i |w_i| / sqrt(running_var_i + eps) (None without running statistics)."""
        if self.running_var is None:
            return None
        return self._gain_terms(self.running_var).max()

    def lipschitz_constant(self) -> Tensor:
        """The eval-mode Lipschitz constant min(L, gamma) <= gamma (with running statistics).

        Without running statistics (track_running_stats=False) the gain depends on the batch, and the
        certified bound ``gamma`` is returned."""
        L = self.lipschitz_bound_unclipped()
        if L is None:
            return self.gamma
        return torch.minimum(L, self.gamma.to(L.dtype))

    def _scale(self, input: Tensor, use_batch_var: bool) -> Tensor:
        """min(1, gamma / L) (differentiable w.r.t. gamma and w)."""
        if use_batch_var:
            dims = [0] + list(range(2, input.dim()))
            with torch.no_grad():
                var = torch.var(input.to(self._param_dtype()), dim=dims, unbiased=False)
        else:
            var = self.running_var
        L = self._gain_terms(var).max()
        # min(1, gamma / L) written as gamma / max(L, gamma): identical values, but finite gradients when
        # L = 0 (zero-initialised BN weights, e.g. timm's zero_init_last) where gamma / L would be inf
        gamma = self.gamma.to(L.dtype)
        return gamma / torch.maximum(L, gamma)

    def _param_dtype(self) -> torch.dtype:
        ref = self.weight if self.weight is not None else self.running_var
        return ref.dtype if ref is not None else torch.float32

    # ------------------------------------------------------------------ forward
    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() not in _VALID_DIMS[self.dim]:
            want = "/".join(f"{d}D" for d in _VALID_DIMS[self.dim])
            raise ValueError(f"LipschitzBatchNorm(dim={self.dim}): expected {want} input, got {input.dim()}D "
                             f"input of shape {tuple(input.shape)}")
        if input.shape[1] != self.num_features:
            raise ValueError(f"LipschitzBatchNorm: expected {self.num_features} channels at dim 1, got input "
                             f"of shape {tuple(input.shape)}")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if self.frozen:
            s = self._scale(input, use_batch_var=False)
            w = s.expand(self.num_features) if self.weight is None else self.weight * s
            return F.batch_norm(input, self.running_mean, self.running_var, w, self.bias, False, 0.0, self.eps)

        eaf = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            eaf = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = True if self.training else (self.running_mean is None and self.running_var is None)
        # L from the running statistics *before* this batch's update (F.batch_norm updates them in place).
        s = self._scale(input, use_batch_var=self.running_var is None)
        w = s.expand(self.num_features) if self.weight is None else self.weight * s
        return F.batch_norm(
            input,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            w, self.bias, bn_training, eaf, self.eps)

    def extra_repr(self) -> str:
        g = self.gamma.detach().float().item()
        extra = f", gamma={g:.4g}"
        if self.dim is not None:
            extra += f", dim={self.dim}"
        if self.frozen:
            extra += ", frozen=True"
        return super().extra_repr() + extra

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_batchnorm(cls, bn: nn.Module, gamma: float = 10.0) -> "LipschitzBatchNorm":
        """A LipschitzBatchNorm with ``bn``'s hyper-parameters, weight, bias and running statistics (copies,
        same device and dtype, same train/eval mode). Accepts nn.BatchNorm1d/2d/3d, nn.SyncBatchNorm (the
        result is not synchronized) and torchvision's FrozenBatchNorm2d (the result is ``frozen``)."""
        from torch.nn.modules.batchnorm import _BatchNorm
        frozen = False
        if isinstance(bn, _BatchNorm):
            dim = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}.get(type(bn))
            if dim is None:
                for base, d in ((nn.BatchNorm1d, 1), (nn.BatchNorm2d, 2), (nn.BatchNorm3d, 3)):
                    if isinstance(bn, base):
                        dim = d
            affine, trs, momentum = bn.affine, bn.track_running_stats, bn.momentum
            has_bias = bn.bias is not None if affine else True
        elif type(bn).__name__ == "FrozenBatchNorm2d" and hasattr(bn, "running_var"):
            dim, affine, trs, momentum, has_bias, frozen = 2, True, True, 0.0, True, True
        else:
            raise TypeError(f"LipschitzBatchNorm.from_batchnorm: unsupported module {type(bn).__name__}; "
                            f"expected nn.BatchNorm1d/2d/3d, nn.SyncBatchNorm or FrozenBatchNorm2d")
        ref = bn.running_mean if getattr(bn, "running_mean", None) is not None else bn.weight
        num_features = int(ref.shape[0])
        new = cls(num_features, eps=float(bn.eps), momentum=momentum, affine=affine, track_running_stats=trs,
                  device=ref.device, dtype=ref.dtype, gamma=gamma, dim=dim, bias=has_bias, frozen=frozen)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                src, dst = getattr(bn, name, None), getattr(new, name, None)
                if src is not None and dst is not None:
                    dst.copy_(src)
            if new.num_batches_tracked is not None and getattr(bn, "num_batches_tracked", None) is not None:
                new.num_batches_tracked.copy_(bn.num_batches_tracked)
        if frozen:
            new.weight.requires_grad_(False)
            new.bias.requires_grad_(False)
        elif affine:
            new.weight.requires_grad_(bn.weight.requires_grad)
            if new.bias is not None:
                new.bias.requires_grad_(bn.bias.requires_grad)
        new.train(bn.training)
        return new
