"""A feature page's parts from the block's own Jacobian: the mean-Jacobian formula beside
the connector's, the connector-free linearity verdict beside d(j), and the three-way
agreement of its checked connections (connector weight, mean Jacobian, ablation)."""

from __future__ import annotations

import polars as pl

from coact.report.feature_parts import table_row
from coact.report.markdown import md_table, num
from coact.rundir.read import RunData

AGREEMENT_COLUMNS = {  # jacobian/agreement.parquet: the columns a feature page shows
    "weight_refit": "connector weight",
    "jacobian_mean": "mean Jacobian",
    "actual_mean": "ablation (model)",
    "predicted_connector": "predicted (connector)",
    "predicted_jacobian": "predicted (Jacobian)",
    "exact_pre_change": "exact map (pre-activation)",
    "jacobian_size": "Jacobian size within 2×",
    "connector_size": "connector size within 2×",
}


def jacobian_formula(data: RunData, j: int) -> list[str]:
    row = table_row(data.jacobian_features, j, "output")
    if row is None or row["jacobian_formula"] is None:
        return []
    return [
        "From the block's own Jacobian (mean slope over every token where both fire, its "
        "five inputs of largest total attribution):",
        "",
        f"`{row['jacobian_formula']}`",
        "",
    ]


def jacobian_verdict(data: RunData, j: int) -> list[str]:
    row = table_row(data.jacobian_features, j, "output")
    if row is None:
        return []
    if row["jacobian_verdict"] == "too few tokens":
        text = f"active on {row['n_tokens']} held-out tokens, too few for a score"
    else:
        text = (
            f"one slope per connection misses {100 * row['nonlinearity']:.0f}% of its "
            f"first-order account (95%: {100 * row['nonlinearity_low']:.0f}–"
            f"{100 * row['nonlinearity_high']:.0f}%, {row['n_tokens']} tokens)"
        )
    return [f"From the block's own Jacobian: **{row['jacobian_verdict']}**; {text}.", ""]


def agreement_part(data: RunData, j: int) -> list[str]:
    if data.agreement is None or "actual_mean" not in data.agreement.columns:
        return []
    rows = data.agreement.filter(pl.col("output") == j)
    if not rows.height:
        return []
    table = [
        [f"in {r['input']}"] + [num(r[c]) for c in AGREEMENT_COLUMNS]
        for r in rows.iter_rows(named=True)
    ]
    return [
        "Three ways to the same connection: the connector's weight, the block's mean "
        "Jacobian, and the model's response to ablating the input, with both predictions of "
        "that response and the exact map's change of the pre-activation.",
        "",
        md_table(["input", *AGREEMENT_COLUMNS.values()], table),
        "",
    ]
