"""Plain-text tables for terminals and logs: the benchmark's and the evaluation's reports
go through the one formatter here, so they read alike."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(head: Sequence[str], body: Sequence[Sequence[str]], notes: Sequence[str] = ()) -> str:
    """The header line, one line per row of cells, then each note on a line of its own.
    Columns are as wide as their widest cell and two spaces apart; cells are right-aligned,
    so the digits of numbers line up."""
    widths = [max(len(cell) for cell in column) for column in zip(head, *body)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), *(fmt.format(*cells) for cells in body), *notes])
