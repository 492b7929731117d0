"""`LCNNConfig`: every default of the conversion and the penalty in one frozen dataclass ."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConversionError

_POLICIES = ("convert", "keep")


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
        convert_types: extra per-type overrides: {module type or name: "convert" | "keep"} (exactly these two
            words; a type or name no conversion rule knows is an error).
        skip: module names (fully qualified) or regexes (prefix "re:", matched against the whole path) whose
            call sites are left alone. A pattern that matches no call site gives a ConversionWarning naming
            the closest module paths; a regex that does not compile is a ConversionError.
        spectral_norm_linear / spectral_norm_conv / lipschitz_batchnorm: switch the layer families.
        allow_fallback: when a module cannot be traced by torch.fx (or its train/eval traces differ), convert
            its children one by one and report it (True), or raise ConversionError (False).
        preserve_function: make the converted model compute what the (trained) model computed, up to a positive
            scale of the logits and the centered-softplus approximation of ReLU: BatchNorm statistics, biases and
            gamma absorb the spectral norms' 1/sigma, and each beta is set from its input's scale (see
            lcnnify.convert.preserve). Needs example_inputs. Off by default: it overrides beta0 / gamma0 with
            data-dependent values (large beta, gamma >= each BN's gain), which is right for a pretrained model
            and wrong for training from scratch with the paper's initialisation.
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
    preserve_function: bool = False

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
        if isinstance(self.skip, str):
            raise ConversionError(f"LCNNConfig.skip must be a tuple of names / 're:' regexes, got the string "
                                  f"{self.skip!r}. Fix: skip=({self.skip!r},)")
        object.__setattr__(self, "skip", tuple(self.skip))
        for pattern in self.skip:
            if not isinstance(pattern, str):
                raise ConversionError(f"LCNNConfig.skip entries must be strings, got {pattern!r}")
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as e:
                    raise ConversionError(
                        f"LCNNConfig.skip: {pattern!r} is not a valid regular expression ({e}). Fix: correct the "
                        "regex after 're:' (it is matched against whole module paths, e.g. r're:layer1\\..*'), "
                        "or drop the 're:' prefix to skip a module by its exact name.") from None
        if not isinstance(self.convert_types, Mapping):
            raise ConversionError(f"LCNNConfig.convert_types must be a mapping {{type or name: 'convert' | 'keep'}}, "
                                  f"got {type(self.convert_types).__name__}")
        for key, policy in self.convert_types.items():
            if policy not in _POLICIES:
                name = getattr(key, "__name__", key)
                raise ConversionError(
                    f"LCNNConfig.convert_types[{name!r}] = {policy!r}: the policy must be 'convert' or 'keep' "
                    "(lower case, exactly).")

    def replace(self, **overrides: Any) -> "LCNNConfig":
        """A copy with some fields replaced; unknown names raise a TypeError that lists the valid ones."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown LCNNConfig option(s) {unknown}; valid options: {sorted(names)}")
        return dataclasses.replace(self, **overrides)
