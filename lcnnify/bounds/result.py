"""The :class:`Bound` result of :func:`lcnnify.bound`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["Bound"]


def _fmt(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.6g}"


@dataclass(frozen=True)
class Bound:
    """Data-free bounds of a model's logits map f: input -> logits in eval mode (see :mod:`lcnnify.bounds`).

    Attributes:
        lipschitz: L >= sup_x ||Df(x)||_2 (l2 Lipschitz constant of the logits map).
        logit_hessian: K >= sup_x ||D^2 f(x)|| (spectral norm of the Hessian tensor of the logits).
        loss_hessian: 0.5 L^2 + sqrt(2) K >= sup_x ||Hess_x cross_entropy(f(x), y)||_2 for every label y:
            the curvature bound of the loss, the headline number.
        theorem1: the paper's Theorem 1 value over the graph as a chain (for comparison only: it bounds a
            different quantity, see :mod:`lcnnify.bounds`).
        certified: True when every factor is a certified upper bound and nothing voids the bound.
        reasons: why not certified: ``"node [module path: Type]: why"`` per offending node.
        per_node: node name -> (L, K) of the map input -> that node (input-dependent nodes only; empty when
            the bound was short-circuited because an op voids it).
        notes: informational remarks (loose factors, multiple outputs...), not affecting ``certified``.
        input_shape: the input shape (no batch dimension) the bound is for.
        seconds: wall time of the computation.
        estimated: the operator norms are power-iteration estimates (``certify=False``), not upper bounds.
        short_circuited: an op voids the bound, so no operator norm was computed (``full=True`` computes them).
    """

    lipschitz: float
    logit_hessian: float
    loss_hessian: float
    theorem1: float
    certified: bool
    reasons: tuple[str, ...] = ()
    per_node: dict[str, tuple[float, float]] = field(default_factory=dict, compare=False)
    notes: tuple[str, ...] = ()
    input_shape: tuple[int, ...] = ()
    seconds: float = field(default=0.0, compare=False)
    estimated: bool = False
    short_circuited: bool = False

    @property
    def status(self) -> str:
        """``certified``, ``estimated`` (power-iteration norms) or ``NOT certified``."""
        if self.certified:
            return "certified"
        if self.estimated and math.isfinite(self.loss_hessian) and len(self.reasons) == 1:
            return "estimated"
        return "NOT certified"

    def headline(self) -> str:
        """One line: the curvature bound of the loss, and whether it is certified."""
        if math.isfinite(self.loss_hessian):
            return (f"sup_x ||Hess_x loss||_2 <= {_fmt(self.loss_hessian)} ({self.status}; cross-entropy of the "
                    f"logits w.r.t. an input of shape {self.input_shape}, eval mode)")
        n = len(self.reasons)
        return (f"no finite curvature bound ({self.status}): {n} reason(s) below"
                + (" -- an op voids the guarantee, operator norms skipped" if self.short_circuited else ""))

    def __str__(self) -> str:
        lines = [self.headline(),
                 "  what each number bounds (f = the logits map, x = one input):",
                 f"    L = {_fmt(self.lipschitz):<12} Lipschitz constant of the logits (l2): ||f(x) - f(x')|| <= "
                 f"L ||x - x'||",
                 f"    K = {_fmt(self.logit_hessian):<12} sup ||D^2 f(x)||, the Hessian tensor of the logits",
                 f"    0.5 L^2 + sqrt(2) K = {_fmt(self.loss_hessian)}   sup ||Hess_x CE(f(x), y)||_2 for every "
                 f"label y (the bound above)",
                 f"    Theorem 1 = {_fmt(self.theorem1)}   the paper's chain value (eq. 2) over the graph as a chain, "
                 f"for comparison: not a bound on the numbers above"]
        if self.reasons:
            lines.append(f"  not certified ({len(self.reasons)}):")
            lines += [f"    - {r}" for r in self.reasons[:20]]
            if len(self.reasons) > 20:
                lines.append(f"    ... and {len(self.reasons) - 20} more")
        if self.notes:
            lines.append("  notes:")
            lines += [f"    - {n}" for n in self.notes[:10]]
            if len(self.notes) > 10:
                lines.append(f"    ... and {len(self.notes) - 10} more")
        lines.append(f"  ({len(self.per_node)} nodes, {self.seconds:.2f} s)")
        return "\n".join(lines)
