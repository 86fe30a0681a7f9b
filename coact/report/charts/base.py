"""What every chart shares: titles with the tokens a chart rests on in the subtitle, axis
units, saving as vega-lite JSON and PNG, and the checks the tests apply to every spec."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import altair as alt
import numpy as np
import polars as pl

from coact.rundir.files import atomic_write

NMSE = "normalised MSE (fraction of variance unexplained)"


FORM_UNITS = {
    "raw": "raw MSE difference (code units²)",
    "fvu": "MSE difference / the feature's variance",
    "seed": "MSE difference, seed normalisation (code units²)",
}


D_COLUMN = {"raw": "d", "fvu": "d_fvu", "seed": "d_seed"}


GAIN_COLUMN = {"raw": "gain", "fvu": "gain_fvu", "seed": "gain_seed"}


SOURCE_COLOURS = ["#7f7f7f", "#1f77b4", "#ff7f0e"]  # skip (residual), attention, MLP
VERDICT_COLOURS = alt.Scale(
    domain=["linear", "undecided", "nonlinear"], range=["#2ca02c", "#bcbd22", "#d62728"]
)


def chart_title(text: str, subtitle: str | list[str]) -> alt.TitleParams:
    return alt.TitleParams(text, subtitle=subtitle, anchor="start")


def titled(
    chart: Any, text: str, subtitle: str | list[str], width: int, height: int | None = None
) -> Any:
    """`chart` at this size with its title and the subtitle saying what it rests on."""
    size = {"width": width} if height is None else {"width": width, "height": height}
    return chart.properties(**size, title=chart_title(text, subtitle))


def to_pandas(data: pl.DataFrame) -> Any:
    return data.to_pandas()


def save(chart: alt.TopLevelMixin, path_stem: Path) -> list[Path]:
    """`<stem>.vl.json` and `<stem>.png`, each written atomically (a dot in the stem stays)."""
    spec = chart.to_json()
    paths = [path_stem.with_name(path_stem.name + ext) for ext in (".vl.json", ".png")]
    atomic_write(paths[0], lambda tmp: tmp.write_text(spec))
    atomic_write(paths[1], lambda tmp: chart.save(str(tmp), format="png", scale_factor=2))
    return paths


def spec_title(spec: Mapping[str, Any]) -> str:
    """A chart spec's title text ('' if none)."""
    title = spec.get("title")
    if isinstance(title, Mapping):
        text = title.get("text", "")
        return " ".join(text) if isinstance(text, list) else str(text)
    return " ".join(title) if isinstance(title, list) else str(title or "")


def untitled_axes(spec: Any, where: str = "chart") -> list[str]:
    """The x / y axes of a spec (nested views included) that show a field but name no
    quantity: a test insists on none. In a layer, one layer's title serves the shared axis;
    axes drawn without labels are exempt."""
    if not isinstance(spec, Mapping):
        return []
    missing: list[str] = []
    for key in ("hconcat", "vconcat", "concat"):
        for i, child in enumerate(spec.get(key, []) or []):
            missing += untitled_axes(child, f"{where}.{key}[{i}]")
    if isinstance(spec.get("spec"), Mapping):
        missing += untitled_axes(spec["spec"], f"{where}.spec")
    shown: dict[str, bool] = {}
    for view in [spec, *(spec.get("layer", []) or [])]:
        encoding = view.get("encoding") if isinstance(view, Mapping) else None
        if not isinstance(encoding, Mapping):
            continue
        for channel in ("x", "y"):
            enc = encoding.get(channel)
            if not isinstance(enc, Mapping) or "field" not in enc:
                continue
            axis = enc.get("axis", {})
            exempt = axis is None or (isinstance(axis, Mapping) and axis.get("labels") is False)
            titled = bool(enc.get("title")) or exempt
            shown[channel] = shown.get(channel, False) or titled
    missing += [f"{where}: {channel}" for channel, ok in shown.items() if not ok]
    return missing


def shown_token(text: str | None, limit: int = 10) -> str:
    """A token's text for a chart cell: spaces, newlines and tabs visible, long ones cut."""
    if text is None:
        return "?"
    shown = text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥").replace("\r", "")
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def stacked_rects(
    which: np.ndarray, kinds: np.ndarray, order: Sequence[str], edges: np.ndarray
) -> pl.DataFrame:
    """A histogram split by kind: one rectangle per bin (`which` holds each value's bin
    among `edges`) and kind, stacked in `order`."""
    rows: list[dict[str, Any]] = []
    for b in range(len(edges) - 1):
        bottom = 0
        for kind in order:
            n = int(((which == b) & (kinds == kind)).sum())
            if n:
                rows.append(
                    {"lo": edges[b], "hi": edges[b + 1], "y0": bottom, "y1": bottom + n,
                     "count": n, "verdict": kind}
                )  # fmt: skip
                bottom += n
    schema = {"lo": pl.Float64, "hi": pl.Float64, "y0": pl.Int64, "y1": pl.Int64}
    return pl.DataFrame(rows, schema={**schema, "count": pl.Int64, "verdict": pl.String})


def stacked_bars(
    frame: pl.DataFrame,
    x: alt.X,
    y_title: str,
    color: alt.Color,
    tooltip: list[Any],
    x2: str = "hi:Q",
) -> alt.Chart:
    """A stacked histogram's rectangles: `x` to `x2` wide, y0 to y1 high (`stacked_rects`)."""
    return (
        alt.Chart(to_pandas(frame))
        .mark_rect()
        .encode(x=x, x2=x2, y=alt.Y("y0:Q", title=y_title), y2="y1:Q", color=color, tooltip=tooltip)
    )


def verdict_colour(scale: alt.Scale) -> alt.Color:
    """Colour by the verdict d's (or the gain's) 95 % interval gives against τ."""
    return alt.Color("verdict:N", title="verdict (95% interval vs τ)", scale=scale)


VERDICT_TOOLTIP = ["lo:Q", "hi:Q", "count:Q", "verdict:N"]
