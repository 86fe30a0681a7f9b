"""A layer's labels summarised by how much of its features they explain: coverage, fit and
how many inputs a feature would need for its activation mass to be covered."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from coact.logic.config import LogicConfig

BUCKETS = ((1, 1), (2, 2), (3, 3), (4, 4), (5, 8), (9, 16), (17, 32), (33, 64))


def _bucket(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}"


@dataclass(frozen=True)
class CoverageSummary:
    """Alive features: how many carry a label other than UNEXPLAINED with inputs covering
    at least `coverage_target` of their activation mass (`explained`), the medians of
    coverage, held-out AUC and the share of the Jacobian's attribution the inputs carry,
    and the distribution of the inputs a greedy search needs to reach the target."""

    coverage_target: float
    min_lift: float
    max_inputs: int
    coverage_search: int
    alive: int
    explained: int
    share_explained: float
    median_coverage: float
    median_auc: float
    median_jacobian_share: float | None
    reached: int  # features whose search reached the target within coverage_search inputs
    inputs_needed: dict[str, float]  # p25, median, p75, p90 over those
    inputs_needed_histogram: dict[str, int]  # "1", "2", ..., "33-64", "not reached"

    @classmethod
    def of(cls, features: pl.DataFrame, config: LogicConfig) -> CoverageSummary:
        alive = features.filter(pl.col("label") != "DEAD")
        good = alive.filter(
            (pl.col("label") != "UNEXPLAINED") & (pl.col("coverage") >= config.coverage_target)
        )
        needed = alive["inputs_needed"].drop_nulls().to_numpy()
        histogram = {
            _bucket(lo, hi): int(((needed >= lo) & (needed <= hi)).sum()) for lo, hi in BUCKETS
        }
        histogram["not reached"] = int(alive.height - len(needed))
        quantiles = (
            dict(zip(("p25", "median", "p75", "p90"),
                     (float(q) for q in np.quantile(needed, [0.25, 0.5, 0.75, 0.9])),
                     strict=True))
            if len(needed) else {}
        )  # fmt: skip
        share = alive["jacobian_share"].drop_nulls() if "jacobian_share" in alive.columns else None
        return cls(
            coverage_target=config.coverage_target,
            min_lift=config.min_lift,
            max_inputs=config.max_inputs,
            coverage_search=config.coverage_search,
            alive=alive.height,
            explained=good.height,
            share_explained=good.height / alive.height if alive.height else float("nan"),
            median_coverage=_median(alive["coverage"]),
            median_auc=_median(alive["auc"]),
            median_jacobian_share=_median(share) if share is not None and len(share) else None,
            reached=len(needed),
            inputs_needed=quantiles,
            inputs_needed_histogram=histogram,
        )


def _median(column: pl.Series) -> float:
    values = column.drop_nulls().drop_nans().to_numpy()
    return float(np.median(values)) if len(values) else float("nan")
