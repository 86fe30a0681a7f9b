"""Charts of the block: the position score, its causal counterpart and the composition
of the next residual stream."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import altair as alt
import numpy as np
import polars as pl

from coact.models.sites import Site
from coact.report.charts import base as shared

POSITION_COLOURS = alt.Scale(
    domain=["same_position", "undecided", "needs_context"], range=["#2ca02c", "#bcbd22", "#d62728"]
)


def position_causal(
    table: pl.DataFrame, threshold: float, contexts: int, targets: int
) -> alt.LayerChart:
    """Per alive attention feature: the predictive gain from earlier positions (fvu form)
    against what resampling earlier tokens changes (resample FVU), coloured by the
    predictive verdict; the dashed line is the resample threshold."""
    alive = table.filter(
        pl.col("position_status").is_in(["same_position", "needs_context"])
        & pl.col("resample_fvu").is_finite()
        & pl.col("gain_fvu").is_finite()
    ).select(
        "feature",
        pl.col("gain_fvu").clip(lower_bound=1e-4).alias("gain"),
        pl.col("resample_fvu").clip(lower_bound=1e-4).alias("resampled"),
        pl.col("self_only_fvu").alias("self_only"),
        pl.col("position_status").alias("predictive verdict"),
        "active",
    )
    points = (
        alt.Chart(shared.to_pandas(alive))
        .mark_circle(size=30, opacity=0.6)
        .encode(
            x=alt.X(
                "gain:Q",
                scale=alt.Scale(type="log"),
                title="predictive: gain from earlier positions (/ variance, log; ≤ 1e-4 at 1e-4)",
            ),
            y=alt.Y(
                "resampled:Q",
                scale=alt.Scale(type="log"),
                title="causal: FVU when earlier tokens are resampled (log)",
            ),
            color=alt.Color(
                "predictive verdict:N",
                scale=alt.Scale(
                    domain=["same_position", "needs_context"], range=["#4c78a8", "#e45756"]
                ),
            ),
            tooltip=["feature:Q", "gain:Q", "resampled:Q", "self_only:Q", "active:Q",
                     "predictive verdict:N"],
        )
    )  # fmt: skip
    rule = (
        alt.Chart(shared.to_pandas(pl.DataFrame({"at": [threshold]})))
        .mark_rule(strokeDash=[5, 3], color="black")
        .encode(y="at:Q")
    )
    return shared.titled(
        points + rule,
        "Predicted against caused: does each attention feature use earlier tokens?",
        [
            f"{alive.height:,} features alive in both; resampling on {contexts} held-out "
            f"contexts × {targets} target positions; dashed: FVU {threshold:g}",
            "above the line: the code changes when earlier tokens come from another text",
        ],
        420,
        320,
    )


def position_gains(
    table: pl.DataFrame, form: str, tau: float, tokens_heldout: int | None, bins: int = 40
) -> alt.LayerChart:
    """Histogram of each attention feature's gain from earlier positions (MSE of the
    same-position fit − MSE of the fit with context) on a symlog axis, so losses (< 0, the
    wider fit overfits) show beside gains, stacked by verdict, with τ as a rule."""
    column = shared.GAIN_COLUMN.get(form, "gain_seed")
    alive = table.filter(pl.col("status") != "dead")
    gains = alive[column].to_numpy().astype(float)
    kinds = alive["verdict" if "verdict" in alive.columns else "status"].to_numpy()
    ok = np.isfinite(gains)
    gains, kinds = gains[ok], kinds[ok]
    scale_c = tau / 10 if tau > 0 else float(np.median(np.abs(gains))) if len(gains) else 1.0
    scale_c = scale_c if scale_c > 0 else 1e-6
    frame, span = _symlog_bins(gains, kinds, scale_c, bins)
    x_scale = alt.Scale(type="symlog", constant=scale_c)
    ticks = [0.0] + [
        sign * 10.0**k
        for k in range(int(np.floor(np.log10(scale_c))), 4)
        for sign in (-1.0, 1.0)
        if span[0] <= sign * 10.0**k <= span[1]
    ]
    x = alt.X(
        "lo:Q",
        title=f"gain from earlier positions, MSE_same − MSE_context, "
        f"{shared.FORM_UNITS.get(form, form)}, symlog",
        scale=x_scale,
        axis=alt.Axis(values=sorted(ticks), format="~g"),
    )
    colour = shared.verdict_colour(POSITION_COLOURS)
    bars = shared.stacked_bars(
        frame, x, "attention output features", colour, shared.VERDICT_TOOLTIP
    )
    marks = pl.DataFrame({"at": [0.0, tau], "name": ["no gain", f"τ = {tau:.3g}"]})
    rules = (
        alt.Chart(shared.to_pandas(marks))
        .mark_rule(strokeDash=[5, 3], color="black")
        .encode(x=alt.X("at:Q", scale=x_scale), tooltip=["name:N", "at:Q"])
    )
    text = (
        alt.Chart(shared.to_pandas(marks.filter(pl.col("at") > 0)))
        .mark_text(align="left", dx=4, dy=4, baseline="top")
        .encode(x=alt.X("at:Q", scale=x_scale), y=alt.value(0), text="name:N")
    )
    held = f"{tokens_heldout:,} held-out tokens" if tokens_heldout else "held-out tokens"
    above = int((gains > tau).sum())
    return shared.titled(
        bars + rules + text,
        "What earlier positions add to each attention feature (dashed: 0 and τ)",
        [
            f"{len(gains):,} alive features, {above:,} with a gain above τ; least squares "
            f"without L1 on {held}",
            "left of 0: the wider fit does worse on held-out tokens (it overfits)",
        ],
        480,
        260,
    )


def composition_shares(
    table: pl.DataFrame, sources: Sequence[str], target: str, bins: int = 60
) -> alt.LayerChart:
    """Each output feature's variance split among the sources (least squares on the
    training tokens, cov(ŷ_s, y)/var(y), negative parts drawn as 0): features grouped by the
    source that explains most, ranked within each group, averaged over at most `bins` bins."""
    kinds = [Site.parse(s).kind for s in sources]
    alive = table.filter(pl.col("status") != "dead") if "status" in table.columns else table
    columns = [f"share_ls_{k}" for k in kinds]
    shares = np.nan_to_num(alive.select(columns).to_numpy().astype(float), nan=0.0)
    shares = np.clip(shares, 0.0, None)
    n = shares.shape[0]
    dominant = shares.argmax(axis=1) if n else np.zeros(0, dtype=int)
    order = np.lexsort((-shares[np.arange(n), dominant], dominant)) if n else dominant
    per_bin = max(1, int(np.ceil(n / bins)))
    rows: list[dict[str, Any]] = []
    boundaries: list[float] = []
    start = 0
    for g in range(len(kinds)):
        members = order[dominant[order] == g]
        for b in range(0, len(members), per_bin):
            chunk = members[b : b + per_bin]
            base = 0.0
            for s, name in enumerate(sources):
                value = float(shares[chunk, s].mean())
                rows.append({"x0": start + b, "x1": start + b + len(chunk), "y0": base,
                             "y1": base + value, "share": value, "source": name,
                             "features": len(chunk)})  # fmt: skip
                base += value
        start += len(members)
        if 0 < start < n:
            boundaries.append(float(start))
    frame = pl.DataFrame(
        rows,
        schema={"x0": pl.Int64, "x1": pl.Int64, "y0": pl.Float64, "y1": pl.Float64,
                "share": pl.Float64, "source": pl.String, "features": pl.Int64},
    )  # fmt: skip
    counts = [int((dominant == g).sum()) for g in range(len(kinds))]
    x = alt.X(
        "x0:Q",
        title=f"alive {target} features, grouped by the source that explains most, "
        "ranked within each group (count)",
        scale=alt.Scale(domain=[0, max(n, 1)], nice=False),
    )
    colour = alt.Color(
        "source:N",
        title="source",
        scale=alt.Scale(domain=list(sources), range=shared.SOURCE_COLOURS[: len(sources)]),
        sort=list(sources),
    )
    tooltip = ["source:N", alt.Tooltip("share:Q", format=".3f"), "features:Q"]
    y_title = "share of the feature's variance, cov(ŷ_s, y) / var(y)"
    bars = shared.stacked_bars(frame, x, y_title, colour, tooltip, x2="x1:Q")
    rules = (
        alt.Chart(shared.to_pandas(pl.DataFrame({"at": boundaries}, schema={"at": pl.Float64})))
        .mark_rule(color="black", strokeDash=[2, 2])
        .encode(x="at:Q")
    )
    grouped = ", ".join(f"{s} {c:,}" for s, c in zip(sources, counts, strict=True))
    return shared.titled(
        bars + rules,
        f"Where each {target} feature comes from: variance share per source",
        [
            f"least squares on every source, training tokens; bars average {per_bin} "
            f"feature{'s' if per_bin > 1 else ''}; the stack's height is the fit's R²",
            f"features the source explains most: {grouped}",
        ],
        560,
        260,
    )


def _symlog_bins(
    gains: np.ndarray, kinds: np.ndarray, scale_c: float, bins: int
) -> tuple[pl.DataFrame, tuple[float, float]]:
    """Bins even on a symlog axis (constant `scale_c`), one rectangle per bin and verdict,
    stacked; and the axis' extent, for its ticks."""
    if not len(gains):
        return shared.stacked_rects(gains, kinds, (), np.zeros(1)), (0.0, 1.0)
    t = np.sign(gains) * np.log1p(np.abs(gains) / scale_c)
    lo, hi = float(t.min()), float(t.max())
    lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo, hi)
    edges_t = np.linspace(lo, hi, bins + 1)
    edges = np.sign(edges_t) * scale_c * np.expm1(np.abs(edges_t))
    which = np.clip(np.searchsorted(edges_t, t, side="right") - 1, 0, bins - 1)
    order = ("same_position", "undecided", "needs_context")
    return shared.stacked_rects(which, kinds, order, edges), (float(edges[0]), float(edges[-1]))
