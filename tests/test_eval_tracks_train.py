"""Early in training, an LCNN's eval-mode accuracy tracks its training accuracy as the original model's does.

The failure this guards against: the gamma-Lipschitz BN clipped its gain with L from the (lagging) running
statistics while normalizing with the batch statistics, so during the first epochs training ran with the clip
off and gains far above gamma, and every eval-mode forward (running statistics, clip on) was at chance while
train accuracy was high. Both models are trained with the same recipe (SGD lr 0.1, momentum 0.9, weight decay
5e-4, batch 128) on scikit-learn's digits, and compared after each of the first two epochs.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lcnnify import lcnnify, param_groups
from lcnnify.data import digits
from lcnnify.models import create_model

#: how much further an LCNN's eval accuracy may fall below its train accuracy than the original model's
TOLERANCE = 0.10


def _train_and_track(model: nn.Module, lcnn: bool, epochs: int, seed: int) -> list[tuple[float, float]]:
    """(training-mode accuracy over the epoch's batches, eval-mode test accuracy) after each epoch."""
    train, test = digits(seed=0)
    (x_tr, y_tr), (x_te, y_te) = train.tensors, test.tensors
    opt = torch.optim.SGD(param_groups(model, 5e-4), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        model.train()
        correct = 0
        for idx in torch.randperm(len(y_tr), generator=gen).split(128):
            opt.zero_grad()
            logits = model(x_tr[idx])
            loss = F.cross_entropy(logits, y_tr[idx])
            if lcnn:
                loss = loss + model.curvature_penalty()
            loss.backward()
            opt.step()
            correct += (logits.argmax(1) == y_tr[idx]).sum().item()
        model.eval()
        with torch.no_grad():
            test_acc = (model(x_te).argmax(1) == y_te).float().mean().item()
        history.append((correct / len(y_tr), test_acc))
    return history


def _check_tracks(spec: str, epochs: int, seed: int) -> None:
    torch.manual_seed(seed)
    original = create_model(spec, num_classes=10, input_shape=(1, 8, 8))
    lcnn = lcnnify(original, example_inputs=torch.rand(8, 1, 8, 8))
    orig_hist = _train_and_track(original, lcnn=False, epochs=epochs, seed=seed)
    lcnn_hist = _train_and_track(lcnn, lcnn=True, epochs=epochs, seed=seed)
    for epoch, ((o_train, o_eval), (l_train, l_eval)) in enumerate(zip(orig_hist, lcnn_hist), start=1):
        orig_gap, lcnn_gap = o_train - o_eval, l_train - l_eval
        assert l_train > 0.4, f"epoch {epoch}: the LCNN does not learn (train accuracy {l_train:.3f})"
        assert lcnn_gap <= max(orig_gap, 0.0) + TOLERANCE, (
            f"{spec}, epoch {epoch}: LCNN eval accuracy {l_eval:.3f} vs train {l_train:.3f} (gap {lcnn_gap:.3f}); "
            f"original model: eval {o_eval:.3f} vs train {o_train:.3f} (gap {orig_gap:.3f})")


@pytest.mark.parametrize("seed", [0, 1])
def test_lcnn_eval_accuracy_tracks_train_accuracy_like_the_original_small_cnn(seed):
    _check_tracks("small_cnn", epochs=2, seed=seed)


@pytest.mark.slow
def test_lcnn_eval_accuracy_tracks_train_accuracy_like_the_original_timm_resnet18():
    pytest.importorskip("timm")
    _check_tracks("timm:resnet18", epochs=3, seed=1)
