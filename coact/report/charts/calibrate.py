"""Charts of calibration: noise curves, the threshold curve that picks τ, the spliced
losses, and the causal check of strong connections."""

from __future__ import annotations

import altair as alt
import numpy as np
import polars as pl

from coact.report.charts.base import chart_title, titled, to_pandas


def noise_curves(noise: pl.DataFrame, site: str) -> alt.LayerChart:
    """ΔCE against the noise's realised normalised MSE, one line per kind, with intervals."""
    data = noise.filter(pl.col("realised_nmse") > 0).to_pandas()
    n_tokens, n_contexts = int(noise["n_tokens"][0]), int(noise["n_contexts"][0])
    base = alt.Chart(data).encode(
        x=alt.X(
            "realised_nmse:Q",
            scale=alt.Scale(type="log"),
            title="noise MSE / variance of the site (normalised MSE)",
        ),
        color=alt.Color("kind:N", title="noise"),
    )
    tooltip = ["kind:N", "strength:Q", "realised_nmse:Q", "delta_ce:Q", "kl:Q"]
    return titled(
        _with_band(base, "delta_ce", "ΔCE, next-token loss (nats per token)", tooltip),
        f"Noise at {site}: how much loss each kind of error costs",
        f"SAE-shaped noise lies along active decoder directions; bands: 95% bootstrap "
        f"over {n_contexts} contexts, {n_tokens:,} tokens",
        420,
        260,
    )


def _with_band(base: alt.Chart, y: str, title: str, tooltip: list[str]) -> alt.LayerChart:
    """A curve of `y` with its interval (`<y>_low` to `<y>_high`) as a band beneath."""
    band = base.mark_area(opacity=0.2).encode(y=alt.Y(f"{y}_low:Q", title=title), y2=f"{y}_high:Q")
    return band + base.mark_line(point=True).encode(y=f"{y}:Q", tooltip=tooltip)


def threshold_curve(splices: pl.DataFrame, tau: float, tolerance: float) -> alt.LayerChart:
    """Extra ΔCE over the all-mlp splice against τ, the tolerance ε and the chosen τ."""
    rows = splices.filter(pl.col("tau").is_not_null())
    n_tokens, n_contexts = int(rows["n_tokens"][0]), int(rows["n_contexts"][0])
    data = rows.to_pandas()
    base = alt.Chart(data).encode(
        x=alt.X("features_linear:Q", title="features given linear predictions (τ rising →)")
    )
    tooltip = ["splice:N", "tau:Q", "features_linear:Q", "extra_delta_ce:Q", "extra_kl:Q"]
    curve = _with_band(
        base, "extra_delta_ce", "extra ΔCE over the mlp splice (nats per token)", tooltip
    )
    eps = (
        alt.Chart(pl.DataFrame({"y": [tolerance]}).to_pandas())
        .mark_rule(strokeDash=[4, 4], color="firebrick")
        .encode(y="y:Q")
    )
    chosen = rows.filter(pl.col("tau") == tau)
    mark = (
        alt.Chart(chosen.to_pandas())
        .mark_point(shape="diamond", size=150, filled=True, color="black")
        .encode(x="features_linear:Q", y="extra_delta_ce:Q")
    )
    return titled(
        curve + eps + mark,
        f"Calibrating τ: the diamond is τ = {tau:.3g}, dashed line ε = {tolerance:g} nats",
        f"linear predictions for features with d ≤ τ, mlp for the rest; bands: 95% "
        f"bootstrap over {n_contexts} contexts, {n_tokens:,} tokens",
        420,
        260,
    )


def splices(table: pl.DataFrame) -> alt.HConcatChart:
    """ΔCE (with its 95% interval) and KL for each named splice of the MLP output."""
    named = table.filter(pl.col("tau").is_null())
    n_tokens, n_contexts = int(table["n_tokens"][0]), int(table["n_contexts"][0])
    frame = to_pandas(named)
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
        title=chart_title(
            "Spliced MLP output: extra next-token loss and divergence from the clean model",
            f"bars: 95% bootstrap over {n_contexts} contexts, {n_tokens:,} tokens",
        )
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
        alt.Chart(to_pandas(frame))
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
        alt.Chart(to_pandas(pl.DataFrame({"v": [-span, span]})))
        .mark_line(strokeDash=[4, 4], color="gray")
        .encode(x="v:Q", y="v:Q")
    )
    tokens = int(frame["n_tokens"].sum()) if frame.height else 0
    return titled(
        diagonal + points,
        "Causal check: ablating a strong input, does the output move as the formula says?",
        f"{frame.height} connections judged, mean change over {tokens:,} tokens where the "
        "input fires; dashed: actual = predicted",
        360,
        300,
    )
