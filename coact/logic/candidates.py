"""Each target's candidate inputs: its strongest connections in a connector's weights table."""

from __future__ import annotations

import numpy as np
import polars as pl
import scipy.sparse as sp

from coact.logic.config import LogicConfig

# --- candidates --------------------------------------------------------------------------


def _candidates(
    weights: pl.DataFrame,
    targets: np.ndarray,
    std: tuple[np.ndarray, np.ndarray] | None,
    config: LogicConfig,
) -> tuple[np.ndarray, np.ndarray]:
    """(T, K) inputs and their weights: each target's strongest connections by standardised
    weight, at least `min_standardised` and `relative_cut` × its strongest."""
    frame = weights.filter(pl.col("output").is_in(targets.tolist()))
    if "standardised" not in frame.columns:
        assert std is not None
        sd_in, sd_out = std
        w = frame["weight_refit"].to_numpy()
        out_sd = sd_out[frame["output"].to_numpy()]
        score = np.abs(w) * sd_in[frame["input"].to_numpy()] / np.where(out_sd > 0, out_sd, np.inf)
        frame = frame.with_columns(pl.Series("standardised", score))
    frame = (
        frame.filter(pl.col("standardised") >= config.min_standardised)
        .filter(
            pl.col("standardised")
            >= config.relative_cut * pl.col("standardised").max().over("output")
        )
        .sort(["output", "standardised"], descending=[False, True])
        .group_by("output", maintain_order=True)
        .head(config.max_inputs)
        .with_columns(pl.int_range(pl.len()).over("output").alias("slot"))
    )
    where = {int(t): i for i, t in enumerate(targets)}
    inputs = np.full((len(targets), config.max_inputs), -1, np.int64)
    values = np.full((len(targets), config.max_inputs), np.nan)
    rows = np.array([where[int(o)] for o in frame["output"].to_list()], dtype=np.int64)
    slots = frame["slot"].to_numpy()
    inputs[rows, slots] = frame["input"].to_numpy()
    values[rows, slots] = frame["weight_refit"].to_numpy()
    return inputs, values


def _std(codes: sp.spmatrix) -> np.ndarray:
    n = max(codes.shape[0], 1)
    mean = np.asarray(codes.sum(axis=0), dtype=float).ravel() / n
    sq = np.asarray(codes.multiply(codes).sum(axis=0), dtype=float).ravel() / n
    return np.sqrt(np.maximum(sq - mean**2, 0.0))


def _compact(
    inputs: np.ndarray, weights: np.ndarray, keep: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Drop the slots not kept, moving the rest to the front (order preserved)."""
    order = np.argsort(~keep, axis=1, kind="stable")
    inputs = np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(inputs, order, 1), -1)
    weights = np.where(inputs >= 0, np.take_along_axis(weights, order, 1), np.nan)
    return inputs, weights
