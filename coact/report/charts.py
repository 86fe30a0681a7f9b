"""Charts of a run's results (altair): each with a title, axis units and the tokens it
rests on in its subtitle, saved as vega-lite JSON (interactive) and PNG (static)."""

from __future__ import annotations

from pathlib import Path

import altair as alt
import polars as pl

from coact.rundir.files import atomic_write


def save(chart: alt.TopLevelMixin, path_stem: Path) -> list[Path]:
    """`<stem>.vl.json` and `<stem>.png`, each written atomically (a dot in the stem stays)."""
    spec = chart.to_json()
    paths = [path_stem.with_name(path_stem.name + ext) for ext in (".vl.json", ".png")]
    atomic_write(paths[0], lambda tmp: tmp.write_text(spec))
    atomic_write(paths[1], lambda tmp: chart.save(str(tmp), format="png", scale_factor=2))
    return paths


def _title(text: str, subtitle: str) -> alt.TitleParams:
    return alt.TitleParams(text, subtitle=subtitle, anchor="start")


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
    band = base.mark_area(opacity=0.2).encode(
        y=alt.Y("delta_ce_low:Q", title="ΔCE, next-token loss (nats per token)"),
        y2="delta_ce_high:Q",
    )
    line = base.mark_line(point=True).encode(
        y="delta_ce:Q",
        tooltip=["kind:N", "strength:Q", "realised_nmse:Q", "delta_ce:Q", "kl:Q"],
    )
    return (band + line).properties(
        width=420,
        height=260,
        title=_title(
            f"Noise at {site}: how much loss each kind of error costs",
            f"SAE-shaped noise lies along active decoder directions; bands: 95% bootstrap "
            f"over {n_contexts} contexts, {n_tokens:,} tokens",
        ),
    )


def threshold_curve(splices: pl.DataFrame, tau: float, tolerance: float) -> alt.LayerChart:
    """Extra ΔCE over the all-mlp splice against τ, the tolerance ε and the chosen τ."""
    rows = splices.filter(pl.col("tau").is_not_null())
    n_tokens, n_contexts = int(rows["n_tokens"][0]), int(rows["n_contexts"][0])
    data = rows.to_pandas()
    base = alt.Chart(data).encode(
        x=alt.X("features_linear:Q", title="features given linear predictions (τ rising →)")
    )
    band = base.mark_area(opacity=0.2).encode(
        y=alt.Y("extra_delta_ce_low:Q", title="extra ΔCE over the mlp splice (nats per token)"),
        y2="extra_delta_ce_high:Q",
    )
    line = base.mark_line(point=True).encode(
        y="extra_delta_ce:Q",
        tooltip=["splice:N", "tau:Q", "features_linear:Q", "extra_delta_ce:Q", "extra_kl:Q"],
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
    return (band + line + eps + mark).properties(
        width=420,
        height=260,
        title=_title(
            f"Calibrating τ: the diamond is τ = {tau:.3g}, dashed line ε = {tolerance:g} nats",
            f"linear predictions for features with d ≤ τ, mlp for the rest; bands: 95% "
            f"bootstrap over {n_contexts} contexts, {n_tokens:,} tokens",
        ),
    )


def coactivation(
    data: pl.DataFrame, inputs: list[int], target: int, title: str
) -> alt.TopLevelMixin:
    """Input activations against each other on tokens where any input or the target fires,
    coloured by the target's activation: a grid of pairs for three or four inputs."""
    names = [f"in {i}" for i in inputs]
    out = f"out {target}"
    frame = data.to_pandas()
    color = alt.Color(f"{out}:Q", title=f"{out} activation", scale=alt.Scale(scheme="viridis"))
    subtitle = f"{len(frame):,} tokens where an input or the target is active (code units)"
    if len(names) <= 2:  # one input: against the target itself; two: against each other
        y_name = names[1] if len(names) == 2 else out
        chart = (
            alt.Chart(frame)
            .mark_circle(size=14, opacity=0.6)
            .encode(
                x=alt.X(f"{names[0]}:Q", title=f"{names[0]} activation"),
                y=alt.Y(f"{y_name}:Q", title=f"{y_name} activation"),
                color=color,
            )
        )
        return chart.properties(width=320, height=260, title=_title(title, subtitle))
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    panels = [
        alt.Chart(frame)
        .mark_circle(size=10, opacity=0.6)
        .encode(
            x=alt.X(f"{a}:Q", title=f"{a} activation"),
            y=alt.Y(f"{b}:Q", title=f"{b} activation"),
            color=color,
        )
        .properties(width=180, height=160)
        for a, b in pairs
    ]
    rows = [alt.hconcat(*panels[i : i + 3]) for i in range(0, len(panels), 3)]
    return alt.vconcat(*rows).properties(title=_title(title, subtitle))


def truth_table(table: pl.DataFrame, title: str) -> alt.LayerChart:
    """P(target active) per input pattern as a heat map, with each row's token count."""
    frame = table.with_columns(
        pl.format("{} ({} tokens)", pl.col("pattern"), pl.col("count")).alias("row")
    ).to_pandas()
    base = alt.Chart(frame).encode(
        y=alt.Y("row:N", title="inputs active (bit j = input j), tokens", sort=None)
    )
    heat = (
        base.mark_rect()
        .encode(
            x=alt.X("quantity:N", title=None, axis=alt.Axis(labels=False, ticks=False)),
            color=alt.Color("p_active:Q", title="P(target active)", scale=alt.Scale(domain=[0, 1])),
        )
        .transform_calculate(quantity="'P(target active)'")
    )
    text = (
        base.mark_text()
        .encode(x=alt.X("quantity:N"), text=alt.Text("p_active:Q", format=".2f"))
        .transform_calculate(quantity="'P(target active)'")
    )
    tokens = int(table["count"].sum()) if table.height else 0
    return (heat + text).properties(
        width=160,
        title=_title(
            title,
            f"truth table over {tokens:,} tokens; rows with fewer than the "
            "minimum tokens are unobserved",
        ),
    )


def cluster_summary(clusters: pl.DataFrame, title: str) -> alt.TopLevelMixin:
    """Each co-activation mode's centroid per input (heat map), with its share of tokens
    and the target's mean: where the target fires, and where its inputs fire but it does not."""
    rows = []
    for r in clusters.filter(pl.col("cluster") >= 0).iter_rows(named=True):
        name = (
            f"{r['kind']} #{r['cluster']}: {100 * r['share']:.0f}% of tokens, "
            f"target {r['target_mean']:.2f}"
        )
        for i, value in zip(r["inputs"], r["centroid"], strict=True):
            rows.append({"mode": name, "input": f"in {i}", "centroid": value})
    frame = pl.DataFrame(
        rows, schema={"mode": pl.String, "input": pl.String, "centroid": pl.Float64}
    )
    base = alt.Chart(frame.to_pandas()).encode(
        x=alt.X("input:N", title="input feature", axis=alt.Axis(labelAngle=0)),
        y=alt.Y(
            "mode:N",
            title="co-activation mode (HDBSCAN)",
            sort=None,
            axis=alt.Axis(labelLimit=400),
        ),
    )
    heat = base.mark_rect().encode(
        color=alt.Color("centroid:Q", title="mean activation (code units)")
    )
    text = base.mark_text().encode(text=alt.Text("centroid:Q", format=".2f"))
    tokens = int(clusters["size"].sum()) if clusters.height else 0
    return (heat + text).properties(
        width=220,
        title=_title(title, f"modes found among {tokens:,} sampled tokens (noise points left out)"),
    )
