r"""The data-free Lipschitz / curvature bound of a (converted) model (paper §3.2, Theorem 1).

    b = lcnnify.bound(model, (3, 32, 32))
    b.lipschitz, b.logit_hessian, b.loss_hessian, b.theorem1, b.certified, b.reasons

What is bounded
---------------
For the map ``f: x -> logits`` of the model **in eval mode** (BatchNorm with running statistics, dropout off) on
inputs of shape ``input_shape`` (no batch dimension), over the whole input space (data-free):

* ``lipschitz``      L >= sup_x ||Df(x)||_2  (l2 -> l2 Lipschitz constant of the logits);
* ``logit_hessian``  K >= sup_x ||D^2 f(x)||, the spectral norm of the order-3 Hessian tensor,
  ||D^2 f(x)|| = sup_{|u|=|v|=|w|=1} sum_k w_k u^T H_k(x) v = sup_{|w|=1} ||sum_k w_k H_k(x)||_2 (H_k: Hessian
  of logit k). Where f is only C^{1,1} (e.g. ELU), K bounds the Lipschitz constant of x -> Df(x), which is
  the same number for C^2 maps;
* ``loss_hessian``   sup_x ||Hess_x CE(f(x), y)||_2 <= 0.5 L^2 + sqrt(2) K for every label y (see below);
* ``theorem1``       the paper's Theorem 1 value, for comparison (see below).

How
---
The graph is run once on a random input of ``input_shape`` (:mod:`lcnnify.bounds.propagate`, an
``fx.Interpreter``) and every node gets bounds (L_n, K_n) of the map input -> node, composed by the chain rule;
what each op is and whether it voids the bound comes from the op registry (:mod:`lcnnify.ops`), the same
table the conversion report reads, so ``validate(model).certified`` and ``bound(model, ...).certified`` agree.
Operator norms are pure linear algebra (:mod:`lcnnify.bounds.operator_norms`). When the registry already
knows that an op voids the guarantee (max-pool, a kept ReLU, a gating product...), :func:`bound` returns the
infinite bound at once with the reasons, without computing any operator norm (``full=True`` computes the
finite Lipschitz bound of such a model anyway).

Activation constants (``lcnnify.ops``): CenteredSoftplus s = 1, c = max(beta)/4; tanh: 1, 4/(3 sqrt 3);
sigmoid: 1/4, 1/(6 sqrt 3); SiLU: 1.0999, 1/2; GELU: 1.1290, 0.7979; Mish: 1.0885, 0.6443; ELU(alpha=1):
1, 1; ... (numeric suprema rounded up; ``tests/test_bounds.py`` checks them on a fine grid). torch's Softplus
is taken as smooth although it switches to the identity above ``threshold`` (a derivative jump of
sigmoid(-threshold), 2e-9 at the default 20). Kinks (ReLU, ReLU6, LeakyReLU, Hardswish, Hardsigmoid, SELU,
clamp, abs, max-pool...) keep a finite L but make K infinite.

The cross-entropy: l(z) = logsumexp(z) - z_y has gradient p - e_y, ||p - e_y||^2 = (1 - p_y)^2 + sum_{k!=y}
p_k^2 <= 2 (1 - p_y)^2 <= 2, and Hessian diag(p) - p p^T, whose quadratic form u^T (.) u = Var_p(u) is at most
(max u - min u)^2 / 4 <= 1/2 for a unit u. With Hess_x l(f(x)) = Df^T Hess_z l Df + sum_k (dl/dz_k) H_k:
||Hess_x l|| <= 0.5 L^2 + sqrt(2) K.

Certified vs estimated
----------------------
With ``certify=True`` (default) every factor is a certified upper bound (exact arithmetic, plus a 1e-9
relative margin for the floating-point eigen / singular value solvers):

* conv operator norms (:mod:`lcnnify.bounds.operator_norms`): the circulant-embedding upper bound, accepted
  when within ``rtol`` of a power-iteration lower estimate; otherwise the exact dense Gram norm when
  min(in, out) <= ``dense_limit`` (default 1024: seconds), else the circulant bound with a note saying how
  loose it may be (tens of percent on 2x2-4x4 maps). ``exact=True`` computes the exact dense norm wherever
  the circulant bound is loose, whatever the size (tightest; minutes on large models);
* linear layers: the exact ||W||_2 (singular values / Gram eigenvalues in float64);
* BatchNorm: the closed-form gain; pooling / reshaping / slicing / padding / upsampling (non-negative
  linear maps): Schur's test sqrt(||A||_1 ||A||_inf), exact for reshapes, means, non-overlapping pools and
  duplications, or the exact dense norm when the map is small;
* activation constants: closed forms, or numeric suprema rounded up.

With ``certify=False`` the conv norms are power-iteration estimates, which approach the norm from below:
``certified`` is then False and ``reasons`` says so (the values are estimates, not bounds). Not covered in
either mode: floating-point rounding of the model's own float32 forward, and train-mode behaviour.

A ConvSpectralNorm conv normalizes W by the power-iteration estimate for the shape it last saw, so its
normalized operator norm is >= 1 (slightly): the bound uses the norm that the current weight has for the
shape it sees under ``input_shape``. If that shape differs from the one its sigma refers to (or the conv has
not run yet), an actual forward would re-normalize the weight: the bound is then for the current weights,
flagged uncertified.

Theorem 1 (paper eq. 2)
-----------------------
``theorem1 = sum_i n_i C_i prod_{j<=i} a_j`` over the nodes in topological order treated as a chain
(f_i = one op, a_j its Lipschitz factor, C_i the bound on its normalized curvature |phi''/phi'| -- beta for a
(centered) softplus, 0 for linear maps -- and n_i its output width, per sample). For a DAG this multiplies
the factors of parallel branches as if they were in series, and adds/concats count as factor 1: it is the
naive application of the chain theorem the paper states, reported for comparison. It is NOT a bound on
``logit_hessian``: it bounds the paper's normalized curvature ||Hess f|| / ||grad f|| of a scalar f, carries the
widths n_i (large for wide layers) but only the first power of the Lipschitz products (so it is smaller than K
where those products are large): compare with care.
"""
from __future__ import annotations

from torch import nn

from .. import ops
from .api import bound
from .operator_norms import conv_norm_bound
from .result import Bound

__all__ = ["Bound", "bound", "conv_norm_bound", "activation_constants"]


def activation_constants(activation: nn.Module) -> tuple[float, float]:
    """(sup |phi'|, sup |phi''|) used by the bound for an activation module (inf: kink); KeyError if unknown.
    (The full entry, with the normalized curvature and the kink, is ``lcnnify.ops.activation_constants``.)"""
    c = ops.activation_constants(activation)
    return c.slope, c.curvature
