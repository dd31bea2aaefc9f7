"""Markdown tables: every table a run, a sweep or a comparison writes is built here."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def markdown_table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    """A GitHub-flavoured markdown table (cells are ``str()``-ed), ending with a newline."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def percent(value: float, signed: bool = False) -> str:
    """A fraction as a percentage with one decimal (``+`` sign when ``signed``); ``-`` for NaN / None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"


def number(value: float, fmt: str = ".3f") -> str:
    """``value`` formatted with ``fmt``; ``-`` for NaN / None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)
