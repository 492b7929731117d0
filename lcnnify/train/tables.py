"""Plain-text and markdown tables of results (the rows of the paper's Tables 1-3), for the CLI and the demo."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

__all__ = ["format_table", "PAPER_EPS"]

#: The l2 PGD radii of the paper's Table 2 (inputs in [0, 1]).
PAPER_EPS = (0.05, 0.1, 0.15, 0.2)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, markdown: bool = False) -> str:
    """A plain-text table (first column left-aligned, the others right-aligned) or a markdown table."""
    rows = [[str(c) for c in r] for r in rows]
    headers = [str(h) for h in headers]
    if markdown:
        esc = lambda c: c.replace("|", "\\|")  # noqa: E731 - a literal | would split the cell
        lines = ["| " + " | ".join(map(esc, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def fmt(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([fmt(headers), "  ".join("-" * w for w in widths), *(fmt(r) for r in rows)])
