"""One checkpoint format for :func:`lcnnify.train.fit` and the ``lcnnify`` command, and one atomic writer.

A checkpoint is a ``torch.save``'d dict (loadable with ``torch.load(..., weights_only=True)``)::

    {"format": "lcnnify.checkpoint/1",
     "state_dict": {...},              # the trained (or converted) model's weights
     "method": "lcnn", "config": {...}, "history": [...], "epoch": 12,   # what fit() trained, and how far
     "training": {"optimizer": ..., "scheduler": ..., "rng": ...},       # only while a run can be resumed
     "model": "small_cnn", "num_classes": 10, "input_size": [1, 8, 8], "width": 16, "lcnn_overrides": {},
     "dataset": "digits", "trained": True, ...}                         # how to rebuild it (CLI metadata)

``fit(checkpoint=PATH)`` writes one after every epoch (with ``training``, so an interrupted run resumes
bit-for-bit); ``lcnnify train`` passes its metadata along, so the same file is also loadable by
``lcnnify evaluate``, and writes the final one without ``training``. Every file is written through
:func:`atomic_save` (a temporary file in the same directory, then ``os.replace``): a crash never leaves a
half-written checkpoint or history behind.
"""
from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..errors import LCNNError

__all__ = ["FORMAT", "CheckpointError", "atomic_save", "atomic_write_text", "save_checkpoint", "read_checkpoint",
           "rng_state", "set_rng_state"]

#: The format tag of every checkpoint lcnnify writes.
FORMAT = "lcnnify.checkpoint/1"
# earlier tags with the same keys (the CLI's files before the formats were merged): still readable
_COMPATIBLE = ("lcnnify.cli/1",)


class CheckpointError(LCNNError, ValueError):
    """A file is missing, unreadable, or not a lcnnify checkpoint (the message names the file and why)."""


# ------------------------------------------------------------------------------------------------ writing
def _atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj, path)`` through a temporary file and ``os.replace`` (never a half-written file)."""
    return _atomic(path, lambda p: torch.save(obj, p))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (JSON histories, reports)."""

    def write(p: str) -> None:
        with open(p, "w") as fh:
            fh.write(text)

    return _atomic(path, write)


def save_checkpoint(path: str | os.PathLike, state_dict: Mapping[str, Any], *,
                    training: Mapping[str, Any] | None = None, **meta: Any) -> Path:
    """Write a checkpoint: ``state_dict``, the resumable ``training`` state (or none) and metadata ``meta``."""
    payload: dict[str, Any] = {"format": FORMAT, **meta, "state_dict": dict(state_dict)}
    if training is not None:
        payload["training"] = dict(training)
    return atomic_save(payload, path)


# ------------------------------------------------------------------------------------------------ reading
def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (on the CPU, ``weights_only=True``).

    Raises:
        CheckpointError: no such file, not a ``torch.save`` file, or not a lcnnify checkpoint.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"no checkpoint file {str(p)!r}" + (" (it is a directory)" if p.is_dir() else ""))
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise CheckpointError(f"cannot read {str(p)!r}: {exc.strerror or exc}") from None
    except (pickle.UnpicklingError, EOFError, IndexError, KeyError, TypeError) as exc:  # garbage, not a pickle
        raise CheckpointError(f"cannot read {str(p)!r}: it is not a checkpoint written by torch.save "
                              f"({type(exc).__name__})") from None
    except Exception as exc:  # noqa: BLE001 - truncated zip, foreign pickled objects...: a bad input file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read {str(p)!r} as a checkpoint ({type(exc).__name__}: {first[:300]})"
                              ) from None
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt != FORMAT and fmt not in _COMPATIBLE:
        raise CheckpointError(f"{str(p)!r} is not a lcnnify checkpoint (format {fmt!r}; expected {FORMAT!r}, "
                              "written by lcnnify.train.fit, `lcnnify train` or `lcnnify convert --out`)")
    return ckpt


# --------------------------------------------------------------------------------------------- RNG state
def rng_state(*generators: torch.Generator) -> dict[str, Any]:
    """Every RNG state a training run draws from: torch (CPU, CUDA), ``random``, numpy and ``generators``."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])),
        "generators": [g.get_state() for g in generators],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any], *generators: torch.Generator) -> None:
    """Restore what :func:`rng_state` saved (``generators`` in the same order)."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    saved = state["generators"]
    if len(saved) != len(generators):
        raise CheckpointError(f"the checkpoint holds {len(saved)} generator states, this run has {len(generators)}")
    for g, s in zip(generators, saved):
        g.set_state(s)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
