"""Properties of lcnnify.train: the paper's recipe (schedule, parameter groups, losses), bit-for-bit resume,
adversarial training, and the documented user loop."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from lcnnify.testing.models import TinyCNN
from lcnnify.data import digits
from lcnnify.metrics import pgd_l2
from lcnnify.nn import CenteredSoftplus, LipschitzBatchNorm
from lcnnify.penalty import curvature_parameters
from lcnnify.train import (
    METHODS,
    fit,
    method_loss,
    prepare_model,
    recipe_milestones,
    recipe_optimizer,
    recipe_scheduler,
)

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = ("seconds", "seconds_per_step", "eval_seconds")


@pytest.fixture(scope="module")
def small_digits():
    """A 256/96-sample slice of scikit-learn's digits (8x8, in [0, 1])."""
    train, test = digits()
    (x, y), (xt, yt) = train.tensors, test.tensors
    return (x[:256], y[:256]), (xt[:96], yt[:96])


def separable_images(n: int = 128, seed: int = 0):
    """Class 0: bright top half, class 1: bright bottom half (plus noise), in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = 0.2 * torch.rand(n, 1, 8, 8, generator=g)
    x[y == 0, :, :4] += 0.7
    x[y == 1, :, 4:] += 0.7
    return x.clamp(0, 1), y


def tiny_cnn(seed: int = 0, classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return TinyCNN(classes=classes, c=4)


def without_timing(history):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in history]


# ------------------------------------------------------------------------------------------- the recipe
@pytest.mark.parametrize("epochs, milestones", [(200, [150, 175]), (8, [6, 7])])
def test_schedule_decays_lr_tenfold_at_75_and_87_5_percent_of_the_epochs(epochs, milestones):
    assert recipe_milestones(epochs) == milestones
    model = nn.Linear(2, 2)
    opt = recipe_optimizer(model)
    sched = recipe_scheduler(opt, epochs)
    lrs = []
    for _ in range(epochs):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    a, b = milestones
    expected = [0.1] * a + [0.01] * (b - a) + [0.001] * (epochs - b)
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert opt.param_groups[0]["momentum"] == 0.9


def test_param_groups_exclude_beta_and_gamma_from_weight_decay():
    model = prepare_model(tiny_cnn(), "lcnn", example_inputs=torch.rand(2, 1, 8, 8))
    opt = recipe_optimizer(model, weight_decay=5e-4)
    special = {id(p) for p in curvature_parameters(model)}
    assert special, "the LCNN has beta/gamma parameters"
    n_betas = sum(isinstance(m, CenteredSoftplus) for m in model.modules())
    n_bns = sum(isinstance(m, LipschitzBatchNorm) for m in model.modules())
    assert len(special) == n_betas + n_bns
    for group in opt.param_groups:
        ids = {id(p) for p in group["params"]}
        if group["weight_decay"] == 0.0:
            assert ids == special
        else:
            assert group["weight_decay"] == 5e-4 and not ids & special
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_prepare_model_builds_each_methods_model_without_mutating_the_base():
    base = tiny_cnn()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    std = prepare_model(base, "standard")
    wd = prepare_model(base, "softplus+wd")
    lc = prepare_model(base, "lcnn", example_inputs=torch.rand(2, 1, 8, 8))
    assert [m.beta for m in std.modules() if isinstance(m, nn.Softplus)] == [1e3, 1e3]
    assert [m.beta for m in wd.modules() if isinstance(m, nn.Softplus)] == [10.0, 10.0]
    assert hasattr(lc, "lcnn_report") and callable(lc.curvature_penalty)
    again = prepare_model(lc, "lcnn")  # an LCNN is used as it is (copied), not converted twice
    assert again is not lc and sum(isinstance(m, CenteredSoftplus) for m in again.modules()) == 2
    assert all(isinstance(m, nn.ReLU) for m in base.modules() if isinstance(m, (nn.ReLU, nn.Softplus)))
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    with pytest.raises(ValueError, match="already an LCNN"):
        prepare_model(lc, "standard")


def test_bad_method_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as info:
        fit(tiny_cnn(), separable_images(), method="lcnn_gradreg", epochs=1, progress=False)
    for m in METHODS:
        assert repr(m) in str(info.value)


def test_method_loss_terms_add_up_to_the_total():
    x, y = separable_images(16)
    model = prepare_model(tiny_cnn(classes=2), "lcnn+gradreg", example_inputs=x[:2])
    out = method_loss(model, x, y, "lcnn+gradreg", gradreg_weight=0.5)
    t = out.terms
    assert t["total_loss"] == pytest.approx(t["loss"] + t["curvature_penalty"] + 0.5 * t["gradreg"], rel=1e-5)
    assert out.total.requires_grad and out.logits.shape == (16, 2)


# ----------------------------------------------------------------------------------------------- fit
def test_every_method_trains_one_epoch_and_logs_its_penalty_terms(small_digits, tmp_path):
    train, test = small_digits
    expected_terms = {"standard": set(), "softplus+wd": set(), "adversarial": set(),
                      "lcnn": {"curvature_penalty"}, "gradreg": {"gradreg"},
                      "lcnn+gradreg": {"curvature_penalty", "gradreg"}, "cure": {"cure"}}
    for method in METHODS:
        path = tmp_path / f"{method}.json"
        result = fit(tiny_cnn(), train, test, method=method, epochs=1, batch_size=64, progress=False,
                     history_path=path)
        (rec,) = result.history
        terms = {"curvature_penalty", "gradreg", "cure"} & set(rec)
        assert terms == expected_terms[method], method
        for key in ("epoch", "lr", "loss", "total_loss", "train_acc", "test_acc", "seconds", "seconds_per_step"):
            assert rec[key] is not None, (method, key)
        assert rec["epoch"] == 1 and rec["lr"] == 0.1 and rec["steps"] == 4
        assert 0.0 <= rec["test_acc"] <= 1.0 and rec["seconds_per_step"] > 0
        saved = json.loads(path.read_text())
        assert saved["method"] == method and saved["history"][0]["loss"] == pytest.approx(rec["loss"])
        if method in ("gradreg", "lcnn+gradreg"):
            assert saved["config"]["gradreg_weight"] == pytest.approx(1e-3 * 1e5 / 64 ** 2)


@pytest.mark.parametrize("method", ["standard", "lcnn"])
def test_loss_decreases_on_a_separable_problem(method):
    data = separable_images(128)
    result = fit(tiny_cnn(classes=2), data, data, method=method, epochs=4, batch_size=32, lr=0.05,
                 progress=False)
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < 0.5 * losses[0], losses
    # train_acc: in eval mode the BatchNorm running statistics still lag after 16 steps (momentum 0.1)
    assert result.history[-1]["train_acc"] >= 0.95


def test_fit_does_not_mutate_the_users_model():
    base = tiny_cnn(classes=2)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    result = fit(base, separable_images(64), method="lcnn", epochs=1, batch_size=32, progress=False)
    assert result.model is not base
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


@pytest.mark.parametrize("method", ["lcnn+gradreg", "adversarial"])
def test_resuming_from_a_checkpoint_continues_bit_for_bit(method, small_digits, tmp_path):
    train, test = small_digits
    kw = dict(method=method, epochs=4, batch_size=64, progress=False, seed=7)
    straight = fit(tiny_cnn(), train, test, **kw)

    ckpt = tmp_path / "run.pt"
    first = fit(tiny_cnn(), train, test, checkpoint=ckpt, callback=lambda rec: rec["epoch"] == 2, **kw)
    assert len(first.history) == 2 and ckpt.exists()
    # a fresh process would rebuild the model from scratch: a differently initialised base must not matter
    resumed = fit(tiny_cnn(seed=123), train, test, checkpoint=ckpt, **kw)
    assert resumed.resumed_from == 2 and len(resumed.history) == 4

    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert without_timing(straight.history) == without_timing(resumed.history)

    # a finished checkpoint returns at once; different recipe settings refuse to resume
    done = fit(tiny_cnn(), train, test, checkpoint=ckpt, **kw)
    assert done.resumed_from == 4 and without_timing(done.history) == without_timing(straight.history)
    with pytest.raises(ValueError, match="epochs=4"):
        fit(tiny_cnn(), train, test, checkpoint=ckpt, **{**kw, "epochs": 5})


def test_adversarial_training_lowers_the_pgd_success_rate():
    # Low-contrast digits (pixels in [0.4, 0.6]): a standard model needs large input gradients, so l2 PGD at
    # eps = 0.1 flips about half of its correct test predictions; adversarial training (eps 0.1, 3 steps)
    # roughly halves that (measured over seeds 0-2: 0.48-0.60 vs 0.29-0.31).
    train, test = digits()
    low = lambda x: 0.4 + 0.2 * x  # noqa: E731
    (x, y), (xt, yt) = train.tensors, test.tensors
    x, xt = low(x), low(xt)

    def success_rate(model):
        model.eval()
        with torch.no_grad():
            ok = model(xt).argmax(1) == yt
        x_adv = pgd_l2(model, xt[ok], yt[ok], 0.1, steps=10, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            flipped = model(x_adv).argmax(1) != yt[ok]
        return ok.float().mean().item(), flipped.float().mean().item()

    rates = {}
    for method in ("standard", "adversarial"):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
        result = fit(net, (x, y), None, method=method, epochs=4, batch_size=64, progress=False, seed=0)
        rates[method] = success_rate(result.model)
    (acc_std, succ_std), (acc_adv, succ_adv) = rates["standard"], rates["adversarial"]
    assert acc_std > 0.85 and acc_adv > 0.85, rates
    assert succ_adv < succ_std - 0.08, rates


# ------------------------------------------------------------------------------------ documented loop
def _documented_loops() -> list[str]:
    blocks = []
    for name in ("docs/TRAINING_LOOP.md", "README.md"):
        path = ROOT / name
        if path.exists():
            for block in re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S):
                if "curvature_penalty()" in block and "param_groups" in block and "for epoch in" in block:
                    blocks.append(block)
    return blocks


def test_the_documented_training_loop_runs():
    blocks = _documented_loops()
    assert blocks, "the 20-line training loop is documented in docs/TRAINING_LOOP.md or README.md"
    x, y = separable_images(64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=True)
    for block in blocks:
        code_lines = [ln for ln in block.splitlines() if ln.strip()]
        assert len(code_lines) <= 20, len(code_lines)
        assert "for epoch in range(200):" in block
        namespace = {"base_model": tiny_cnn(classes=2), "train_loader": loader, "test_loader": loader}
        exec(compile(block.replace("range(200)", "range(1)"), "<documented loop>", "exec"), namespace)
        model = namespace["model"]
        assert hasattr(model, "lcnn_report")
        assert namespace["sched"].last_epoch == 1


@pytest.mark.parametrize("mode", ["eval", "current"])
def test_cure_mode_reaches_the_penalty(small_digits, mode):
    from lcnnify.regularizers import cure_penalty
    from lcnnify.train import method_loss

    (x, y), _ = small_digits
    torch.manual_seed(0)
    model = TinyCNN(classes=10, c=4).train()
    out = method_loss(model, x[:16], y[:16], "cure", cure_mode=mode)
    assert model.training
    expected = cure_penalty(model, x[:16], y[:16], mode=mode).item()
    assert out.terms["cure"] == pytest.approx(expected, rel=1e-4)
    other = cure_penalty(model, x[:16], y[:16], mode="current" if mode == "eval" else "eval").item()
    assert out.terms["cure"] != pytest.approx(other, rel=1e-3)  # the two modes really differ here
