"""`ConversionReport`: what was converted to what, what was left and why, what voids the guarantee, and how to
fix the common voiders."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any


#: How to fix common ops that void the guarantee: (words to look for in the op or reason, the fix). First match wins.
FIXES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("skipped by config",), "remove the entry from skip= / convert_types="),
    (("smooth activation kept",), "smooth_activations='convert' (the default)"),
    (("maxpool", "max_pool", "max-pool"),
     "replace max-pool by average pooling (nn.AvgPool2d, same kernel/stride) or a strided convolution"),
    (("layernorm", "layer_norm", "groupnorm", "group_norm", "instancenorm", "instance_norm"),
     "use BatchNorm (converted to a gamma-Lipschitz BatchNorm) instead of a data-dependent normalization"),
    (("product of two", "gate", "sigmoid"),
     "squeeze-excite / gating multiplies two input-dependent tensors: remove the gate (se_layer=None or "
     "an nn.Identity) if the guarantee matters"),
    (("softmax", "attention"), "attention / softmax inside the network: not a CNN op, no guarantee"),
    (("max is not",), "replace max / amax by a mean or a smooth (log-sum-exp) reduction"),
    (("not traced", "opaque module"),
     "make that forward traceable by torch.fx (no data-dependent Python control flow)"),
    (("lipschitz_batchnorm=false",), "lipschitz_batchnorm=True (the default)"),
    (("conv subclass",), "use a plain nn.Conv2d (or register an adapter for this conv type)"),
)


def fix_for(item: "Left") -> str | None:
    """The usual fix of a voiding op (see :data:`FIXES`), or None."""
    text = f"{item.op} {item.reason}".lower().replace(" ", "")
    for words, fix in FIXES:
        if any(w.replace(" ", "") in text for w in words):
            return fix
    return None


@dataclass(frozen=True)
class Converted:
    """A call site that was converted. ``path``: module path of the (new) module; ``site``: the graph node."""

    path: str
    family: str
    original: str
    replacement: str
    site: str = ""


@dataclass(frozen=True)
class Left:
    """A call site or op that was left as it is, with the reason (``voids`` says if it voids the guarantee)."""

    path: str
    op: str
    reason: str
    voids: bool = True


@dataclass(frozen=True)
class Fallback:
    """A module converted module-by-module because its forward could not be traced (or differs by mode)."""

    path: str
    reason: str


@dataclass
class ConversionReport:
    """The result of a conversion or of :func:`lcnnify.validate` (a dry run).

    Print it for a table; ``to_dict()`` / ``to_json()`` for machines. ``certified`` is False when any op that
    voids the curvature guarantee is left in the model.
    """

    model: str = ""
    traced: bool = True
    converted: list[Converted] = field(default_factory=list)
    left: list[Left] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ queries
    @property
    def converted_counts(self) -> dict[str, int]:
        return dict(Counter(c.family for c in self.converted))

    @property
    def left_counts(self) -> dict[str, int]:
        return dict(Counter(item.op for item in self.left))

    @property
    def voiding(self) -> list[Left]:
        return [item for item in self.left if item.voids]

    @property
    def certified(self) -> bool:
        return not self.voiding

    # ------------------------------------------------------------------ output
    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "traced": self.traced,
            "certified": self.certified,
            "converted_counts": self.converted_counts,
            "left_counts": self.left_counts,
            "converted": [asdict(c) for c in self.converted],
            "left": [asdict(x) for x in self.left],
            "fallbacks": [asdict(f) for f in self.fallbacks],
            "notes": list(self.notes),
        }

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **({"indent": 2} | kwargs))

    def summary(self) -> str:
        conv = ", ".join(f"{k} {v}" for k, v in sorted(self.converted_counts.items())) or "nothing"
        left = ", ".join(f"{k} {v}" for k, v in sorted(self.left_counts.items())) or "nothing"
        mode = "traced" if self.traced else f"fallback ({len(self.fallbacks)} module(s) not traced)"
        cert = "guarantee holds" if self.certified else f"{len(self.voiding)} op(s) void the curvature guarantee"
        return f"{self.model}: {mode}; converted: {conv}; left: {left}; {cert}"

    def voiding_summary(self) -> str:
        """One paragraph: what voids the guarantee (ops with counts and first paths) and how to fix each."""
        if self.certified:
            return "the curvature guarantee holds (no op voids it)"
        groups: dict[str, list[Left]] = {}
        for item in self.voiding:
            groups.setdefault(item.op, []).append(item)
        parts, fixes = [], []
        for op, items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            where = ", ".join(repr(x.path) for x in items[:2]) + (", ..." if len(items) > 2 else "")
            parts.append(f"{op} x{len(items)} ({where})" if len(items) > 1 else f"{op} ({where})")
            fix = fix_for(items[0])
            if fix is not None and fix not in fixes:
                fixes.append(fix)
        text = f"the curvature guarantee is void: {', '.join(parts)}."
        if fixes:
            text += " To fix: " + "; ".join(fixes) + "."
        return text + " The report (print(model.lcnn_report)) lists every op and why."

    def __str__(self) -> str:
        lines = [f"LCNN conversion report: {self.summary()}", ""]
        rows = [(c.path, c.original, "->", c.replacement) for c in self.converted]
        lines += _table(("module", "was", "", "now"), rows, "converted")
        rows2 = [(x.path, x.op, "VOIDS" if x.voids else "ok", x.reason) for x in self.left]
        lines += _table(("module", "op", "guarantee", "why left"), rows2, "left unconverted")
        rows3 = [(f.path or "<root>", f.reason) for f in self.fallbacks]
        lines += _table(("module", "why not traced"), rows3, "module-level fallback")
        fixes = sorted({(x.op, f) for x in self.voiding if (f := fix_for(x)) is not None})
        lines += _table(("op", "how to fix"), fixes, "how to restore the guarantee")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines).rstrip()

    __repr__ = summary


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], title: str) -> list[str]:
    if not rows:
        return []
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    widths[-1] = 0
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return [f"{title} ({len(rows)}):", fmt(header), *(fmt(r) for r in rows), ""]
