"""Charts of the connectors: the L1 path, the Pareto frontier and its elbow, the mlp's
training curve, every family's losses, and the distribution of d (linearity)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import altair as alt
import numpy as np
import polars as pl

from coact.report.charts import base as shared


def mlp_curve(curve: pl.DataFrame, tokens_train: int | None) -> alt.LayerChart:
    """The mlp connector's training loss per step and its validation loss per epoch."""
    train = curve.select("step", "chunk", "nmse").with_columns(pl.lit("training").alias("curve"))
    valid = (
        curve.filter(pl.col("validation_nmse").is_not_null())
        .select("step", "chunk", pl.col("validation_nmse").alias("nmse"))
        .with_columns(pl.lit("validation (held-back contexts)").alias("curve"))
    )
    chunks = curve["chunk"].n_unique()
    colour = alt.Color("curve:N", title="loss")
    x = alt.X("step:Q", title="optimiser step (one batch of tokens)")
    y = alt.Y("nmse:Q", title=shared.NMSE, scale=alt.Scale(zero=False))
    lines = alt.Chart(shared.to_pandas(train)).mark_line(opacity=0.5).encode(x=x, y=y, color=colour)
    points = (
        alt.Chart(shared.to_pandas(valid))
        .mark_line(point=True)
        .encode(x=x, y=y, color=colour, tooltip=["step:Q", "nmse:Q", "chunk:Q"])
    )
    if chunks > 1:
        lines = lines.encode(detail="chunk:N")
        points = points.encode(detail="chunk:N")
    seen = f"{tokens_train:,} training tokens" if tokens_train else "the training tokens"
    return shared.titled(
        lines + points,
        "mlp connector (no L1): training and validation loss",
        f"{seen}; validation on the 10% of training contexts held back for early stopping"
        + (f"; {chunks} output chunks" if chunks > 1 else ""),
        460,
        240,
    )


def lasso_path(
    sweep: pl.DataFrame, tokens_heldout: int | None, what: str = "Sparse linear connector"
) -> alt.LayerChart:
    """Linear family: training and held-out shared.NMSE along the L1 path, the chosen α marked;
    `what` names the fit in the title."""
    long = pl.concat(
        [
            sweep.select("alpha", pl.col("train_nmse").alias("nmse")).with_columns(
                pl.lit("training").alias("tokens")
            ),
            sweep.select("alpha", pl.col("heldout_nmse").alias("nmse")).with_columns(
                pl.lit("held out").alias("tokens")
            ),
        ]
    )
    x = alt.X("alpha:Q", title="L1 strength α (per unit of NMSE)", scale=alt.Scale(type="log"))
    lines = (
        alt.Chart(shared.to_pandas(long))
        .mark_line(point=True)
        .encode(
            x=x,
            y=alt.Y("nmse:Q", title=shared.NMSE, scale=alt.Scale(zero=False)),
            color=alt.Color("tokens:N", title="measured on"),
            tooltip=["alpha:Q", "nmse:Q", "tokens:N"],
        )
    )
    chosen = sweep.filter(pl.col("chosen"))
    rule = (
        alt.Chart(shared.to_pandas(chosen))
        .mark_rule(strokeDash=[4, 4], color="black")
        .encode(x="alpha:Q")
    )
    held = f"{tokens_heldout:,} held-out tokens" if tokens_heldout else "held-out tokens"
    alpha = float(chosen["alpha"][0]) if chosen.height else float("nan")
    return shared.titled(
        lines + rule,
        f"{what}: loss along the L1 path (dashed: chosen α = {alpha:.3g})",
        f"exact coordinate-descent path, {sweep.height} values of α; {held}",
        460,
        240,
    )


def family_losses(
    rows: Sequence[tuple[str, float]], tokens_heldout: int | None, what: str = "Connector families"
) -> alt.LayerChart:
    """Held-out shared.NMSE per connector family, one bar each (axis from 0 to 1, or further when a
    family does worse than predicting the mean); `what` names them in the title."""
    frame = pl.DataFrame({"family": [r[0] for r in rows], "nmse": [r[1] for r in rows]})
    top = max([1.0, *(float(r[1]) for r in rows if np.isfinite(r[1]))])
    base = alt.Chart(shared.to_pandas(frame)).encode(
        y=alt.Y("family:N", title="connector family", sort=None),
        x=alt.X("nmse:Q", title=f"held-out {shared.NMSE}", scale=alt.Scale(domain=[0, top])),
    )
    bars = base.mark_bar().encode(tooltip=["family:N", "nmse:Q"])
    text = base.mark_text(align="left", dx=3).encode(text=alt.Text("nmse:Q", format=".3f"))
    held = f"{tokens_heldout:,} held-out tokens" if tokens_heldout else "held-out tokens"
    return shared.titled(
        bars + text,
        f"{what}: held-out loss (lower explains more)",
        f"mean over alive output features, {held}"
        + (
            " (sae-connector: its own held-out split)"
            if any(r[0] == "sae-connector" for r in rows)
            else ""
        ),
        420,
    )


def pareto(sweep: pl.DataFrame, tokens_heldout: int | None) -> alt.LayerChart:
    """Held-out NMSE against mean ‖w‖₁ per output: the frontier and the chosen α."""
    frame = sweep.with_columns(
        pl.when(pl.col("on_frontier"))
        .then(pl.lit("on the frontier"))
        .otherwise(pl.lit("dominated"))
        .alias("point")
    )
    positive = frame.filter(pl.col("mean_l1") > 0)
    x = alt.X(
        "mean_l1:Q", title="mean ‖w‖₁ per output (code units, log)", scale=alt.Scale(type="log")
    )
    y = alt.Y("heldout_nmse:Q", title=f"held-out {shared.NMSE}", scale=alt.Scale(zero=False))
    tooltip = ["alpha:Q", "heldout_nmse:Q", "mean_l1:Q", "weights_nonzero:Q", "weights_above:Q"]
    line = (
        alt.Chart(shared.to_pandas(positive.filter(pl.col("on_frontier"))))
        .mark_line(color="gray")
        .encode(x=x, y=y, order="mean_l1:Q")
    )
    points = (
        alt.Chart(shared.to_pandas(positive))
        .mark_point(filled=True, size=50)
        .encode(x=x, y=y, color=alt.Color("point:N", title="α on the grid"), tooltip=tooltip)
    )
    chosen = positive.filter(pl.col("chosen"))
    mark = (
        alt.Chart(shared.to_pandas(chosen))
        .mark_point(shape="diamond", size=220, filled=True, color="black")
        .encode(x=x, y=y, tooltip=tooltip)
    )
    label = (
        alt.Chart(
            shared.to_pandas(
                chosen.with_columns(
                    pl.format("chosen α = {}", pl.col("alpha").round(4)).alias("label")
                )
            )
        )
        .mark_text(align="left", dx=10, dy=-8)
        .encode(x=x, y=y, text="label:N")
    )
    held = f"{tokens_heldout:,} held-out tokens" if tokens_heldout else "held-out tokens"
    return shared.titled(
        line + points + mark + label,
        "Pareto frontier of the L1 path: the diamond is the elbow, the chosen α",
        f"one point per α ({sweep.height}); {held}",
        460,
        260,
    )


def d_distribution(
    features: pl.DataFrame,
    form: str,
    taus: Mapping[str, float],
    tokens_heldout: int | None,
    bins: int = 40,
) -> alt.TopLevelMixin:
    """Histogram of the per-feature loss difference d(j) on a log axis, stacked by verdict,
    with each τ as a vertical rule."""
    column = shared.D_COLUMN.get(form, "d_seed")
    alive = (
        features.filter(pl.col("status") != "dead") if "status" in features.columns else features
    )
    verdict = "verdict" if "verdict" in alive.columns else "status"
    d = alive[column].to_numpy().astype(float)
    ok = np.isfinite(d) & (d > 0)
    n_nonpositive = int((np.isfinite(d) & (d <= 0)).sum())
    values = d[ok]
    frame = _stacked_bins(values, alive[verdict].to_numpy()[ok], bins)
    x = alt.X("lo:Q", title=f"d(j) = MSE_lin − MSE_mlp, {shared.FORM_UNITS.get(form, form)}, log")
    colour = shared.verdict_colour(shared.VERDICT_COLOURS)
    bars = shared.stacked_bars(
        frame, x.scale(type="log"), "output features", colour, shared.VERDICT_TOOLTIP
    )
    tau_frame = pl.DataFrame({"name": list(taus), "tau": [float(v) for v in taus.values()]})
    tau_frame = tau_frame.filter(pl.col("tau") > 0)
    rules = (
        alt.Chart(shared.to_pandas(tau_frame))
        .mark_rule(strokeDash=[5, 3], color="black")
        .encode(x="tau:Q", tooltip=["name:N", "tau:Q"])
    )
    layers: list[Any] = [bars, rules]
    for i, (name, tau) in enumerate(tau_frame.iter_rows()):
        text = pl.DataFrame({"tau": [tau], "name": [name]})
        layers.append(
            alt.Chart(shared.to_pandas(text))
            .mark_text(align="right", dx=-4, dy=4 + 14 * i, baseline="top")
            .encode(x="tau:Q", y=alt.value(0), text="name:N")
        )
    held = f"{tokens_heldout:,} held-out tokens" if tokens_heldout else "held-out tokens"
    return shared.titled(
        alt.layer(*layers),
        "Per-feature loss difference d(j): what the mlp adds over linear (dashed: τ)",
        [
            f"{len(values):,} alive features with d > 0 on {held} "
            f"({n_nonpositive:,} with d ≤ 0 are off the log axis)",
            "colour: the verdict at the connect stage's τ",
        ],
        480,
        260,
    )


def _stacked_bins(values: np.ndarray, kinds: np.ndarray, bins: int) -> pl.DataFrame:
    """Log-spaced bins of `values`, one rectangle per bin and verdict, stacked."""
    if not len(values):
        return shared.stacked_rects(values, kinds, (), np.zeros(1))
    lo, hi = np.log10(values.min()), np.log10(values.max())
    lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo, hi)
    edges = np.logspace(lo, hi, bins + 1)
    which = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, bins - 1)
    return shared.stacked_rects(which, kinds, ("linear", "undecided", "nonlinear"), edges)
