"""The `lcnnify` command line: every command on tiny inputs, and every anticipated bad input gives a clear
`lcnnify: error:` message and a non-zero exit status -- never a traceback.

The CLI runs in-process (`main(argv)`) for speed; one subprocess checks `python -m lcnnify`.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lcnnify.testing.fake_data import write_cifar10

from lcnnify.cli import CHECKPOINT_FORMAT, main

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------- fake CIFAR-10 in the real format
def write_fake_cifar10(root: Path, per_batch: int = 4, n_test: int = 6, seed: int = 0) -> Path:
    write_cifar10(root, per_batch=per_batch, n_test=n_test, seed=seed)
    return root


# --------------------------------------------------------------------------------------------- commands
def test_python_dash_m_lcnnify_help_lists_every_command():
    res = subprocess.run([sys.executable, "-m", "lcnnify", "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    for cmd in ("demo", "convert", "train", "evaluate"):
        assert cmd in res.stdout


def test_help_and_version_exit_zero(capsys):
    code, out, _ = run(capsys, "train", "--help")
    assert code == 0 and "cifar-10-batches-py" in out  # the on-disk layouts are documented
    code, out, _ = run(capsys, "--version")
    assert code == 0 and "lcnnify" in out


def test_convert_timm_resnet18_prints_report_and_saves_checkpoint(capsys, tmp_path):
    out_file = tmp_path / "sub" / "converted.pt"
    code, out, err = run(capsys, "convert", "timm:resnet18", "--input-size", 3, 32, 32, "--num-classes", 10,
                         "--bound", "none", "--out", out_file)
    assert code == 0, err
    assert "LCNN conversion report" in out and "ConvSpectralNorm" in out and "CenteredSoftplus" in out
    assert "maxpool" in out  # what was left, with the reason
    assert "bound: n/a" in out
    ckpt = torch.load(out_file, weights_only=True)
    assert ckpt["format"] == CHECKPOINT_FORMAT and ckpt["model"] == "timm:resnet18"
    assert ckpt["num_classes"] == 10 and ckpt["input_size"] == [3, 32, 32]
    assert any("log_beta" in k for k in ckpt["state_dict"])


def test_convert_prints_the_data_free_bound(capsys):
    code, out, err = run(capsys, "convert", "small_cnn", "--input-size", 1, 8, 8)
    assert code == 0, err
    assert "bound:" in out and "certified" in out and "0.5 L^2 + sqrt(2) K" in out


def test_convert_torchvision_json(capsys):
    code, out, err = run(capsys, "convert", "torchvision:resnet18", "--input-size", 3, 32, 32, "--num-classes", 5,
                         "--bound", "none", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["report"]["converted_counts"]["conv"] == 20
    assert data["bound"]["available"] is False


def test_train_digits_then_evaluate_the_checkpoint(capsys, tmp_path):
    ckpt = tmp_path / "digits-lcnn.pt"
    code, out, err = run(capsys, "train", "--dataset", "digits", "--method", "lcnn", "--quick", "--no-progress",
                         "--out", ckpt)
    assert code == 0, err
    assert ckpt.is_file() and not (tmp_path / "digits-lcnn.pt.partial").exists()
    saved = torch.load(ckpt, weights_only=True)
    assert saved["method"] == "lcnn" and saved["dataset"] == "digits" and len(saved["history"]) == 1
    report = tmp_path / "eval.json"
    code, out, err = run(capsys, "evaluate", ckpt, "--quick", "--no-progress", "--json", report)
    assert code == 0, err
    for title in ("Table 1", "Table 2", "Table 3", "E||Hess f||", "eps=0.2"):
        assert title in out
    res = json.loads(report.read_text())
    assert res["method"] == "lcnn" and set(res["robust_accuracy"]) == {"0.05", "0.1", "0.15", "0.2"}
    assert res["geometry_test"]["curvature"]["mean"] > 0


def test_train_and_evaluate_cifar10_from_files_on_disk(capsys, tmp_path):
    root = write_fake_cifar10(tmp_path / "data")
    ckpt = tmp_path / "c10.pt"
    code, out, err = run(capsys, "train", "--dataset", "cifar10", "--data-dir", root, "--method", "standard",
                         "--epochs", 1, "--batch-size", 8, "--no-progress", "--out", ckpt)
    assert code == 0, err
    assert "20 train / 6 test" in out
    saved = torch.load(ckpt, weights_only=True)
    assert saved["input_size"] == [3, 32, 32] and saved["num_classes"] == 10
    code, out, err = run(capsys, "evaluate", ckpt, "--data-dir", root, "--quick", "--no-progress")
    assert code == 0, err
    assert "Table 1" in out


def test_train_flags_reach_the_recipe_the_penalty_and_the_checkpoint(capsys, tmp_path):
    root = write_fake_cifar10(tmp_path / "data")
    ckpt = tmp_path / "r18.pt"
    code, out, err = run(capsys, "train", "--model", "cifar_resnet18", "--width", 4, "--dataset", "cifar10",
                         "--data-dir", root, "--method", "lcnn+gradreg", "--epochs", 1, "--batch-size", 8,
                         "--lr", 0.05, "--momentum", 0.5, "--weight-decay", 1e-3, "--gradreg-weight", 0.25,
                         "--lambda-beta", 0.05, "--lambda-gamma", 0.02, "--no-progress", "--out", ckpt)
    assert code == 0, err
    saved = torch.load(ckpt, weights_only=True)
    cfg = saved["config"]
    assert (cfg["lr"], cfg["momentum"], cfg["weight_decay"], cfg["gradreg_weight"]) == (0.05, 0.5, 1e-3, 0.25)
    assert saved["lcnn_overrides"] == {"lambda_beta": 0.05, "lambda_gamma": 0.02}
    assert saved["model"] == "cifar_resnet18" and saved["width"] == 4
    rec = saved["history"][0]
    assert {"min", "median", "max"} == set(rec["beta"]) == set(rec["gamma"])
    # the evaluate path rebuilds the model with the same lambdas: its penalty is the one trained with
    from lcnnify.cli import load_checkpoint
    from lcnnify.nn import CenteredSoftplus, LipschitzBatchNorm

    model, _ = load_checkpoint(ckpt)
    betas = sum(float(m.beta.mean()) for m in model.modules() if isinstance(m, CenteredSoftplus))
    log_gammas = sum(float(m.log_gamma()) for m in model.modules() if isinstance(m, LipschitzBatchNorm))
    assert model.curvature_penalty().item() == pytest.approx(0.05 * betas + 0.02 * log_gammas, rel=1e-5)


def test_finetune_a_trained_checkpoint_into_an_lcnn(capsys, tmp_path):
    std = tmp_path / "std.pt"
    assert run(capsys, "train", "--dataset", "digits", "--method", "standard", "--quick", "--no-progress",
               "--out", std)[0] == 0
    ft = tmp_path / "ft.pt"
    code, out, err = run(capsys, "train", "--dataset", "digits", "--recipe", "finetune", "--init", std, "--quick",
                         "--out", ft)
    assert code == 0, err
    assert "recipe 'finetune'" in out and "lr 0.01" in out
    assert "fit[lcnn] epoch 1/1: loss" in err and "\r" not in err  # one plain line per epoch in a log
    saved = torch.load(ft, weights_only=True)
    assert saved["method"] == "lcnn" and saved["config"]["recipe"] == "finetune"
    assert saved["history"][0]["lr"] == 0.01
    code, out, err = run(capsys, "evaluate", ft, "--quick", "--no-progress")
    assert code == 0, err


def test_default_outputs_go_under_runs_not_the_working_directory(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "train", "--dataset", "digits", "--quick", "--no-progress")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    assert (tmp_path / "runs" / "digits-lcnn.pt").is_file()
    from lcnnify.cli import build_parser

    assert build_parser().parse_args(["demo"]).out == "runs/demo"
    assert "runs/" in (ROOT / ".gitignore").read_text().splitlines()


def test_a_fit_checkpoint_with_metadata_is_a_cli_checkpoint(capsys, tmp_path):
    # one format: what fit() writes after every epoch is what `lcnnify evaluate` reads
    from lcnnify.data import digits
    from lcnnify.models import create_model
    from lcnnify.train import fit

    train, test = digits()
    base = create_model("small_cnn", 10, (1, 8, 8), width=4)
    ckpt = tmp_path / "fit.pt"
    meta = {"model": "small_cnn", "dataset": "digits", "num_classes": 10, "input_size": [1, 8, 8], "width": 4,
            "lcnn_overrides": {}}
    fit(base, (train.tensors[0][:128], train.tensors[1][:128]), method="lcnn", epochs=1, batch_size=64,
        checkpoint=ckpt, checkpoint_meta=meta, progress=False)
    saved = torch.load(ckpt, weights_only=True)
    assert saved["format"] == CHECKPOINT_FORMAT and "training" in saved
    code, out, err = run(capsys, "evaluate", ckpt, "--quick", "--no-progress")
    assert code == 0, err
    assert "Table 1" in out


def test_evaluate_a_converted_but_untrained_checkpoint(capsys, tmp_path):
    ckpt = tmp_path / "c.pt"
    assert run(capsys, "convert", "small_cnn", "--bound", "none", "--out", ckpt)[0] == 0
    code, out, err = run(capsys, "evaluate", ckpt, "--dataset", "digits", "--quick", "--no-progress")
    assert code == 0, err
    assert "never trained" in out


# ------------------------------------------------------------------------------------------- bad inputs
def _file_under_file(tmp_path: Path) -> Path:
    f = tmp_path / "a_regular_file"
    f.write_text("x")
    return f / "out"


BAD = {
    "unknown timm model": (["convert", "timm:resnet_does_not_exist"], "unknown timm model"),
    "unknown torchvision model": (["convert", "torchvision:resnet18x"], "unknown torchvision"),
    "unknown model source": (["convert", "hub:resnet18"], "unknown model source"),
    "unknown bare model": (["train", "--dataset", "digits", "--model", "resnet18", "--quick"], "unknown model"),
    "input size with 2 numbers": (["convert", "timm:resnet18", "--input-size", "3", "32"], "3 numbers C H W"),
    "input size with a zero": (["convert", "timm:resnet18", "--input-size", "3", "0", "5"], "positive integer"),
    "input size channels last": (["convert", "timm:resnet18", "--input-size", "224", "224", "3"], "C H W"),
    "input size not a number": (["convert", "timm:resnet18", "--input-size", "3", "x", "5"], "invalid int"),
    "input size too small for the model": (["convert", "torchvision:alexnet", "--input-size", "3", "8", "8",
                                            "--bound", "none"], "does not accept inputs of size 3 8 8"),
    "missing data directory": (["train", "--dataset", "cifar10", "--data-dir", "{tmp}/nowhere", "--quick"],
                               "does not exist"),
    "data directory without the files": (["train", "--dataset", "cifar10", "--data-dir", "{tmp}", "--quick"],
                                         "cifar-10-batches-py"),
    "svhn files missing": (["train", "--dataset", "svhn", "--data-dir", "{tmp}", "--quick"], "train_32x32.mat"),
    "imagefolder without image size": (["train", "--dataset", "imagefolder", "--data-dir", "{tmp}"],
                                       "--image-size"),
    "unknown method": (["train", "--dataset", "digits", "--method", "magic"], "invalid choice"),
    "unwritable convert output (/proc)": (["convert", "small_cnn", "--out", "/proc/lcnnify/x.pt"], "cannot write"),
    "convert output under a regular file": (["convert", "small_cnn", "--out", "{file}/x.pt"],
                                            "is a file, not a directory"),
    "unwritable demo output": (["demo", "--quick", "--out", "/proc/lcnnify-demo"], "cannot write"),
    "demo output under a regular file": (["demo", "--quick", "--out", "{file}"], "is a file, not a directory"),
    "train checkpoint under a regular file": (["train", "--dataset", "digits", "--quick", "--out", "{file}/c.pt"],
                                              "is a file, not a directory"),
    "evaluate: missing checkpoint": (["evaluate", "{tmp}/missing.pt"], "no checkpoint file"),
    "evaluate: not a checkpoint": (["evaluate", "{textfile}"], "not a checkpoint"),
    "evaluate: unwritable json": (["evaluate", "{tmp}/missing.pt", "--json", "/proc/lcnnify/r.json"],
                                  "cannot write"),
    "demo: zero seeds": (["demo", "--quick", "--seeds", "0"], "positive integer"),
    "finetune without --init": (["train", "--dataset", "digits", "--recipe", "finetune", "--quick"],
                                "pass --init"),
    "init: missing file": (["train", "--dataset", "digits", "--init", "{tmp}/nothing.pt", "--quick"],
                           "no checkpoint file"),
    "init: weights of another model": (["train", "--dataset", "digits", "--init", "{tmp}/mlp_weights.pt",
                                        "--quick"], "do not fit small_cnn"),
    "lambda for a baseline method": (["train", "--dataset", "digits", "--method", "standard", "--lambda-beta",
                                      "0.1", "--quick"], "only apply to the 'lcnn' methods"),
    "negative lambda": (["train", "--dataset", "digits", "--lambda-beta", "-1"], "a number >= 0"),
    "vgg11 on 8x8 digits (five halvings)": (["train", "--dataset", "digits", "--model", "cifar_vgg11", "--quick"],
                                            "does not accept inputs of size 1 8 8"),
    "no command": ([], "required"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_gives_a_clear_message_and_nonzero_exit(case, capsys, tmp_path):
    argv, expected = BAD[case]
    textfile = tmp_path / "notes.txt"
    textfile.write_text("this is not a checkpoint")
    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "mlp_weights.pt")
    subs = {"{tmp}": str(tmp_path), "{file}": str(_file_under_file(tmp_path)), "{textfile}": str(textfile)}
    args = []
    for a in argv:
        for k, v in subs.items():
            a = a.replace(k, v)
        args.append(a)
    code, out, err = run(capsys, *args)
    assert code != 0
    assert "Traceback" not in err and "Traceback" not in out
    assert "error:" in err
    assert expected in err, err


def test_only_the_demo_command_imports_the_demo():
    import ast

    def imports_demo(node) -> bool:
        return isinstance(node, ast.ImportFrom) and (
            (node.level == 1 and (node.module or "").split(".")[0] == "demo")
            or (node.module or "").startswith("lcnnify.demo"))

    tree = ast.parse((ROOT / "lcnnify" / "cli.py").read_text())
    importers = [top.name if isinstance(top, ast.FunctionDef) else "<module>"
                 for top in tree.body for node in ast.walk(top) if imports_demo(node)]
    assert importers == ["cmd_demo"], importers


def test_unexpected_errors_still_show_a_traceback(monkeypatch):
    import lcnnify.cli as cli

    def boom(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "cmd_convert", boom)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["convert", "small_cnn"])


def test_input_size_check_keeps_every_submodules_mode():
    # the check runs the model once in eval mode; afterwards a BatchNorm the user froze with bn.eval() inside a
    # training model is still frozen (model.train(was) would have put it back in train mode), and nothing else
    # changed: modes, running statistics
    from lcnnify.cli import _check_accepts

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.BatchNorm2d(4)))
    model.train()
    model[1].eval()
    model[3][0].eval()
    before = [m.training for m in model.modules()]
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    _check_accepts(model, "custom", (3, 8, 8))
    assert [m.training for m in model.modules()] == before
    assert all(torch.equal(stats[k], v) for k, v in model.state_dict().items())
    assert before == [True, True, False, True, True, False, True]  # the frozen layers really were frozen
