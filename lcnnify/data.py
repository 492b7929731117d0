"""Datasets for the experiments. Nothing is ever downloaded.

* Embedded (scikit-learn, no files): :func:`two_moons` (paper Fig. 1) and :func:`digits` (1797 8x8 digits).
* From disk, through ``torchvision.datasets`` with ``download=False``: CIFAR-10, CIFAR-100, SVHN and any
  ``ImageFolder`` tree (:func:`load_dataset`). Missing files raise :class:`~lcnnify.errors.DatasetNotFoundError`,
  whose message says where to put which files.

Images come out as float tensors in [0, 1] (``ToTensor`` only), as in the reference implementation:
normalization (mean/std), if wanted, belongs *inside the model* (e.g. a first ``Normalize`` layer), so that the
measured gradients, curvature and the l2 PGD radii (0.05 ... 0.2) all refer to the [0, 1] pixel scale.
The standard augmentation (random crop with padding + horizontal flip) is optional for training sets.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from lcnnify.errors import DatasetNotFoundError

__all__ = ["two_moons", "digits", "load_dataset", "num_classes", "input_shape", "DATASETS", "DATA_DIR_ENV"]

#: Names accepted by :func:`load_dataset`.
DATASETS = ("digits", "cifar10", "cifar100", "svhn", "imagefolder")
#: Environment variable read when ``data_dir`` is not given (default ``./data``).
DATA_DIR_ENV = "LCNNIFY_DATA_DIR"

_NUM_CLASSES = {"two_moons": 2, "digits": 10, "cifar10": 10, "cifar100": 100, "svhn": 10}

_CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
_SVHN_URL = "http://ufldl.stanford.edu/housenumbers/{split}_32x32.mat"


# --------------------------------------------------------------------------------------- embedded sets
def two_moons(n: int = 1000, noise: float = 0.1, seed: int = 0, test_fraction: float = 0.25
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two-moons toy problem (paper Fig. 1): ``(X_train, y_train, X_test, y_test)``.

    ``n`` points in total from ``sklearn.datasets.make_moons(noise=noise, random_state=seed)``, split
    stratified (``test_fraction`` of them for the test set) with the same seed. ``X`` is float32 ``(m, 2)``
    (raw coordinates, roughly [-1, 2] x [-0.5, 1]), ``y`` int64 in {0, 1}. Deterministic for a given seed.
    """
    from sklearn.datasets import make_moons
    from sklearn.model_selection import train_test_split

    if n < 4:
        raise ValueError(f"two_moons needs n >= 4, got {n}")
    X, y = make_moons(n_samples=n, noise=noise, random_state=seed)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=test_fraction, random_state=seed, stratify=y)
    f = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    i = lambda a: torch.as_tensor(a, dtype=torch.int64)  # noqa: E731
    return f(Xtr), i(ytr), f(Xte), i(yte)


def digits(seed: int = 0, test_fraction: float = 0.25, image_size: int = 8
           ) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's handwritten digits (1797 images, 8x8, 17 gray levels 0..16), no download needed.

    Returns ``(train, test)`` ``TensorDataset``s of ``(image, label)``: images float32 ``(N, 1, s, s)`` scaled
    to [0, 1] (``/ 16``), labels int64 in 0..9. The split is stratified by class with ``seed``
    (deterministic). ``image_size`` other than 8 upsamples bilinearly (e.g. 16 or 32 for conv nets whose
    down-sampling needs a larger input); bilinear interpolation is a convex combination, so the range stays
    [0, 1].
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0
    labels = bunch.target.astype(np.int64)
    idx = np.arange(len(labels))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=labels)
    x = torch.from_numpy(images).unsqueeze(1)
    if image_size != 8:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear",
                                            align_corners=False).clamp_(0.0, 1.0)
    y = torch.from_numpy(labels)
    tr_t, te_t = torch.from_numpy(np.sort(tr)), torch.from_numpy(np.sort(te))
    return TensorDataset(x[tr_t], y[tr_t]), TensorDataset(x[te_t], y[te_t])


# ------------------------------------------------------------------------------------------- on disk
def _data_dir(data_dir: str | os.PathLike | None) -> Path:
    return Path(data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV, "data")).expanduser()


def _missing(root: Path, names: list[str]) -> list[str]:
    return [n for n in names if not (root / n).is_file()]


def _transform(train: bool, augment: bool, image_size: int | None, native: int | None, flip: bool = True):
    from torchvision import transforms as T

    ops: list[Any] = []
    if image_size is not None and image_size != native:
        ops.append(T.Resize((image_size, image_size), antialias=True))
    size = image_size if image_size is not None else native
    if train and augment:
        if size is not None:
            ops.append(T.RandomCrop(size, padding=max(1, round(size / 8))))  # 32 -> padding 4
        if flip:
            ops.append(T.RandomHorizontalFlip())
    ops.append(T.ToTensor())
    return T.Compose(ops)


_LOCAL_CLASSES: dict[str, type] = {}


def _local_cifar(name: str) -> type:
    """torchvision CIFAR10/100 without the md5 checks (presence is checked by us; md5 optional)."""
    if name not in _LOCAL_CLASSES:
        from torchvision.datasets import CIFAR10, CIFAR100

        base = CIFAR10 if name == "cifar10" else CIFAR100

        def _check_integrity(self) -> bool:  # noqa: ARG001
            return True

        def _load_meta(self) -> None:
            path = os.path.join(self.root, self.base_folder, self.meta["filename"])
            with open(path, "rb") as fh:
                data = pickle.load(fh, encoding="latin1")
            self.classes = data[self.meta["key"]]
            self.class_to_idx = {c: i for i, c in enumerate(self.classes)}

        _LOCAL_CLASSES[name] = type(f"Local{base.__name__}", (base,),
                                    {"_check_integrity": _check_integrity, "_load_meta": _load_meta})
    return _LOCAL_CLASSES[name]


def _local_svhn() -> type:
    if "svhn" not in _LOCAL_CLASSES:
        from torchvision.datasets import SVHN

        _LOCAL_CLASSES["svhn"] = type("LocalSVHN", (SVHN,), {"_check_integrity": lambda self: True})
    return _LOCAL_CLASSES["svhn"]


def _load_cifar(name: str, root: Path, train: bool, transform, verify_md5: bool) -> Dataset:
    if name == "cifar10":
        folder, files, meta, url = ("cifar-10-batches-py",
                                    [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"],
                                    "batches.meta", _CIFAR10_URL)
    else:
        folder, files, meta, url = "cifar-100-python", ["train" if train else "test"], "meta", _CIFAR100_URL
    missing = _missing(root / folder, files + [meta])
    if missing:
        raise DatasetNotFoundError(
            f"{name}: missing {', '.join(missing)} in {root / folder}. Put the python-version batches there: "
            f"{root / folder}/{{{', '.join(files + [meta])}}} -- i.e. extract {url.rsplit('/', 1)[-1]} "
            f"({url}) into {root} (lcnnify never downloads). Pass data_dir=... or set ${DATA_DIR_ENV}.")
    if verify_md5:
        from torchvision.datasets import CIFAR10, CIFAR100

        cls = CIFAR10 if name == "cifar10" else CIFAR100
    else:
        cls = _local_cifar(name)
    try:
        return cls(str(root), train=train, transform=transform, download=False)
    except RuntimeError as exc:  # md5 mismatch (verify_md5=True)
        raise DatasetNotFoundError(f"{name} files in {root / folder} are corrupted or not the official "
                                   f"ones ({exc}); re-extract {url}") from exc


def _load_svhn(root: Path, train: bool, transform, verify_md5: bool) -> Dataset:
    split = "train" if train else "test"
    fname = f"{split}_32x32.mat"
    if not (root / fname).is_file():
        raise DatasetNotFoundError(
            f"svhn: missing {root / fname}. Put the cropped-digits file {fname} "
            f"({_SVHN_URL.format(split=split)}) directly in {root} (lcnnify never downloads). "
            f"Pass data_dir=... or set ${DATA_DIR_ENV}.")
    if verify_md5:
        from torchvision.datasets import SVHN as cls
    else:
        cls = _local_svhn()
    try:
        return cls(str(root), split=split, transform=transform, download=False)
    except RuntimeError as exc:
        raise DatasetNotFoundError(f"svhn file {root / fname} is corrupted or not the official one ({exc})") from exc


def _imagefolder_split(root: Path, train: bool) -> Path:
    candidates = ["train"] if train else ["val", "test"]
    for c in candidates:
        if (root / c).is_dir():
            return root / c
    raise DatasetNotFoundError(
        f"imagefolder: no {' or '.join(repr(c) for c in candidates)} directory in {root}. Expected the "
        f"torchvision ImageFolder layout {root}/{candidates[0]}/<class_name>/<image>.png|jpg ... "
        f"(one sub-directory per class; the test split may be called 'val' or 'test').")


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *, train: bool = True,
                 image_size: int | None = None, augment: bool = False, verify_md5: bool = False) -> Dataset:
    """A dataset of ``(image in [0, 1] as float tensor (C, H, W), int label)`` pairs.

    Args:
        name: one of ``digits``, ``cifar10``, ``cifar100``, ``svhn``, ``imagefolder``.
        data_dir: root directory (default ``$LCNNIFY_DATA_DIR`` or ``./data``); expected layout:
            ``cifar10``: ``DIR/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``;
            ``cifar100``: ``DIR/cifar-100-python/{train, test, meta}``;
            ``svhn``: ``DIR/train_32x32.mat`` and ``DIR/test_32x32.mat``;
            ``imagefolder``: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (or ``DIR/test``).
            ``digits`` needs no files (embedded in scikit-learn; fixed split, ``seed=0``).
        train: training split (else test/val split).
        image_size: resize to ``image_size x image_size`` (default: native size; ImageFolder images are then
            left at their own size, so give it when they differ).
        augment: for training splits, the standard augmentation: random crop with padding ``size/8``
            (4 for 32x32) and a random horizontal flip. SVHN gets the crop but no flip (digits are not
            mirror-symmetric; the reference implementation flips SVHN too). Ignored for ``digits``
            (a TensorDataset) and for test splits.
        verify_md5: also check torchvision's md5 sums of the CIFAR/SVHN files (slow; off by default -- only
            the presence of the files is checked).

    Raises:
        DatasetNotFoundError: the files are not there; the message names the directory and the files.
        ValueError: unknown name.
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if key == "digits":
        return digits(image_size=image_size or 8)[0 if train else 1]
    if key == "imagefolder" and data_dir is None and DATA_DIR_ENV not in os.environ:
        raise DatasetNotFoundError("imagefolder needs data_dir=... (a directory holding train/ and val/ or test/)")
    root = _data_dir(data_dir)
    if key in ("cifar10", "cifar100"):
        return _load_cifar(key, root, train, _transform(train, augment, image_size, 32), verify_md5)
    if key == "svhn":
        return _load_svhn(root, train, _transform(train, augment, image_size, 32, flip=False), verify_md5)
    from torchvision.datasets import ImageFolder

    split_dir = _imagefolder_split(root, train)
    try:
        return ImageFolder(str(split_dir), transform=_transform(train, augment, image_size, None))
    except FileNotFoundError as exc:  # no class folders / no images
        raise DatasetNotFoundError(
            f"imagefolder: {split_dir} holds no class directories with images ({exc}). Expected "
            f"{split_dir}/<class_name>/<image>.png|jpg ...") from exc


def num_classes(name: str, data_dir: str | os.PathLike | None = None) -> int:
    """Number of classes of a dataset (``imagefolder``: the class directories of ``data_dir/train``)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key == "twomoons":
        key = "two_moons"
    if key in _NUM_CLASSES:
        return _NUM_CLASSES[key]
    if key == "imagefolder":
        split_dir = _imagefolder_split(_data_dir(data_dir), True)
        return sum(1 for p in split_dir.iterdir() if p.is_dir())
    raise ValueError(f"unknown dataset {name!r}; choose one of two_moons, {', '.join(DATASETS)}")


def input_shape(name: str, image_size: int | None = None) -> tuple[int, ...]:
    """Shape of one input without the batch dimension, e.g. ``(3, 32, 32)`` for CIFAR, ``(2,)`` for two moons.

    ``image_size`` overrides the spatial size (required for ``imagefolder``, which has no native size).
    """
    key = name.lower().replace("-", "").replace("_", "")
    if key == "twomoons":
        return (2,)
    if key == "digits":
        s = image_size or 8
        return (1, s, s)
    if key in ("cifar10", "cifar100", "svhn"):
        s = image_size or 32
        return (3, s, s)
    if key == "imagefolder":
        if image_size is None:
            raise ValueError("input_shape('imagefolder') needs image_size (ImageFolder images have no native size)")
        return (3, image_size, image_size)
    raise ValueError(f"unknown dataset {name!r}; choose one of two_moons, {', '.join(DATASETS)}")
