"""`LCNNConfig`: every default of the conversion and the penalty in one frozen dataclass (DESIGN §3, §6)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class LCNNConfig:
    """Defaults of an LCNN (paper §3; reference implementation values).

    Attributes:
        beta0: initial beta of every centered softplus (paper / reference: 5).
        per_channel_beta: one beta per channel instead of one per call site.
        gamma0: initial gamma of every gamma-Lipschitz BatchNorm (reference: 10). Must be >= 1.
        lambda_beta: weight of sum(beta) in the curvature penalty (paper eq. 5; reference 1e-2).
        lambda_gamma: weight of sum(log gamma) in the curvature penalty (reference 1e-2).
        power_iterations: power iterations per training forward of each spectrally normalized layer.
        warmup_iterations: power iterations when a conv first sees an input shape (>= 15).
        smooth_activations: policy for smooth activations (SiLU, GELU, Hardswish, Mish, ...):
            "convert" (replace by centered softplus) or "keep" (leave them, report them).
        convert_types: extra per-type overrides: {module type or name: "convert" | "keep"}.
        skip: module names (fully qualified) or regexes (prefix "re:") whose call sites are left alone.
        spectral_norm_linear / spectral_norm_conv / lipschitz_batchnorm: switch the layer families.
        allow_fallback: when a module cannot be traced by torch.fx (or its train/eval traces differ), convert
            its children one by one and report it (True), or raise ConversionError (False).
    """

    beta0: float = 5.0
    per_channel_beta: bool = False
    gamma0: float = 10.0
    lambda_beta: float = 1e-2
    lambda_gamma: float = 1e-2
    power_iterations: int = 1
    warmup_iterations: int = 15
    smooth_activations: str = "convert"
    convert_types: Mapping[Any, str] = field(default_factory=dict)
    skip: tuple[str, ...] = ()
    spectral_norm_linear: bool = True
    spectral_norm_conv: bool = True
    lipschitz_batchnorm: bool = True
    allow_fallback: bool = True

    def __post_init__(self) -> None:
        if not self.beta0 > 0:
            raise ValueError(f"LCNNConfig.beta0 must be > 0, got {self.beta0}")
        if not self.gamma0 >= 1:
            raise ValueError(f"LCNNConfig.gamma0 must be >= 1 (paper §3.4.2), got {self.gamma0}")
        if self.lambda_beta < 0 or self.lambda_gamma < 0:
            raise ValueError("LCNNConfig.lambda_beta and lambda_gamma must be >= 0")
        if self.power_iterations < 0 or self.warmup_iterations < 0:
            raise ValueError("LCNNConfig power iteration counts must be >= 0")
        if self.smooth_activations not in ("convert", "keep"):
            raise ValueError(
                f"LCNNConfig.smooth_activations must be 'convert' or 'keep', got {self.smooth_activations!r}")
        object.__setattr__(self, "skip", tuple(self.skip))

    def replace(self, **overrides: Any) -> "LCNNConfig":
        """A copy with some fields replaced; unknown names raise a TypeError that lists the valid ones."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown LCNNConfig option(s) {unknown}; valid options: {sorted(names)}")
        return dataclasses.replace(self, **overrides)
