"""A chart in a page: the vega-lite spec inline (drawn by the site's local vega bundle), a
static SVG (PNG for charts of many marks) drawn by vl-convert as its fallback, and a
one-line caption under it."""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import altair as alt
import vl_convert

from coact.errors import CoactError
from coact.report.charts.base import spec_title

Chart = alt.TopLevelMixin | Mapping[str, Any]
MAX_SVG_BYTES = 400_000  # a larger static fallback is written as PNG instead
MAX_SVG_ROWS = 500  # charts of more data rows (scatter plots) go straight to PNG
DIGITS = 4  # significant digits of the data values inlined into a page


def to_spec(chart: Chart) -> dict[str, Any]:
    """A vega-lite spec (dict) from an altair chart or a spec."""
    if isinstance(chart, Mapping):
        return dict(chart)
    return dict(chart.to_dict())


class Figures:
    """Writes the fallback images of one page directory's charts into `<dir>/charts/` and
    returns the HTML that shows each chart; names must be unique per directory. With
    `static` off (feature pages: many pages, each with its own charts) no fallback image
    is drawn: the inline spec alone, which keeps the site light and its build fast."""

    def __init__(self, page_dir: Path, static: bool = True) -> None:
        self.dir = page_dir / "charts"
        self.static = static
        if static:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.names: set[str] = set()

    def figure(self, chart: Chart, name: str, caption: str) -> str:
        """HTML for one chart; `caption` is the one line saying what to read from it."""
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name) or name in self.names:
            raise ValueError(f"chart name {name!r} is not a fresh slug")
        spec = to_spec(chart)
        title = spec_title(spec)
        if not title or not caption.strip():
            raise CoactError(f"chart {name!r} needs a title and a caption")
        self.names.add(name)
        inline = _compact({k: v for k, v in spec.items() if k != "$schema"})
        payload = json.dumps(inline, ensure_ascii=False, separators=(",", ":"), default=str)
        payload = payload.replace("<", "\\u003c")  # nothing in it can close the script
        view = f'<figure class="coact-chart" id="chart-{name}"><div class="coact-view"></div>'
        spec_tag = f'<script type="application/json" class="coact-spec">{payload}</script>'
        caption_text = html.escape(caption.strip())
        if not self.static:
            return f"{view}{spec_tag}<figcaption>{caption_text}</figcaption></figure>\n"
        static = f"{name}.svg"
        svg = vl_convert.vegalite_to_svg(spec) if _rows(spec) <= MAX_SVG_ROWS else None
        if svg is not None and len(svg) <= MAX_SVG_BYTES:
            (self.dir / static).write_text(svg, encoding="utf-8")
        else:  # thousands of marks (scatter plots): a raster is a tenth of the size
            static = f"{name}.png"
            (self.dir / static).write_bytes(vl_convert.vegalite_to_png(spec))
        alt_text = html.escape(title, quote=True)
        return (
            f"{view}"
            f'<img class="coact-fallback" src="charts/{static}" alt="{alt_text}" loading="lazy">'
            f"{spec_tag}"
            f"<figcaption>{caption_text} "
            f'<a href="charts/{static}">static image</a></figcaption>'
            "</figure>\n"
        )


def _rounded(value: Any) -> Any:
    """A data value as the page needs it: floats to DIGITS significant digits (a float32
    code written in full takes three times the characters and draws the same)."""
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.{DIGITS}g}")
    return value


def _compact(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with its data rows' floats rounded (named datasets and inline values)."""

    def rows(table: Any) -> Any:
        if not isinstance(table, list):
            return table
        return [
            {k: _rounded(v) for k, v in row.items()} if isinstance(row, dict) else row
            for row in table
        ]

    if isinstance(spec.get("datasets"), Mapping):
        spec["datasets"] = {name: rows(table) for name, table in spec["datasets"].items()}
    data = spec.get("data")
    if isinstance(data, Mapping) and "values" in data:
        spec["data"] = {**data, "values": rows(data["values"])}
    return spec


def _rows(spec: Mapping[str, Any]) -> int:
    """Data rows a spec carries (its named datasets and inline values)."""
    rows = sum(len(v) for v in (spec.get("datasets") or {}).values() if isinstance(v, list))
    data = spec.get("data")
    if isinstance(data, Mapping) and isinstance(data.get("values"), list):
        rows += len(data["values"])
    return rows
