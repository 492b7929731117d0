"""Every Python block and every command line of the README runs as written.

Python blocks run one by one in a fresh namespace; the only inputs supplied are the ones the README calls
"yours" (``base_model``, ``train_loader``, ``test_loader`` of the training-loop block, whose 200 epochs become
1). Command lines run in-process through ``lcnnify.cli.main`` in one temporary working directory, in README
order, so a later line reads what an earlier one wrote (convert -> evaluate, train -> finetune -> evaluate).
Two substitutions, both documented here: ``DIR`` (a dataset directory the README asks the user to provide) is
a fake CIFAR-10 written by ``lcnnify.testing`` and a line that trains for more than a few epochs gets
``--quick`` (1 epoch, a few samples); ``lcnnify demo`` (minutes) is covered by tests/test_demo.py.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _cli_lines() -> list[str]:
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        lines += [ln.strip() for ln in block.splitlines() if ln.strip().startswith("lcnnify ")]
    return lines


def test_readme_has_the_blocks_this_test_runs():
    assert len(_python_blocks()) >= 4
    assert any(ln.startswith("lcnnify convert") for ln in _cli_lines())
    assert any(ln.startswith("lcnnify evaluate") for ln in _cli_lines())


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_block_runs(index, capsys):
    pytest.importorskip("timm")
    from lcnnify.testing.models import TinyCNN

    block = _python_blocks()[index]
    namespace: dict = {}
    if "base_model" in block:  # the training loop: the user's model and loaders
        x = torch.rand(32, 1, 8, 8)
        y = torch.randint(0, 10, (32,))
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
        namespace.update(base_model=TinyCNN(classes=10, c=4), train_loader=loader, test_loader=loader)
        block = block.replace("range(200)", "range(1)")
    import lcnnify.ops

    before = list(lcnnify.ops.registry())
    try:
        exec(compile(block, f"README.md python block {index}", "exec"), namespace)
    finally:  # a block may register an activation: leave the registry as it was
        for spec in list(lcnnify.ops.registry()):
            if spec not in before:
                lcnnify.ops.unregister(spec)
    if "lcnnify(timm.create_model" in block:
        assert namespace["model"].lcnn_report.converted_counts["conv"] == 20
        assert "LCNN conversion report" in capsys.readouterr().out


@pytest.mark.parametrize("needs_dataset_dir", [
    False, pytest.param(True, marks=pytest.mark.slow)])  # the CIFAR lines train a full ResNet-18: minutes on CPU
def test_readme_command_lines_run_in_order(needs_dataset_dir, tmp_path, monkeypatch, capsys):
    pytest.importorskip("timm")
    from lcnnify.cli import main
    from lcnnify.testing.fake_data import write_cifar10

    data_dir = tmp_path / "cifar"
    write_cifar10(data_dir, per_batch=8, n_test=16)
    monkeypatch.chdir(tmp_path)
    ran = 0
    for line in _cli_lines():
        argv = shlex.split(line)[1:]
        if argv[0] == "demo" or ("DIR" in argv) != needs_dataset_dir:
            continue
        argv = [str(data_dir) if a == "DIR" else a for a in argv]
        if "--epochs" in argv and int(argv[argv.index("--epochs") + 1]) > 10:
            argv += ["--quick"]
        code = main(argv)
        out = capsys.readouterr()
        assert code == 0, f"README line failed: {line}\n{out.out[-2000:]}\n{out.err[-2000:]}"
        ran += 1
    assert ran >= (2 if needs_dataset_dir else 5)
    if not needs_dataset_dir:
        assert (tmp_path / "runs" / "digits-lcnn.pt").exists()
