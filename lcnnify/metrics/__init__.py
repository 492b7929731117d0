"""Measurements of a classifier's input geometry and robustness (paper §3.1, §4, §5).

Works on any ``nn.Module`` classifier (inputs -> logits); never imports ``lcnnify.convert``. Every function
measures in eval mode and restores the model's modes and its parameters' ``requires_grad`` / ``.grad``.

- :func:`curvature` — per-sample gradient norm, Hessian spectral norm (batched Lanczos) and normalized curvature.
- :func:`gradient_robustness` — relative gradient change under random noise of fixed l2 norm (Fig. 2).
- :func:`pgd_l2`, :func:`robust_accuracy` — l2 PGD (same iterates as torchattacks.PGDL2) and Table 2.
- :func:`evaluate_geometry`, :func:`train_test_discrepancy` — Table 1 and Table 3.
"""
from lcnnify.metrics.curvature import DEFAULT_CHUNK_SIZE, CurvatureStats, curvature
from lcnnify.metrics.geometry import evaluate_geometry, train_test_discrepancy
from lcnnify.metrics.robustness import gradient_robustness, iter_batches, pgd_l2, robust_accuracy

__all__ = [
    "CurvatureStats",
    "DEFAULT_CHUNK_SIZE",
    "curvature",
    "evaluate_geometry",
    "gradient_robustness",
    "iter_batches",
    "pgd_l2",
    "robust_accuracy",
    "train_test_discrepancy",
]
