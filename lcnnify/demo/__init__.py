"""``lcnnify demo``: the paper's Fig. 1, Tables 1-3 and Fig. 2 in miniature, on a laptop CPU, with no download.

* **Fig. 1** -- two moons: decision boundaries of a small ReLU MLP trained as the paper's *standard* model
  (softplus, beta = 1e3) and of its LCNN conversion (``lcnnify``), side by side; plus softplus vs centered
  softplus (panel c).
* **Tables 1-3, Fig. 2** -- scikit-learn's handwritten digits (1797 real 8x8 gray images), a small ReLU +
  BatchNorm CNN (:class:`lcnnify.models.SmallCNN`) trained with all seven methods of the paper's §5 through
  :func:`lcnnify.train.fit`, several seeds, mean +- std over seeds as in the paper.

The package: :mod:`~lcnnify.demo.config` (settings, the paper's numbers), :mod:`~lcnnify.demo.jobs` (one
training run and its measurements), :mod:`~lcnnify.demo.runner` (worker processes, :func:`run_demo`),
:mod:`~lcnnify.demo.report` (aggregates over seeds, findings, tables, results.md) and
:mod:`~lcnnify.demo.figures`.

Outputs (``--out``, default ``runs/demo``): ``results.json`` (every number, per run and aggregated, with the
machine, date and settings), ``results.md``, ``fig1_two_moons.png`` and ``fig2_gradient_robustness.png``.

Why 8x8 and not upsampled: the cost of the double-backward methods (GradReg, CURE) and of the Hessian
measurements grows with the number of pixels (4x at 16x16), the whole demo must run in a few minutes on 2 CPU
cores, and upsampling adds no information.
"""
from __future__ import annotations

from ..train import METHOD_LABELS
from ..train.tables import PAPER_EPS, format_table
from .config import EPS_NOTE, PAPER, DemoConfig, eps_note
from .runner import check_output_dir, run_demo

__all__ = ["DemoConfig", "run_demo", "check_output_dir", "format_table", "PAPER", "PAPER_EPS", "METHOD_LABELS",
           "EPS_NOTE", "eps_note"]
