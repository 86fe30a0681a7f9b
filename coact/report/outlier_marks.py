"""The ⚠ of a feature flagged as an outlier (a possible artefact: it fires mostly at
attention-sink positions, first delimiters or tokens of huge norm), in every table and
page that names the feature, with the reason in its tooltip."""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence

from coact.report.markdown import Cell
from coact.rundir.read import RunData

OUTLIER = "⚠"
PHRASES = {
    "first tokens": "at a context's first positions",
    "first delimiter": "its context's first newline, period or comma",
    "high norm": "tokens of very high activation norm",
}


def outlier_help(reason: str) -> str:
    """A tooltip for a flag, e.g. 'possible artefact (outlier feature): 60% of its active
    tokens are at a context's first positions; see the layer page'."""
    parts = []
    for part in reason.split("; "):
        name, _, share = part.rpartition(" ")
        parts.append(f"{share} of its active tokens are {PHRASES.get(name, name)}")
    return f"possible artefact (outlier feature): {'; '.join(parts)}; see the layer page"


def outlier_mark(data: RunData, slug: str, feature: int) -> str:
    """' ⚠' with the reason in its tooltip when the feature is flagged, else ''."""
    reason = data.outlier_reason(slug, feature)
    if reason is None:
        return ""
    tip = html.escape(outlier_help(reason), True)
    return (
        f' <span class="coact-outlier" title="{tip}" style="color:#b45309;cursor:help">'
        f"{OUTLIER}</span>"
    )


def outlier_cell(data: RunData, slug: str, feature: int) -> Cell:
    """A table cell: '⚠ first tokens 83%' with its tooltip, or '–'; sorts by the reason."""
    reason = data.outlier_reason(slug, feature)
    if reason is None:
        return ("–", "")
    return (outlier_mark(data, slug, feature).strip() + " " + html.escape(reason), reason)


def outlier_text(data: RunData, slug: str, feature: int) -> str:
    """' ⚠' for plain-text (markdown) cells and table headers, else ''."""
    return f" {OUTLIER}" if data.outlier_reason(slug, feature) is not None else ""


def flag_inputs(data: RunData, text: str, inputs: Iterable[int] | None) -> str:
    """`text` (HTML) with a ⚠ mark after each `in i` that is a flagged input feature."""
    for i in inputs or []:
        mark = outlier_mark(data, data.in_slug, int(i))
        if mark:
            text = re.sub(rf"\bin {int(i)}\b", f"in {int(i)}" + mark.replace("\\", "\\\\"), text)
    return text


def flagged_inputs(data: RunData, inputs: Sequence[int]) -> str:
    """' (⚠ possible artefacts among its inputs: in 3 (first tokens 80%))' or ''."""
    flagged = [
        f"in {i} ({reason})"
        for i in inputs
        if (reason := data.outlier_reason(data.in_slug, int(i))) is not None
    ]
    return f" (⚠ possible artefacts among its inputs: {', '.join(flagged)})" if flagged else ""


def outlier_warning(data: RunData, slug: str, j: int, name: str, read: str) -> list[str]:
    """The warning box of a feature flagged as an outlier (nothing for others); `read`
    names what to read with that in mind."""
    reason = data.outlier_reason(slug, j)
    if reason is None:
        return []
    return [
        '!!! warning "Possible artefact (outlier feature)"',
        f"    {name} fires mostly on tokens where models park attention or norm ({reason} "
        f"of its active tokens; see the layer page's outlier section). Read its {read} "
        "with that in mind.",
        "",
    ]
