"""The report's charts (altair), beside those in `coact.report.charts`: every one has a title, a
subtitle naming the tokens it rests on, and axis titles with units."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import altair as alt
import numpy as np
import polars as pl

from coact.models.sites import Site

NMSE = "normalised MSE (fraction of variance unexplained)"
FORM_UNITS = {
    "raw": "raw MSE difference (code units²)",
    "fvu": "MSE difference / the feature's variance",
    "seed": "MSE difference, seed normalisation (code units²)",
}
D_COLUMN = {"raw": "d", "fvu": "d_fvu", "seed": "d_seed"}
VERDICT_COLOURS = alt.Scale(
    domain=["linear", "undecided", "nonlinear"], range=["#2ca02c", "#bcbd22", "#d62728"]
)


def _title(text: str, subtitle: str | list[str]) -> alt.TitleParams:
    return alt.TitleParams(text, subtitle=subtitle, anchor="start")


def _frame(data: pl.DataFrame) -> Any:
    return data.to_pandas()


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
    y = alt.Y("nmse:Q", title=NMSE, scale=alt.Scale(zero=False))
    lines = alt.Chart(_frame(train)).mark_line(opacity=0.5).encode(x=x, y=y, color=colour)
    points = (
        alt.Chart(_frame(valid))
        .mark_line(point=True)
        .encode(x=x, y=y, color=colour, tooltip=["step:Q", "nmse:Q", "chunk:Q"])
    )
    if chunks > 1:
        lines = lines.encode(detail="chunk:N")
        points = points.encode(detail="chunk:N")
    seen = f"{tokens_train:,} training tokens" if tokens_train else "the training tokens"
    return (lines + points).properties(
        width=460,
        height=240,
        title=_title(
            "mlp connector (no L1): training and validation loss",
            f"{seen}; validation on the 10% of training contexts held back for early stopping"
            + (f"; {chunks} output chunks" if chunks > 1 else ""),
        ),
    )


def lasso_path(
    sweep: pl.DataFrame, tokens_heldout: int | None, what: str = "Sparse linear connector"
) -> alt.LayerChart:
    """Linear family: training and held-out NMSE along the L1 path, the chosen α marked;
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
        alt.Chart(_frame(long))
        .mark_line(point=True)
        .encode(
            x=x,
            y=alt.Y("nmse:Q", title=NMSE, scale=alt.Scale(zero=False)),
            color=alt.Color("tokens:N", title="measured on"),
            tooltip=["alpha:Q", "nmse:Q", "tokens:N"],
        )
    )
    chosen = sweep.filter(pl.col("chosen"))
    rule = alt.Chart(_frame(chosen)).mark_rule(strokeDash=[4, 4], color="black").encode(x="alpha:Q")
    held = f"{tokens_heldout:,} held-out tokens" if tokens_heldout else "held-out tokens"
    alpha = float(chosen["alpha"][0]) if chosen.height else float("nan")
    return (lines + rule).properties(
        width=460,
        height=240,
        title=_title(
            f"{what}: loss along the L1 path (dashed: chosen α = {alpha:.3g})",
            f"exact coordinate-descent path, {sweep.height} values of α; {held}",
        ),
    )


def family_losses(
    rows: Sequence[tuple[str, float]], tokens_heldout: int | None, what: str = "Connector families"
) -> alt.LayerChart:
    """Held-out NMSE per connector family, one bar each (axis from 0 to 1, or further when a
    family does worse than predicting the mean); `what` names them in the title."""
    frame = pl.DataFrame({"family": [r[0] for r in rows], "nmse": [r[1] for r in rows]})
    top = max([1.0, *(float(r[1]) for r in rows if np.isfinite(r[1]))])
    base = alt.Chart(_frame(frame)).encode(
        y=alt.Y("family:N", title="connector family", sort=None),
        x=alt.X("nmse:Q", title=f"held-out {NMSE}", scale=alt.Scale(domain=[0, top])),
    )
    bars = base.mark_bar().encode(tooltip=["family:N", "nmse:Q"])
    text = base.mark_text(align="left", dx=3).encode(text=alt.Text("nmse:Q", format=".3f"))
    held = f"{tokens_heldout:,} held-out tokens" if tokens_heldout else "held-out tokens"
    return (bars + text).properties(
        width=420,
        title=_title(
            f"{what}: held-out loss (lower explains more)",
            f"mean over alive output features, {held}"
            + (
                " (sae-connector: its own held-out split)"
                if any(r[0] == "sae-connector" for r in rows)
                else ""
            ),
        ),
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
    y = alt.Y("heldout_nmse:Q", title=f"held-out {NMSE}", scale=alt.Scale(zero=False))
    tooltip = ["alpha:Q", "heldout_nmse:Q", "mean_l1:Q", "weights_nonzero:Q", "weights_above:Q"]
    line = (
        alt.Chart(_frame(positive.filter(pl.col("on_frontier"))))
        .mark_line(color="gray")
        .encode(x=x, y=y, order="mean_l1:Q")
    )
    points = (
        alt.Chart(_frame(positive))
        .mark_point(filled=True, size=50)
        .encode(x=x, y=y, color=alt.Color("point:N", title="α on the grid"), tooltip=tooltip)
    )
    chosen = positive.filter(pl.col("chosen"))
    mark = (
        alt.Chart(_frame(chosen))
        .mark_point(shape="diamond", size=220, filled=True, color="black")
        .encode(x=x, y=y, tooltip=tooltip)
    )
    label = (
        alt.Chart(
            _frame(
                chosen.with_columns(
                    pl.format("chosen α = {}", pl.col("alpha").round(4)).alias("label")
                )
            )
        )
        .mark_text(align="left", dx=10, dy=-8)
        .encode(x=x, y=y, text="label:N")
    )
    held = f"{tokens_heldout:,} held-out tokens" if tokens_heldout else "held-out tokens"
    return (line + points + mark + label).properties(
        width=460,
        height=260,
        title=_title(
            "Pareto frontier of the L1 path: the diamond is the elbow, the chosen α",
            f"one point per α ({sweep.height}); {held}",
        ),
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
    column = D_COLUMN.get(form, "d_seed")
    alive = (
        features.filter(pl.col("status") != "dead") if "status" in features.columns else features
    )
    verdict = "verdict" if "verdict" in alive.columns else "status"
    d = alive[column].to_numpy().astype(float)
    ok = np.isfinite(d) & (d > 0)
    n_nonpositive = int((np.isfinite(d) & (d <= 0)).sum())
    values = d[ok]
    kinds = alive[verdict].to_numpy()[ok]
    rows: list[dict[str, Any]] = []
    if len(values):
        lo, hi = np.log10(values.min()), np.log10(values.max())
        lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo, hi)
        edges = np.logspace(lo, hi, bins + 1)
        which = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, bins - 1)
        for b in range(bins):
            base = 0
            for kind in ("linear", "undecided", "nonlinear"):
                n = int(((which == b) & (kinds == kind)).sum())
                if n:
                    rows.append(
                        {
                            "lo": edges[b],
                            "hi": edges[b + 1],
                            "y0": base,
                            "y1": base + n,
                            "count": n,
                            "verdict": kind,
                        }
                    )
                    base += n
    frame = pl.DataFrame(
        rows,
        schema={
            "lo": pl.Float64,
            "hi": pl.Float64,
            "y0": pl.Int64,
            "y1": pl.Int64,
            "count": pl.Int64,
            "verdict": pl.String,
        },
    )
    x = alt.X("lo:Q", title=f"d(j) = MSE_lin − MSE_mlp, {FORM_UNITS.get(form, form)}, log")
    bars = (
        alt.Chart(_frame(frame))
        .mark_rect()
        .encode(
            x=x.scale(type="log"),
            x2="hi:Q",
            y=alt.Y("y0:Q", title="output features"),
            y2="y1:Q",
            color=alt.Color(
                "verdict:N", title="verdict (95% interval vs τ)", scale=VERDICT_COLOURS
            ),
            tooltip=["lo:Q", "hi:Q", "count:Q", "verdict:N"],
        )
    )
    tau_frame = pl.DataFrame({"name": list(taus), "tau": [float(v) for v in taus.values()]})
    tau_frame = tau_frame.filter(pl.col("tau") > 0)
    rules = (
        alt.Chart(_frame(tau_frame))
        .mark_rule(strokeDash=[5, 3], color="black")
        .encode(x="tau:Q", tooltip=["name:N", "tau:Q"])
    )
    layers: list[Any] = [bars, rules]
    for i, (name, tau) in enumerate(tau_frame.iter_rows()):
        text = pl.DataFrame({"tau": [tau], "name": [name]})
        layers.append(
            alt.Chart(_frame(text))
            .mark_text(align="right", dx=-4, dy=4 + 14 * i, baseline="top")
            .encode(x="tau:Q", y=alt.value(0), text="name:N")
        )
    held = f"{tokens_heldout:,} held-out tokens" if tokens_heldout else "held-out tokens"
    return alt.layer(*layers).properties(
        width=480,
        height=260,
        title=_title(
            "Per-feature loss difference d(j): what the mlp adds over linear (dashed: τ)",
            [
                f"{len(values):,} alive features with d > 0 on {held} "
                f"({n_nonpositive:,} with d ≤ 0 are off the log axis)",
                "colour: the verdict at the connect stage's τ",
            ],
        ),
    )


def splices(table: pl.DataFrame) -> alt.HConcatChart:
    """ΔCE (with its 95% interval) and KL for each named splice of the MLP output."""
    named = table.filter(pl.col("tau").is_null())
    n_tokens, n_contexts = int(table["n_tokens"][0]), int(table["n_contexts"][0])
    frame = _frame(named)
    y = alt.Y("splice:N", title="MLP output replaced by", sort=None)
    ce = alt.Chart(frame).encode(y=y)
    ce_chart = (
        ce.mark_rule().encode(
            x=alt.X("delta_ce_low:Q", title="ΔCE vs clean model (nats per token)"),
            x2="delta_ce_high:Q",
        )
        + ce.mark_point(filled=True, size=60).encode(
            x="delta_ce:Q", tooltip=["splice:N", "delta_ce:Q", "ce_recovered:Q"]
        )
    ).properties(width=260)
    kl = alt.Chart(frame).encode(y=y)
    kl_chart = (
        kl.mark_rule().encode(
            x=alt.X("kl_low:Q", title="KL(clean ‖ spliced) (nats per token)"), x2="kl_high:Q"
        )
        + kl.mark_point(filled=True, size=60, color="firebrick").encode(
            x="kl:Q", tooltip=["splice:N", "kl:Q"]
        )
    ).properties(width=220)
    return alt.hconcat(ce_chart, kl_chart).properties(
        title=_title(
            "Spliced MLP output: extra next-token loss and divergence from the clean model",
            f"bars: 95% bootstrap over {n_contexts} contexts, {n_tokens:,} tokens",
        )
    )


def label_counts(
    counts: Mapping[str, int], hidden: Mapping[str, int] | None, n_tokens: int | None
) -> alt.LayerChart:
    """Features per logic label (and sae-connector hidden latents), symlog axis."""
    rows = [{"label": k, "targets": "output features", "count": int(v)} for k, v in counts.items()]
    if hidden:
        rows += [
            {"label": k, "targets": "hidden latents", "count": int(v)} for k, v in hidden.items()
        ]
    frame = _frame(pl.DataFrame(rows))
    base = alt.Chart(frame).encode(
        y=alt.Y("label:N", title="logic label", sort=list(counts)),
        yOffset=alt.YOffset("targets:N"),
        x=alt.X("count:Q", title="features (count, symlog axis)", scale=alt.Scale(type="symlog")),
    )
    bars = base.mark_bar().encode(
        color=alt.Color("targets:N", title="targets"), tooltip=["label:N", "targets:N", "count:Q"]
    )
    text = base.mark_text(align="left", dx=3).encode(text="count:Q")
    seen = f"{n_tokens:,} tokens" if n_tokens else "the stored tokens"
    return (bars + text).properties(
        width=420,
        title=_title(
            "Logic labels: which computation explains each feature",
            f"labels from co-activation counts over {seen}",
        ),
    )


def causal(table: pl.DataFrame) -> alt.LayerChart:
    """Per checked connection: the model's actual change of the output code against the
    formula's prediction when the input feature is ablated; the diagonal is agreement."""
    frame = table.filter(pl.col("judged")) if "judged" in table.columns else table
    frame = frame.with_columns(
        pl.when(pl.col("sign_agrees"))
        .then(pl.lit("sign agrees"))
        .otherwise(pl.lit("sign differs"))
        .alias("agreement"),
        pl.format("out {} ← in {}", pl.col("output"), pl.col("input")).alias("connection"),
    )
    span = float(
        np.nanmax(np.abs(frame.select("actual_mean", "predicted_mean").to_numpy()), initial=1.0)
    )
    scale = alt.Scale(type="symlog", domain=[-span, span])
    points = (
        alt.Chart(_frame(frame))
        .mark_point(filled=True, size=60)
        .encode(
            x=alt.X(
                "predicted_mean:Q",
                title="formula's predicted change (code units, symlog)",
                scale=scale,
            ),
            y=alt.Y(
                "actual_mean:Q", title="model's actual change (code units, symlog)", scale=scale
            ),
            color=alt.Color("agreement:N", title="sign"),
            tooltip=[
                "connection:N",
                "weight_refit:Q",
                "n_tokens:Q",
                "predicted_mean:Q",
                "actual_mean:Q",
                "corr:Q",
                "size_agrees:N",
            ],
        )
    )
    diagonal = (
        alt.Chart(_frame(pl.DataFrame({"v": [-span, span]})))
        .mark_line(strokeDash=[4, 4], color="gray")
        .encode(x="v:Q", y="v:Q")
    )
    tokens = int(frame["n_tokens"].sum()) if frame.height else 0
    return (diagonal + points).properties(
        width=360,
        height=300,
        title=_title(
            "Causal check: ablating a strong input, does the output move as the formula says?",
            f"{frame.height} connections judged, mean change over {tokens:,} tokens where the "
            "input fires; dashed: actual = predicted",
        ),
    )


def activation_histogram(values: np.ndarray, name: str, n_tokens: int) -> alt.Chart:
    """Histogram of a feature's non-zero activations (count axis symlog)."""
    values = np.asarray(values, dtype=float)
    rows: list[dict[str, float]] = []
    if len(values):
        hi = float(values.max())
        edges = np.linspace(0.0, hi if hi > 0 else 1.0, 31)
        counts, _ = np.histogram(values, bins=edges)
        rows = [
            {"lo": float(edges[i]), "hi": float(edges[i + 1]), "count": float(c)}
            for i, c in enumerate(counts)
        ]
    frame = pl.DataFrame(rows, schema={"lo": pl.Float64, "hi": pl.Float64, "count": pl.Float64})
    share = 100.0 * len(values) / max(n_tokens, 1)
    return (
        alt.Chart(_frame(frame))
        .mark_rect(color="#ff7f0e")
        .encode(
            x=alt.X("lo:Q", title=f"{name} activation (code units)"),
            x2="hi:Q",
            y=alt.Y("count:Q", title="tokens (count, symlog axis)", scale=alt.Scale(type="symlog")),
            tooltip=["lo:Q", "hi:Q", "count:Q"],
        )
        .properties(
            width=420,
            height=200,
            title=_title(
                f"How strongly {name} fires",
                f"{len(values):,} active of {n_tokens:,} stored tokens ({share:.2f}%); "
                "inactive tokens (0) not shown",
            ),
        )
    )


def shown_token(text: str | None, limit: int = 10) -> str:
    """A token's text for a chart cell: spaces, newlines and tabs visible, long ones cut."""
    if text is None:
        return "?"
    shown = text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥").replace("\r", "")
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


def ablation_drops(table: pl.DataFrame, name: str, filler: str | None) -> alt.VConcatChart:
    """A heatmap per ablation mode, one above the other: one row per top context, one
    column per preceding token (its text in the cell), colour the share of the activation
    lost without it."""
    contexts = table.select("rank", "context", "position", "token", "clean").unique("rank")
    labels = {
        int(r["rank"]): f"{r['rank']}: …{shown_token(r['token'], 12)} ({r['clean']:.3g})"
        for r in contexts.iter_rows(named=True)
    }
    order = [labels[k] for k in sorted(labels)]
    frame = table.with_columns(
        pl.col("rank").replace_strict(labels, return_dtype=pl.String).alias("row"),
        pl.format("−{}", pl.col("ablated_offset")).alias("before"),
        pl.col("ablated_token")
        .map_elements(lambda t: shown_token(t, 8), return_dtype=pl.String)
        .fill_null("?")
        .alias("text"),
        pl.col("drop_fraction").clip(-1.0, 1.0).alias("shown_fraction"),
        (100 * pl.col("drop_fraction")).round(1).alias("drop %"),
    ).select(
        "mode", "row", "before", "ablated_offset", "text", "shown_fraction", "drop %",
        "drop", "clean", "ablated",
    )  # fmt: skip
    window = int(table["ablated_offset"].to_numpy().max()) if table.height else 0
    columns = [f"−{k}" for k in range(window, 0, -1)]
    how = {
        "remove": "removed (later tokens shift left)",
        "replace": f"replaced by '{shown_token(filler)}'" if filler else "replaced by a filler",
    }
    charts = []
    for mode in [m for m in ("remove", "replace") if m in set(frame["mode"])]:
        part = _frame(frame.filter(pl.col("mode") == mode))
        base = alt.Chart(part).encode(
            x=alt.X(
                "before:O",
                sort=columns,
                title="preceding token (tokens before the activating one)",
            ),
            y=alt.Y("row:N", sort=order, title="top context"),
        )
        cells = base.mark_rect().encode(
            color=alt.Color(
                "shown_fraction:Q",
                title="activation lost (share of clean)",
                scale=alt.Scale(domain=[-1, 1], scheme="redblue", reverse=True),
            ),
            tooltip=["row:N", "before:O", "text:N", "drop %:Q", "drop:Q", "clean:Q", "ablated:Q"],
        )
        text = base.mark_text(fontSize=10).encode(
            text="text:N",
            color=alt.condition(
                "abs(datum.shown_fraction) > 0.6", alt.value("white"), alt.value("black")
            ),
        )
        charts.append(
            (cells + text).properties(
                width=50 * max(window, 1), height=22 * len(order), title=f"token {how[mode]}"
            )
        )
    return alt.vconcat(*charts).properties(
        title=_title(
            f"{name}: how much of the activation each preceding token carries",
            [
                f"{len(order)} top contexts (rank: …activating token (clean activation, code "
                f"units)); each of the {window} tokens before the activating one ablated alone,",
                "the model rerun up to the site; red: the activation falls without the token, "
                "blue: it rises; ␣ is a space, ↵ a newline",
            ],
        )
    )


def sae_training(logs: Mapping[str, Mapping[str, Any]]) -> alt.HConcatChart:
    """Each trained SAE's FVU and dead fraction against training tokens."""
    frames = []
    for site, log in logs.items():
        fvu = list(log.get("fvu", []))
        if not fvu:
            continue
        seen = float(log.get("tokens_seen", len(fvu)))
        step_tokens = seen / len(fvu)
        dead = list(log.get("dead_fraction", [float("nan")] * len(fvu)))
        frames.append(
            pl.DataFrame(
                {
                    "site": [site] * len(fvu),
                    "tokens": [step_tokens * (i + 1) for i in range(len(fvu))],
                    "fvu": [float(v) for v in fvu],
                    "dead": [100.0 * float(v) for v in dead[: len(fvu)]],
                }
            )
        )
    frame = _frame(pl.concat(frames)) if frames else _frame(pl.DataFrame({"site": []}))
    x = alt.X("tokens:Q", title="training tokens seen")
    colour = alt.Color("site:N", title="site")
    fvu = (
        alt.Chart(frame)
        .mark_line()
        .encode(
            x=x,
            y=alt.Y(
                "fvu:Q",
                title="FVU (fraction of variance unexplained, log)",
                scale=alt.Scale(type="log"),
            ),
            color=colour,
        )
        .properties(width=300, height=200)
    )
    dead = (
        alt.Chart(frame)
        .mark_line()
        .encode(x=x, y=alt.Y("dead:Q", title="dead latents (% of width)"), color=colour)
        .properties(width=220, height=200)
    )
    total = max((float(log.get("tokens_seen", 0)) for log in logs.values()), default=0.0)
    return alt.hconcat(fvu, dead).properties(
        title=_title(
            "SAE training: reconstruction error and dead latents",
            f"per training batch; up to {total:,.0f} training tokens per SAE",
        )
    )


GAIN_COLUMN = {"raw": "gain", "fvu": "gain_fvu", "seed": "gain_seed"}
POSITION_COLOURS = alt.Scale(
    domain=["same_position", "undecided", "needs_context"], range=["#2ca02c", "#bcbd22", "#d62728"]
)
SOURCE_COLOURS = ["#7f7f7f", "#1f77b4", "#ff7f0e"]  # skip (residual), attention, MLP


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
        alt.Chart(_frame(alive))
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
        alt.Chart(_frame(pl.DataFrame({"at": [threshold]})))
        .mark_rule(strokeDash=[5, 3], color="black")
        .encode(y="at:Q")
    )
    return (points + rule).properties(
        width=420,
        height=320,
        title=_title(
            "Predicted against caused: does each attention feature use earlier tokens?",
            [
                f"{alive.height:,} features alive in both; resampling on {contexts} held-out "
                f"contexts × {targets} target positions; dashed: FVU {threshold:g}",
                "above the line: the code changes when earlier tokens come from another text",
            ],
        ),
    )


def position_gains(
    table: pl.DataFrame, form: str, tau: float, tokens_heldout: int | None, bins: int = 40
) -> alt.LayerChart:
    """Histogram of each attention feature's gain from earlier positions (MSE of the
    same-position fit − MSE of the fit with context) on a symlog axis, so losses (< 0, the
    wider fit overfits) show beside gains, stacked by verdict, with τ as a rule."""
    column = GAIN_COLUMN.get(form, "gain_seed")
    alive = table.filter(pl.col("status") != "dead")
    gains = alive[column].to_numpy().astype(float)
    kinds = alive["verdict" if "verdict" in alive.columns else "status"].to_numpy()
    ok = np.isfinite(gains)
    gains, kinds = gains[ok], kinds[ok]
    scale_c = tau / 10 if tau > 0 else float(np.median(np.abs(gains))) if len(gains) else 1.0
    scale_c = scale_c if scale_c > 0 else 1e-6
    rows: list[dict[str, Any]] = []
    span = (0.0, 1.0)  # the axis' extent, for its ticks
    if len(gains):
        t = np.sign(gains) * np.log1p(np.abs(gains) / scale_c)
        lo, hi = float(t.min()), float(t.max())
        lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo, hi)
        edges_t = np.linspace(lo, hi, bins + 1)
        edges = np.sign(edges_t) * scale_c * np.expm1(np.abs(edges_t))
        span = (float(edges[0]), float(edges[-1]))
        which = np.clip(np.searchsorted(edges_t, t, side="right") - 1, 0, bins - 1)
        for b in range(bins):
            base = 0
            for kind in ("same_position", "undecided", "needs_context"):
                n = int(((which == b) & (kinds == kind)).sum())
                if n:
                    rows.append({"lo": edges[b], "hi": edges[b + 1], "y0": base,
                                 "y1": base + n, "count": n, "verdict": kind})  # fmt: skip
                    base += n
    frame = pl.DataFrame(
        rows,
        schema={"lo": pl.Float64, "hi": pl.Float64, "y0": pl.Int64, "y1": pl.Int64,
                "count": pl.Int64, "verdict": pl.String},
    )  # fmt: skip
    x_scale = alt.Scale(type="symlog", constant=scale_c)
    ticks = [0.0] + [
        sign * 10.0**k
        for k in range(int(np.floor(np.log10(scale_c))), 4)
        for sign in (-1.0, 1.0)
        if span[0] <= sign * 10.0**k <= span[1]
    ]
    bars = (
        alt.Chart(_frame(frame))
        .mark_rect()
        .encode(
            x=alt.X(
                "lo:Q",
                title=f"gain from earlier positions, MSE_same − MSE_context, "
                f"{FORM_UNITS.get(form, form)}, symlog",
                scale=x_scale,
                axis=alt.Axis(values=sorted(ticks), format="~g"),
            ),
            x2="hi:Q",
            y=alt.Y("y0:Q", title="attention output features"),
            y2="y1:Q",
            color=alt.Color(
                "verdict:N", title="verdict (95% interval vs τ)", scale=POSITION_COLOURS
            ),
            tooltip=["lo:Q", "hi:Q", "count:Q", "verdict:N"],
        )
    )
    marks = pl.DataFrame({"at": [0.0, tau], "name": ["no gain", f"τ = {tau:.3g}"]})
    rules = (
        alt.Chart(_frame(marks))
        .mark_rule(strokeDash=[5, 3], color="black")
        .encode(x=alt.X("at:Q", scale=x_scale), tooltip=["name:N", "at:Q"])
    )
    text = (
        alt.Chart(_frame(marks.filter(pl.col("at") > 0)))
        .mark_text(align="left", dx=4, dy=4, baseline="top")
        .encode(x=alt.X("at:Q", scale=x_scale), y=alt.value(0), text="name:N")
    )
    held = f"{tokens_heldout:,} held-out tokens" if tokens_heldout else "held-out tokens"
    above = int((gains > tau).sum())
    return (bars + rules + text).properties(
        width=480,
        height=260,
        title=_title(
            "What earlier positions add to each attention feature (dashed: 0 and τ)",
            [
                f"{len(gains):,} alive features, {above:,} with a gain above τ; least squares "
                f"without L1 on {held}",
                "left of 0: the wider fit does worse on held-out tokens (it overfits)",
            ],
        ),
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
    bars = (
        alt.Chart(_frame(frame))
        .mark_rect()
        .encode(
            x=alt.X(
                "x0:Q",
                title=f"alive {target} features, grouped by the source that explains most, "
                "ranked within each group (count)",
                scale=alt.Scale(domain=[0, max(n, 1)], nice=False),
            ),
            x2="x1:Q",
            y=alt.Y("y0:Q", title="share of the feature's variance, cov(ŷ_s, y) / var(y)"),
            y2="y1:Q",
            color=alt.Color(
                "source:N",
                title="source",
                scale=alt.Scale(domain=list(sources), range=SOURCE_COLOURS[: len(sources)]),
                sort=list(sources),
            ),
            tooltip=["source:N", alt.Tooltip("share:Q", format=".3f"), "features:Q"],
        )
    )
    rules = (
        alt.Chart(_frame(pl.DataFrame({"at": boundaries}, schema={"at": pl.Float64})))
        .mark_rule(color="black", strokeDash=[2, 2])
        .encode(x="at:Q")
    )
    grouped = ", ".join(f"{s} {c:,}" for s, c in zip(sources, counts, strict=True))
    return (bars + rules).properties(
        width=560,
        height=260,
        title=_title(
            f"Where each {target} feature comes from: variance share per source",
            [
                f"least squares on every source, training tokens; bars average {per_bin} "
                f"feature{'s' if per_bin > 1 else ''}; the stack's height is the fit's R²",
                f"features the source explains most: {grouped}",
            ],
        ),
    )


def layer_shares(frame: pl.DataFrame) -> alt.LayerChart:
    """Per layer and series (MLP linear, attention linear, attention same position): the
    percent of alive features at each layer's own τ (solid, its noise bracket, at least –
    at most, as a band) and at the seed's τ = 0.001 (dashed), which is one threshold for
    every layer."""
    x = alt.X("layer:O", title="block ℓ (layer)")
    names = frame["series"].unique(maintain_order=True).to_list()
    palette = alt.Scale(
        domain=names, range=["#1f77b4", "#ff7f0e", "#d62728", "#2ca02c"][: len(names)]
    )
    y_title = "percent of alive features (%)"
    band = (
        alt.Chart(_frame(frame.filter(pl.col("low").is_not_null())))
        .mark_area(opacity=0.12)
        .encode(
            x=x,
            y=alt.Y("low:Q", title=y_title),
            y2="high:Q",
            fill=alt.Fill(
                "series:N", title="share", scale=palette, legend=alt.Legend(symbolOpacity=1)
            ),
            detail="threshold:N",
        )
    )
    y = alt.Y("percent:Q", title=y_title, scale=alt.Scale(domain=[0, 100]))
    colour = alt.Color("series:N", title="share", scale=palette)
    lines = (
        alt.Chart(_frame(frame))
        .mark_line()
        .encode(
            x=x,
            y=y,
            color=colour,
            strokeDash=alt.StrokeDash(
                "threshold:N", title="threshold", sort=None,
                scale=alt.Scale(range=[[1, 0], [5, 3]]),
                legend=alt.Legend(symbolType="stroke", symbolStrokeColor="black"),
            ),
        )
    )  # fmt: skip
    points = (
        alt.Chart(_frame(frame))
        .mark_point(filled=True, size=40)
        .encode(
            x=x,
            y=y,
            color=colour,
            tooltip=["layer:O", "series:N", "threshold:N",
                     alt.Tooltip("percent:Q", format=".1f"), alt.Tooltip("low:Q", format=".1f"),
                     alt.Tooltip("high:Q", format=".1f"), alt.Tooltip("tau:Q", format=".3g")],
        )
    )  # fmt: skip
    return (band + lines + points).properties(
        width=460,
        height=260,
        title=_title(
            "Linear and same-position shares per layer",
            [
                "solid: at each layer's own τ (calibrated where calibration ran), band: the "
                "share beyond the noise floor (at least – at most);",
                "dashed: at the seed's τ = 0.001 (seed form), one threshold for every layer",
            ],
        ),
    )


def layer_composition(frame: pl.DataFrame, r2: pl.DataFrame) -> alt.LayerChart:
    """Per layer, the next stream's variance share per source (stacked bars; least squares
    on training tokens) and the sparse fit's held-out R² (black ticks)."""
    sources = frame["source"].unique(maintain_order=True).to_list()
    x = alt.X("layer:O", title="block ℓ (layer)")
    bars = (
        alt.Chart(_frame(frame))
        .mark_bar()
        .encode(
            x=x,
            y=alt.Y("share:Q", title="share of resid_pre[ℓ+1] feature variance (mean)"),
            color=alt.Color(
                "source:N",
                title="source",
                sort=sources,
                scale=alt.Scale(domain=sources, range=SOURCE_COLOURS[: len(sources)]),
            ),
            order=alt.Order("rank:Q"),
            tooltip=["layer:O", "source:N", alt.Tooltip("share:Q", format=".3f")],
        )
    )
    ticks = (
        alt.Chart(_frame(r2))
        .mark_tick(color="black", thickness=2, size=30)
        .encode(x=x, y="r2:Q", tooltip=["layer:O", alt.Tooltip("r2:Q", format=".3f")])
    )
    return (bars + ticks).properties(
        width=460,
        height=260,
        title=_title(
            "Residual composition per layer: which source the next stream's features come from",
            "bars: mean variance share per source (least squares, training tokens; they add "
            "up to its R²); black tick: the sparse fit's held-out R²",
        ),
    )


def layer_decoded(frame: pl.DataFrame) -> alt.Chart:
    """Per layer, the decoded checks' FVU against the true next stream."""
    return (
        alt.Chart(_frame(frame))
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:O", title="block ℓ (layer)"),
            y=alt.Y("fvu:Q", title="FVU of resid_pre[ℓ+1] (fraction of variance unexplained)"),
            color=alt.Color("check:N", title="check", sort=None),
            tooltip=["layer:O", "check:N", alt.Tooltip("fvu:Q", format=".4g")],
        )
        .properties(
            width=460,
            height=260,
            title=_title(
                "Decoded checks per layer: how much of the next stream each reading gives back",
                "raw activations of the evaluation contexts; lower is better, the target SAE's "
                "own reconstruction is the floor for the decoded composition",
            ),
        )
    )


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
