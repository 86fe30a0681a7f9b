"""How every report page writes numbers and tables: markdown tables for small fixed tables,
raw-HTML tables (sortable by the report's script) where cells hold links, marks or coloured
contexts, and the note box of a part the run lacks."""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

Cell = tuple[str, Any]  # (HTML shown, value sorted by)


def num(value: Any, spec: str = ".3g") -> str:
    """A number for a table; '–' for missing or NaN."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and not math.isfinite(value):
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return format(value, spec)


def pct(value: Any, digits: int = 1) -> str:
    """A share (0–1) as a percent; '–' for a missing one."""
    return "–" if value is None else f"{100 * float(value):.{digits}f}%"


def finite(value: Any) -> float | None:
    """A float, or None for a missing or NaN value (so it prints as '–')."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def sort_key(value: Any) -> Any:
    """What a sortable cell sorts by: '' for a missing or NaN value, so those sort together."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return value


def md_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table; pipes and newlines in cells are escaped so no cell breaks a row."""

    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(headers: Sequence[str], rows: Iterable[Sequence[Cell]], sortable: bool) -> str:
    """A raw-HTML table in its own scrolling box (a long or wide table never stretches the
    page); `data-sortable` makes its columns sortable by the report's script."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for shown, key in row:
            sort = "" if key is None else f' data-sort="{html.escape(str(key), quote=True)}"'
            cells.append(f"<td{sort}>{shown}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    attr = " data-sortable" if sortable else ""
    table = f"<table{attr}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f'<div class="coact-scroll">{table}</div>'  # a long or wide table scrolls in its box


def note(text: str) -> str:
    """The box that says a part of the page is missing because its stage did not run."""
    return f'!!! note "Not in this run"\n    {text}\n'


def formula_html(text: str) -> str:
    """A connector's formula as inline code in an HTML cell."""
    return f"<code>{html.escape(text)}</code>"


def token(text: Any) -> str:
    """A token's text quoted (its spaces visible) for HTML, '?' when unknown."""
    return html.escape(repr(str(text))) if text is not None else "?"
