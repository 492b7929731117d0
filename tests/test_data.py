"""lcnnify.data: embedded datasets and on-disk loaders, with tiny fake files in the real on-disk formats."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from lcnnify.testing.fake_data import dump_py2, write_cifar10

from lcnnify.data import digits, input_shape, load_dataset, num_classes, two_moons
from lcnnify.errors import DatasetNotFoundError, LCNNError


# ------------------------------------------------------------------------------------ embedded
def test_two_moons_shapes_labels_split_and_determinism():
    Xtr, ytr, Xte, yte = two_moons(n=200, noise=0.1, seed=3)
    assert Xtr.shape == (150, 2) and Xte.shape == (50, 2)
    assert Xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert set(ytr.tolist()) == {0, 1} and ytr.sum() == 75 and yte.sum() == 25  # stratified
    again = two_moons(n=200, noise=0.1, seed=3)
    assert all(torch.equal(a, b) for a, b in zip((Xtr, ytr, Xte, yte), again))
    assert not torch.equal(two_moons(n=200, noise=0.1, seed=4)[0], Xtr)


def test_digits_shapes_range_stratification_and_determinism():
    train, test = digits(seed=0, test_fraction=0.25)
    xtr, ytr = train.tensors
    xte, yte = test.tensors
    assert len(train) + len(test) == 1797 and len(test) == 450
    assert xtr.shape[1:] == (1, 8, 8) and xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert xtr.min() == 0 and xtr.max() == 1 and xte.min() >= 0 and xte.max() <= 1
    # 17 gray levels: k / 16
    assert torch.allclose(xtr * 16, (xtr * 16).round())
    # stratified: every class has the same share (within one sample) in both splits
    all_counts = torch.bincount(torch.cat([ytr, yte]), minlength=10).double()
    test_counts = torch.bincount(yte, minlength=10).double()
    assert ((test_counts - 0.25 * all_counts).abs() <= 1).all()
    train2, test2 = digits(seed=0, test_fraction=0.25)
    assert torch.equal(train2.tensors[0], xtr) and torch.equal(test2.tensors[1], yte)
    assert not torch.equal(digits(seed=1)[1].tensors[1], yte)


def test_digits_upsampled_keeps_range_and_labels():
    train8, _ = digits()
    train16, test16 = digits(image_size=16)
    assert train16.tensors[0].shape[1:] == (1, 16, 16)
    assert train16.tensors[0].min() >= 0 and train16.tensors[0].max() <= 1
    assert torch.equal(train16.tensors[1], train8.tensors[1])
    assert input_shape("digits", 16) == (1, 16, 16)


def test_load_dataset_digits_and_helpers():
    ds = load_dataset("digits", train=False)
    x, y = ds[0]
    assert x.shape == (1, 8, 8) and len(ds) == 450
    assert num_classes("digits") == 10 and num_classes("cifar100") == 100 and num_classes("two_moons") == 2
    assert input_shape("cifar10") == (3, 32, 32) and input_shape("two_moons") == (2,)
    with pytest.raises(ValueError):
        load_dataset("mnist")
    with pytest.raises(ValueError):
        input_shape("imagefolder")


# ------------------------------------------------------------------------------------- on disk
def test_load_cifar10_from_real_format_files(tmp_path):
    batches = write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as fh:  # the real files' format
        assert set(pickle.load(fh, encoding="bytes")) >= {b"data", b"labels"}
    train = load_dataset("cifar10", tmp_path, train=True)
    test = load_dataset("cifar10", tmp_path, train=False)
    assert len(train) == 10 and len(test) == 3
    x, y = test[1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    raw = batches["test_batch"]["data"][1].reshape(3, 32, 32)
    torch.testing.assert_close(x, torch.from_numpy(raw).float() / 255)
    assert y == batches["test_batch"]["labels"][1]
    assert train.classes[3] == "c3"
    aug = load_dataset("cifar10", tmp_path, train=True, augment=True)
    assert aug[0][0].shape == (3, 32, 32)
    resized = load_dataset("cifar10", tmp_path, train=False, image_size=16)
    assert resized[0][0].shape == (3, 16, 16)


def test_load_cifar100_from_real_format_files(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in [("train", 4), ("test", 2)]:
        dump_py2({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                   "fine_labels": [int(v) for v in rng.integers(0, 100, n)], "coarse_labels": [0] * n},
                  folder / name)
    dump_py2({"fine_label_names": [f"f{i}" for i in range(100)],
               "coarse_label_names": [f"g{i}" for i in range(20)]}, folder / "meta")
    ds = load_dataset("cifar100", tmp_path, train=True)
    assert len(ds) == 4 and ds[0][0].shape == (3, 32, 32) and 0 <= ds[0][1] < 100


def test_load_svhn_from_real_format_mat(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(2)
    n = 5
    X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
    y = np.array([[1], [10], [3], [10], [9]], dtype=np.uint8)  # SVHN stores digit 0 as label 10
    savemat(tmp_path / "test_32x32.mat", {"X": X, "y": y})
    ds = load_dataset("svhn", tmp_path, train=False)
    assert len(ds) == n
    x1, y1 = ds[1]
    assert y1 == 0 and ds[0][1] == 1 and ds[4][1] == 9
    assert x1.shape == (3, 32, 32)
    torch.testing.assert_close(x1, torch.from_numpy(X[:, :, :, 1]).permute(2, 0, 1).float() / 255)
    with pytest.raises(DatasetNotFoundError, match="train_32x32.mat"):
        load_dataset("svhn", tmp_path, train=True)


def test_load_imagefolder_from_pngs(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    for split, n in [("train", 2), ("val", 1)]:
        for cls in ("ant", "bee", "cat"):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                size = (10 + i, 12)  # different sizes on purpose
                arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    train = load_dataset("imagefolder", tmp_path, train=True, image_size=8, augment=True)
    val = load_dataset("imagefolder", tmp_path, train=False, image_size=8)
    assert len(train) == 6 and len(val) == 3
    assert train.classes == ["ant", "bee", "cat"] and num_classes("imagefolder", tmp_path) == 3
    x, y = val[2]
    assert x.shape == (3, 8, 8) and y == 2 and 0 <= x.min() and x.max() <= 1


@pytest.mark.parametrize("name, expected", [
    ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("svhn", "train_32x32.mat"),
    ("imagefolder", "train"),
])
def test_missing_files_raise_clear_error(tmp_path, name, expected):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, tmp_path / "nowhere", train=True)
    msg = str(info.value)
    assert expected in msg and str(tmp_path / "nowhere") in msg
    assert isinstance(info.value, LCNNError)


def test_partially_missing_cifar_lists_the_missing_files(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_4"):
        load_dataset("cifar10", tmp_path, train=True)
    assert len(load_dataset("cifar10", tmp_path, train=False)) == 3  # the test split is complete
