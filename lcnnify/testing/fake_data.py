"""Tiny datasets in the REAL on-disk formats (CIFAR python pickles), written by tests that need them."""
from __future__ import annotations

import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np


class Py2Pickler(pickle._Pickler):
    """Writes pickles as Python 2 did (the CIFAR batches are Python 2 pickles): str/bytes as 8-bit strings.

    Loaded with ``encoding="bytes"`` the keys are ``b"data"``, ``b"labels"``; with ``encoding="latin1"``
    (torchvision) they are ``"data"``, ``"labels"`` -- exactly like the official files.
    """

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_str8(self, obj):
        b = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        if len(b) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(b)]) + b)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(b)) + b)
        self.memoize(obj)

    dispatch[str] = _save_str8
    dispatch[bytes] = _save_str8


def dump_py2(obj: Any, path: Path) -> None:
    with open(path, "wb") as fh:
        Py2Pickler(fh, protocol=2).dump(obj)


def write_cifar10(root: Path, per_batch: int = 2, n_test: int = 3, seed: int = 0) -> dict[str, dict]:
    """``root/cifar-10-batches-py`` with 5 train batches of ``per_batch`` images, a test batch and batches.meta."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = {}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        entry = {"batch_label": name, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, n)],
                 "filenames": [f"{name}_{i}.png" for i in range(n)]}
        dump_py2(entry, folder / name)
        batches[name] = entry
    dump_py2({"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": per_batch, "num_vis": 3072},
             folder / "batches.meta")
    return batches
