"""One target from given input columns (label_feature, truth_table, clusters) via label_layer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import polars as pl
import scipy.sparse as sp

from coact.logic.config import LogicConfig
from coact.logic.counts import _Codes, _count
from coact.logic.layer import _truth_frame, label_layer

# --- one feature -------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureLabel:
    label: str
    confidence: float
    inputs: list[int]  # columns of x_cols kept
    negated: int | None  # the negated column for A-AND-NOT-B
    features: pl.DataFrame  # the row of `label_layer`'s table (all counts and MI)
    truth_table: pl.DataFrame
    clusters: pl.DataFrame


def _columns(a: np.ndarray | sp.spmatrix) -> sp.csc_matrix:
    m = sp.csc_matrix(a, dtype=np.float32) if sp.issparse(a) else None
    if m is None:
        dense = np.asarray(a, dtype=np.float32)
        m = sp.csc_matrix(dense.reshape(len(dense), -1))
    if m.data.size and m.data.min() < 0:
        raise ValueError("codes must be non-negative")
    return m


def label_feature(
    x_cols: np.ndarray | sp.spmatrix,
    target: np.ndarray | sp.spmatrix,
    config: LogicConfig = LogicConfig(),
    names: Sequence[str] | None = None,
) -> FeatureLabel:
    """Label one target from given input columns (tokens × k, k ≤ max_inputs; all used,
    in this order, then pruned), by the same rules as `label_layer`."""
    x, y = _columns(x_cols), _columns(target)
    k = x.shape[1]
    if k > 4:
        raise ValueError(f"at most 4 input columns, got {k}")
    config = replace(config, max_inputs=max(k, 1), min_standardised=0.0, relative_cut=0.0)
    weights = pl.DataFrame(
        {"output": [0] * k, "input": list(range(k)), "weight_refit": [1.0] * k,
         "standardised": np.linspace(1.0, 0.99, k) if k else []},
        schema={"output": pl.Int64, "input": pl.Int64, "weight_refit": pl.Float64,
                "standardised": pl.Float64},
    )  # fmt: skip
    result = label_layer(x, y, weights, config, progress=False)
    row = result.features.row(0, named=True)
    truth = result.truth_tables
    if names is not None:
        kept = row["inputs"]
        truth = truth.with_columns(
            pl.col("pattern")
            .map_elements(lambda p: _named(p, [names[i] for i in kept]), return_dtype=pl.String)
            .alias("pattern")
        )
    return FeatureLabel(
        row["label"], float(row["confidence"]), list(row["inputs"]), row["negated"],
        result.features, truth, result.clusters,
    )  # fmt: skip


def _named(pattern: str, names: Sequence[str]) -> str:
    if pattern == "-":
        return "none"
    return " ".join(f"{n}" if b == "1" else f"¬{n}" for b, n in zip(pattern, names, strict=True))


def truth_table(
    x_cols: np.ndarray | sp.spmatrix,
    target: np.ndarray | sp.spmatrix,
    floor: float = LogicConfig.floor,
    names: Sequence[str] | None = None,
) -> pl.DataFrame:
    """One row per pattern of the given inputs (all kept, none pruned): the pattern (a bit
    per input, in column order, and one boolean column per input name), tokens,
    target-active tokens, P(active), mean activation and mean activation when active."""
    x, y = _columns(x_cols), _columns(target)
    k = x.shape[1]
    if not 1 <= k <= 4:
        raise ValueError(f"1–4 input columns, got {k}")
    names = [f"x{j}" for j in range(k)] if names is None else list(names)
    xc, yc = _Codes.of(x, floor), _Codes.of(y, floor)
    counts = _count(xc, yc, np.zeros(1, np.int64), np.arange(k)[None, :], 1)
    frame = _truth_frame(counts, LogicConfig(min_tokens=1))
    flags = [pl.col("pattern").str.slice(j, 1).eq("1").alias(name) for j, name in enumerate(names)]
    return frame.drop("output", "observed").with_columns(flags)


def clusters(
    x_cols: np.ndarray | sp.spmatrix,
    target: np.ndarray | sp.spmatrix,
    config: LogicConfig = LogicConfig(),
    names: Sequence[str] | None = None,
) -> pl.DataFrame:
    """Co-activation clusters of one target over all the given input columns (tokens × k)."""
    return label_feature(x_cols, target, replace(config, prune=False), names).clusters
