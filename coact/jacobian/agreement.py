"""Three-way agreement of strong connections: the learned connector weight, the block's
mean Jacobian and the ablation effect (the causal check of `coact.calibrate.causal`).

The causal check removes input i from the stream on every token where it fires and
records the mean change of output j's code over those tokens. The Jacobian's prediction of
that mean is first-order: −Σ J_ji(t)·c_i(t) over the tokens where both fire, divided by the
tokens where i fires (where j is silent it stays silent to first order). The connector's
prediction is −w_ij·c_i. Each is judged as the causal check judges: sign, and size with
actual / predicted inside the band; across connections, Spearman's rank correlation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
from scipy.stats import spearmanr

from coact.rundir.results import Result


@dataclass(frozen=True, kw_only=True)
class Agreement(Result):
    """Shares over judged connections (NaN when none): sign and size agreement with the
    ablation for the connector and for the Jacobian, and of the connector's weight with
    the mean Jacobian; Spearman correlations across connections."""

    judged: int
    connector_sign: float
    connector_size: float
    jacobian_sign: float
    jacobian_size: float
    weight_jacobian_sign: float
    weight_jacobian_size: float
    connector_spearman: float
    jacobian_spearman: float
    weight_jacobian_spearman: float
    first_order_size: float  # Jacobian vs the exact map's pre-activation change
    threshold_size: float  # exact pre-activation change vs exact code change
    map_matches_ablation: float  # exact code change vs the model's ablation, within 5 %


def agreement_table(
    causal: pl.DataFrame, connections: pl.DataFrame, band: tuple[float, float]
) -> pl.DataFrame:
    """One row per checked connection, in the causal table's order."""
    joined = causal.select(
        "output", "input", "weight_refit", "n_tokens", "actual_mean", "predicted_mean", "judged"
    ).join(
        connections.select("output", "input", "jacobian_mean", "attribution_per_fire"),
        on=["output", "input"],
        how="left",
        maintain_order="left",
    )
    joined = joined.with_columns(
        pl.col("jacobian_mean").fill_null(0.0),
        predicted_jacobian=-pl.col("attribution_per_fire").fill_null(0.0),
    ).rename({"predicted_mean": "predicted_connector"})
    actual = pl.col("actual_mean")
    return joined.drop("attribution_per_fire").with_columns(
        connector_sign=_same_sign(actual, pl.col("predicted_connector")),
        connector_size=_within(actual, pl.col("predicted_connector"), band),
        jacobian_sign=_same_sign(actual, pl.col("predicted_jacobian")),
        jacobian_size=_within(actual, pl.col("predicted_jacobian"), band),
        weight_jacobian_sign=_same_sign(pl.col("jacobian_mean"), pl.col("weight_refit")),
        weight_jacobian_size=_within(pl.col("jacobian_mean"), pl.col("weight_refit"), band),
    )


def _same_sign(a: pl.Expr, b: pl.Expr) -> pl.Expr:
    return (a.sign() == b.sign()) & (b != 0)


def _within(a: pl.Expr, b: pl.Expr, band: tuple[float, float]) -> pl.Expr:
    ratio = a / b
    return (b != 0) & (ratio >= band[0]) & (ratio <= band[1])


def summarise(table: pl.DataFrame) -> Agreement:
    judged = table.filter(pl.col("judged"))

    def share(column: str) -> float:
        return float(judged[column].mean()) if judged.height else float("nan")  # type: ignore[arg-type]

    return Agreement(
        judged=judged.height,
        **{c: share(c) for c in _SHARES},
        connector_spearman=_spearman(judged, "predicted_connector", "actual_mean"),
        jacobian_spearman=_spearman(judged, "predicted_jacobian", "actual_mean"),
        weight_jacobian_spearman=_spearman(judged, "weight_refit", "jacobian_mean"),
    )


_SHARES = (
    "connector_sign", "connector_size", "jacobian_sign", "jacobian_size",
    "weight_jacobian_sign", "weight_jacobian_size", "first_order_size", "threshold_size",
    "map_matches_ablation",
)  # fmt: skip


def with_paths(table: pl.DataFrame, band: tuple[float, float]) -> pl.DataFrame:
    """Flags for the ablation's path (`coact.jacobian.paths` added its two columns)."""
    pre, code = pl.col("exact_pre_change"), pl.col("exact_code_change")
    actual = pl.col("actual_mean")
    return table.with_columns(
        first_order_size=_within(pre, pl.col("predicted_jacobian"), band).fill_null(False),
        threshold_size=_within(code, pre, band).fill_null(False),
        map_matches_ablation=((code - actual).abs() <= 0.05 * actual.abs() + 1e-4).fill_null(False),
    )


def _spearman(table: pl.DataFrame, a: str, b: str) -> float:
    x, y = table[a].to_numpy(), table[b].to_numpy()
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)
