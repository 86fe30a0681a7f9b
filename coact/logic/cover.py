"""Inputs by coverage: each target's inputs grow, from a pool of model-grounded and
correlational candidates, until they cover a stated share of its activation mass."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import scipy.sparse as sp

from coact.logic._kernels import _cover_kernel
from coact.logic.config import LogicConfig
from coact.logic.counts import _Codes


@dataclass(frozen=True)
class Pool:
    """Per target t, candidate inputs idx[ptr[t]:ptr[t + 1]] (CSR-like)."""

    ptr: np.ndarray
    idx: np.ndarray

    @classmethod
    def of(
        cls,
        targets: np.ndarray,
        weights: pl.DataFrame,
        jacobian: pl.DataFrame | None,
        config: LogicConfig,
    ) -> Pool:
        """The connector's inputs with a positive weight, and the Jacobian's strongest
        `jacobian_inputs` by positive total attribution Σ J·c (n_tokens × attribution_mean)."""
        frames = [
            weights.filter(pl.col("weight_refit") > 0).select(
                pl.col("output").cast(pl.Int64), pl.col("input").cast(pl.Int64)
            )
        ]
        if jacobian is not None and jacobian.height:
            total = pl.col("attribution_mean") * pl.col("n_tokens")
            frames.append(
                jacobian.filter(total > 0)
                .sort(["output", total], descending=[False, True])
                .group_by("output", maintain_order=True)
                .head(config.jacobian_inputs)
                .select(pl.col("output").cast(pl.Int64), pl.col("input").cast(pl.Int64))
            )
        both = pl.concat(frames).unique(maintain_order=True)
        where = pl.DataFrame({"output": targets.astype(np.int64), "t": np.arange(len(targets))})
        joined = both.join(where, on="output").sort("t", maintain_order=True)
        t = joined["t"].to_numpy()
        ptr = np.zeros(len(targets) + 1, np.int64)
        ptr[1:] = np.cumsum(np.bincount(t, minlength=len(targets)))
        return cls(ptr, joined["input"].to_numpy().astype(np.int64))


@dataclass(frozen=True)
class _Rows:
    """The input codes by token (CSR), with each input's count of tokens above its floor."""

    ptr: np.ndarray
    idx: np.ndarray
    val: np.ndarray
    total: np.ndarray

    @classmethod
    def of(cls, x: sp.spmatrix, xc: _Codes) -> _Rows:
        rows = sp.csr_matrix(x, dtype=np.float32)
        rows.sum_duplicates()
        rows.sort_indices()
        above = xc.val > xc.floors[np.repeat(np.arange(len(xc.ptr) - 1), np.diff(xc.ptr))]
        total = np.diff(np.concatenate([[0], np.cumsum(above)])[xc.ptr])
        return cls(rows.indptr.astype(np.int64), rows.indices.astype(np.int64), rows.data, total)


def grow(
    rows: _Rows,
    xc: _Codes,
    yc: _Codes,
    targets: np.ndarray,
    chosen: np.ndarray,
    pool: Pool,
    config: LogicConfig,
    limit: int,
    target: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Add to each target's `chosen` inputs (T, W; −1 padded), greedily, the pool input with
    lift ≥ `min_lift` that covers most of its uncovered activation mass, while the covered
    share is under `target` (default `coverage_target`) and it has fewer than `limit`
    inputs. Returns the inputs (T, max(W, limit)) and the coverage curve (T, limit + 1):
    the share of activation mass covered by the first m inputs, NaN past the last."""
    width = max(chosen.shape[1], limit)
    out = np.full((len(targets), width), -1, np.int64)
    out[:, : chosen.shape[1]] = chosen
    curve = np.full((len(targets), width + 1), np.nan)
    if len(targets):
        _cover_kernel(
            xc.floors, rows.ptr, rows.idx, rows.val, rows.total, yc.ptr, yc.idx, yc.val,
            yc.floors, targets.astype(np.int64), out, pool.ptr[:-1], pool.ptr[1:], pool.idx,
            xc.n_tokens, config.min_lift,
            config.coverage_target if target is None else target, limit, curve,
        )  # fmt: skip
    return out, curve


def last(curve: np.ndarray) -> np.ndarray:
    """The last defined value of each row of a coverage curve (NaN for none)."""
    defined = ~np.isnan(curve)
    at = np.where(defined.any(axis=1), curve.shape[1] - 1 - np.argmax(defined[:, ::-1], axis=1), 0)
    return np.where(defined.any(axis=1), curve[np.arange(len(curve)), at], np.nan)


def inputs_needed(
    rows: _Rows, xc: _Codes, yc: _Codes, targets: np.ndarray, pool: Pool, config: LogicConfig
) -> tuple[np.ndarray, np.ndarray]:
    """How many pool inputs, picked greedily by coverage from none, reach
    `coverage_target` (−1: not within `coverage_search` or the pool), and the coverage
    they reach."""
    start = np.full((len(targets), 0), -1, np.int64)
    chosen, curve = grow(rows, xc, yc, targets, start, pool, config, config.coverage_search)
    reach = last(curve)
    k = (chosen >= 0).sum(axis=1)
    reached = np.nan_to_num(reach) >= config.coverage_target
    return np.where(reached, k, -1), reach
