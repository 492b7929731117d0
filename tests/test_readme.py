"""The README's one-line usage block runs as written (issue: core, 'done means a new user can run it')."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_snippet_runs(capsys):
    pytest.importorskip("timm")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    usage = next(b for b in blocks if "lcnnify(timm.create_model" in b)
    namespace: dict = {}
    exec(compile(usage, "README.md", "exec"), namespace)
    model = namespace["model"]
    assert model.lcnn_report.converted_counts["conv"] == 20
    assert "LCNN conversion report" in capsys.readouterr().out
