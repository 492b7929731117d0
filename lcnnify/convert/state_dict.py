"""Load a plain (pretrained, unconverted) checkpoint into a converted model.

A converted model's state-dict keys are the original ones except where a parametrization moved a tensor:
``conv.weight`` of a spectrally normalized conv or linear lives at ``conv.parametrizations.weight.original``
(the raw weight, before normalization), and a weight-standardized conv's ``gain`` inside its parametrization.
The LCNN layers add their own state: each centered softplus' ``log_beta``, each gamma-Lipschitz BatchNorm's
``log_gamma_minus_1``, the power-iteration vectors ``u`` / ``v``. BatchNorm weights and statistics keep their
keys. :func:`load_plain_state_dict` maps every plain key to where its tensor lives now and keeps the LCNN
state (beta, gamma) of the converted model; the power iterations are then re-converged on the loaded weights.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConversionError
from ..nn import CenteredSoftplus, ConvSpectralNorm, LipschitzBatchNorm

_BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class LoadResult(NamedTuple):
    """What :func:`load_plain_state_dict` did: ``mapping`` plain key -> converted key (for keys that moved),
    ``missing_keys`` (plain-model keys the checkpoint lacked), ``unexpected_keys`` (checkpoint keys with no
    place in the converted model), ``kept`` (LCNN-only keys left at their converted values)."""

    mapping: dict[str, str]
    missing_keys: list[str]
    unexpected_keys: list[str]
    kept: list[str]


def _lcnn_only_keys(model: nn.Module) -> set[str]:
    """Keys of state that exists only in the LCNN: beta, gamma, power-iteration vectors, parametrization state."""
    out: set[str] = set()
    for path, m in model.named_modules():
        pre = f"{path}." if path else ""
        if isinstance(m, CenteredSoftplus):
            out |= {pre + k for k in m.state_dict()}
        elif isinstance(m, LipschitzBatchNorm):
            out |= {pre + k for k, _ in m.named_parameters(recurse=False) if k not in _BN_KEYS}
            out |= {pre + k for k, _ in m.named_buffers(recurse=False) if k not in _BN_KEYS}
        if parametrize.is_parametrized(m):
            for name, plist in m.parametrizations.items():
                for i, p in enumerate(plist):
                    out |= {f"{pre}parametrizations.{name}.{i}.{k}" for k in p.state_dict()}
    return out


def plain_key_map(model: nn.Module, keys: list[str]) -> tuple[dict[str, str], list[str]]:
    """Map plain-model keys to the converted model's keys. Returns (plain -> converted, unplaceable keys)."""
    own = model.state_dict()
    mapping: dict[str, str] = {}
    unplaced: list[str] = []
    for key in keys:
        if key in own:
            mapping[key] = key
            continue
        path, _, leaf = key.rpartition(".")
        pre = f"{path}." if path else ""
        moved = f"{pre}parametrizations.{leaf}.original"
        if moved in own:
            mapping[key] = moved
            continue
        # a tensor a parametrization took over (e.g. the gain of a weight-standardized conv)
        inside = [k for k in own if k.startswith(f"{pre}parametrizations.") and k.endswith(f".{leaf}")
                  and k.count(".") == pre.count(".") + 3]
        if len(inside) == 1:
            mapping[key] = inside[0]
        else:
            unplaced.append(key)
    return mapping, unplaced


@torch.no_grad()
def reconverge_power_iterations(model: nn.Module, iterations: int = 15) -> None:
    """Re-run the power iterations of every spectral normalization on the current weights (after a load).

    Convs: :meth:`ConvSpectralNorm.reset` at the input shape they know (convs whose shape is not known yet warm
    up at their first forward anyway). Linears (torch's spectral norm): ``iterations`` power iterations."""
    for m in model.modules():
        if not parametrize.is_parametrized(m):
            continue
        for name, plist in m.parametrizations.items():
            w = plist.original
            for i, p in enumerate(plist):
                if isinstance(p, ConvSpectralNorm) and p.input_shape is not None:
                    p.reset(p.input_shape, w)
                elif hasattr(p, "_power_method") and hasattr(p, "_reshape_weight_to_matrix") and w.ndim > 1:
                    p._power_method(p._reshape_weight_to_matrix(w), iterations)
                if i + 1 < len(plist):  # the input of the next parametrization in the chain
                    w = p(w)


def load_plain_state_dict(model: nn.Module, state_dict: Mapping[str, Any], strict: bool = True,
                          *, reconverge: bool = True) -> LoadResult:
    """Load a checkpoint of the ORIGINAL (unconverted) model into the converted ``model``.

    ``lcnnify(timm.create_model("resnet18"))`` then ``load_plain_state_dict(lc, torch.load("resnet18.pth"))``:
    every tensor lands where it lives in the converted model (raw weights under
    ``parametrizations.weight.original``, BatchNorm statistics where they were), the LCNN-only state (beta,
    gamma) keeps its current values, and the power iterations are re-converged on the new weights
    (``reconverge``). A checkpoint of a converted model (``lc.state_dict()``) loads too.

    Args:
        strict: like ``nn.Module.load_state_dict``: every key the plain model has must be in ``state_dict``
            and every key of ``state_dict`` must have a place; otherwise a :class:`ConversionError` lists them.
    Returns:
        :class:`LoadResult` (key mapping, missing / unexpected keys, LCNN-only keys kept).
    """
    if not isinstance(model, nn.Module):
        raise ConversionError(f"load_plain_state_dict: model must be the converted nn.Module, got "
                              f"{type(model).__name__}")
    if not isinstance(state_dict, Mapping):
        raise ConversionError(f"load_plain_state_dict: state_dict must be a mapping of names to tensors, got "
                              f"{type(state_dict).__name__}. Fix: torch.load(path, map_location='cpu') returns "
                              "one; a training checkpoint often holds it under a key such as 'state_dict'.")
    mapping, unexpected = plain_key_map(model, list(state_dict))
    own_keys = list(model.state_dict())
    lcnn_only = _lcnn_only_keys(model)
    covered = set(mapping.values())
    missing = [k for k in own_keys if k not in covered and k not in lcnn_only]
    kept = [k for k in own_keys if k in lcnn_only and k not in covered]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys (the model has them, the checkpoint does not): {missing[:10]}"
                         + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
        if unexpected:
            parts.append(f"unexpected keys (no place in the converted model): {unexpected[:10]}"
                         + (f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else ""))
        raise ConversionError(
            "load_plain_state_dict: the checkpoint does not fit the converted model: " + "; ".join(parts) +
            ". Fix: load a checkpoint of the same architecture (same num_classes), or pass strict=False.")
    own = model.state_dict()
    remapped = {}
    for key, value in state_dict.items():
        if key in mapping:
            target = mapping[key]
            # a tensor a parametrization holds in its own layout (the gain of a weight standardization: (C,)
            # instead of timm's (C, 1, 1, 1)): same values, the target's shape
            if target != key and isinstance(value, torch.Tensor) and value.shape != own[target].shape \
                    and value.numel() == own[target].numel():
                value = value.reshape(own[target].shape)
            remapped[target] = value
    # keep what the checkpoint does not provide (LCNN-only state), then load strictly
    full = {**{k: v for k, v in own.items() if k not in remapped}, **remapped}
    model.load_state_dict(full, strict=True)
    if reconverge:
        reconverge_power_iterations(model)
    return LoadResult({k: v for k, v in mapping.items() if k != v}, missing, unexpected, kept)
