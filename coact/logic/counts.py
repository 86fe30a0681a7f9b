"""Codes binarised at their floors and what labels rest on: truth-table counts, events, MI."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from coact.logic._kernels import _count_kernel, _events_kernel
from coact.logic.config import LogicConfig

# --- binarising --------------------------------------------------------------------------


def _sorted_columns(csc: sp.csc_matrix) -> tuple[np.ndarray, np.ndarray]:
    """Each column's values sorted ascending (column-major) and the column of each: one
    integer sort of (column, the value's bits), which orders non-negative floats."""
    counts = np.diff(csc.indptr)
    cols = np.repeat(np.arange(csc.shape[1], dtype=np.int64), counts)
    bits = np.abs(csc.data).astype(np.float32).view(np.uint32).astype(np.int64)
    key = np.sort((cols << 32) | bits)
    return (key & 0xFFFFFFFF).astype(np.uint32).view(np.float32), key >> 32


def activation_floors(codes: sp.spmatrix, floor: float) -> np.ndarray:
    """Per column: floor × the median of its non-zero values (0 for an empty column)."""
    csc = sp.csc_matrix(codes)
    data, _ = _sorted_columns(csc)
    return floor * _median(csc.indptr, data)


def _median(indptr: np.ndarray, data: np.ndarray) -> np.ndarray:
    counts = np.diff(indptr)
    lo = indptr[:-1] + np.maximum(counts - 1, 0) // 2
    hi = indptr[:-1] + counts // 2
    median = np.zeros(len(counts))
    has = counts > 0
    median[has] = (data[lo[has]].astype(np.float64) + data[hi[has]]) / 2
    return median


# --- the counts of a set of targets ------------------------------------------------------


@dataclass
class _Counts:
    """Truth-table counts of targets (columns of y) over their inputs (columns of x)."""

    targets: np.ndarray  # (T,) columns of y
    inputs: np.ndarray  # (T, K) columns of x, −1 past each target's k
    n: np.ndarray  # (T, R) tokens per row, R = 2^K
    active: np.ndarray  # (T, R) target-active tokens per row
    y_sum: np.ndarray  # (T, R)
    y_sum_active: np.ndarray  # (T, R)
    beta: np.ndarray  # (T, K) the target's slope on each input alone
    beta_ok: np.ndarray  # (T, K) that slope rests on an observed one-input row
    moments: np.ndarray  # (T, K, 9) of (x / median, y) on the one-input row, target active
    tertiles: np.ndarray  # (T, K, 3, 4) per tertile of x there: tokens, active, Σy, Σy²
    n_tokens: int

    @property
    def k(self) -> np.ndarray:
        return (self.inputs >= 0).sum(axis=1)


@dataclass(frozen=True)
class _Codes:
    """A site's codes as CSC parts with their activation floors (sliced once)."""

    ptr: np.ndarray
    idx: np.ndarray
    val: np.ndarray
    floors: np.ndarray
    median: np.ndarray
    edges: np.ndarray  # (columns, 2) the tertiles of each column's values above its floor
    n_tokens: int

    @classmethod
    def of(cls, codes: sp.spmatrix, floor: float) -> _Codes:
        csc = sp.csc_matrix(codes, dtype=np.float32)
        csc.sum_duplicates()
        csc.sort_indices()
        data, cols = _sorted_columns(csc)
        median = _median(csc.indptr, data)
        return cls(
            csc.indptr.astype(np.int64), csc.indices.astype(np.int64), csc.data,
            floor * median, median, _tertiles(data, cols, floor * median), csc.shape[0],
        )  # fmt: skip


def _tertiles(data: np.ndarray, cols: np.ndarray, floors: np.ndarray) -> np.ndarray:
    """Per column, its values' 1/3 and 2/3 quantiles above its floor (0 when none), from
    the values sorted within columns."""
    keep = data > floors[cols]
    data, cols = data[keep], cols[keep]
    n = np.bincount(cols, minlength=len(floors))
    start = np.concatenate([[0], np.cumsum(n)[:-1]])
    edges = np.zeros((len(floors), 2))
    has = n > 0
    for q, share in enumerate((1 / 3, 2 / 3)):
        at = start + np.minimum((share * n).astype(np.int64), np.maximum(n - 1, 0))
        edges[has, q] = data[at[has]]
    return edges


def _count(
    x: _Codes, y: _Codes, targets: np.ndarray, inputs: np.ndarray, min_tokens: int
) -> _Counts:
    n_targets, width = inputs.shape
    rows = 1 << width
    n, act = np.zeros((n_targets, rows), np.int64), np.zeros((n_targets, rows), np.int64)
    ysum, ysum_act = np.zeros((n_targets, rows)), np.zeros((n_targets, rows))
    sxy, sxx = np.zeros((n_targets, width)), np.zeros((n_targets, width))
    moments, tertiles = np.zeros((n_targets, width, 9)), np.zeros((n_targets, width, 3, 4))
    unit = np.where(x.median > 0, x.median, 1.0)
    if n_targets:
        _count_kernel(
            x.ptr, x.idx, x.val, x.floors, y.ptr, y.idx, y.val, y.floors,
            targets.astype(np.int64), inputs.astype(np.int64), x.n_tokens,
            n, act, ysum, ysum_act, sxy, sxx, unit, x.edges, moments, tertiles,
        )  # fmt: skip
    n[:, 0] = x.n_tokens - n[:, 1:].sum(axis=1)
    singles = n[:, 1 << np.arange(width)] if width else np.zeros((n_targets, 0), np.int64)
    beta = np.divide(sxy, sxx, out=np.zeros_like(sxy), where=sxx > 0)
    beta_ok = (singles >= min_tokens) & (inputs >= 0)
    return _Counts(
        targets, inputs, n, act, ysum, ysum_act, beta, beta_ok, moments, tertiles, x.n_tokens
    )


@dataclass
class _Events:
    additivity: np.ndarray  # (T,) s, NaN where untested
    additivity_se: np.ndarray  # (T,)
    additivity_tokens: np.ndarray  # (T,)
    points: np.ndarray  # (2, E, K) sampled input vectors: kind 0 fires, 1 suppressed
    values: np.ndarray  # (2, E) the target there
    offsets: np.ndarray  # (2, T + 1)
    totals: np.ndarray  # (T, 2) tokens of each kind before sampling
    ratio: np.ndarray  # (T,) Σy / Σβx on multi-input rows, NaN where untested
    ratio_se: np.ndarray  # (T,)


def _ratio_of(sums: np.ndarray, min_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Σa / Σb and its standard error over contexts from (count, Σa, Σb, Σa_c², Σb_c²,
    Σa_c·b_c) per target (a_c, b_c: one context's sums): the ratio estimator's variance
    Σ_c (a_c − r·b_c)² / (Σb)²."""
    m, num, den, num2, den2, cross = sums.T
    tested = (m >= min_tokens) & (den > 0)
    safe = np.where(tested, den, 1.0)
    r = np.where(tested, num / safe, np.nan)
    r0 = np.nan_to_num(r)
    var = np.maximum(num2 - 2 * r0 * cross + r0**2 * den2, 0)
    return r, np.where(tested, np.sqrt(var) / safe, np.nan), m.astype(np.int64)


def _events(
    x: _Codes, y: _Codes, counts: _Counts, config: LogicConfig, context: np.ndarray
) -> _Events:
    n_targets, width = counts.inputs.shape
    fires = counts.active.sum(axis=1)
    suppressed = (counts.n - counts.active)[:, 1:].sum(axis=1)
    totals = np.stack([fires, suppressed], axis=1)
    cap = max(config.max_cluster_points, 1) if config.cluster else 0
    stride = np.maximum(-(-totals // max(cap, 1)), 1)
    kept = np.minimum(-(-totals // stride), cap)
    offsets = np.zeros((2, n_targets + 1), np.int64)
    offsets[:, 1:] = np.cumsum(kept, axis=0).T
    size = int(offsets[:, -1].max(initial=0))
    points = np.zeros((2, size, max(width, 1)), np.float32)
    values = np.zeros((2, size), np.float32)
    sums, ratio = np.zeros((n_targets, 6)), np.zeros((n_targets, 6))
    if n_targets:
        _events_kernel(
            x.ptr, x.idx, x.val, x.floors, y.ptr, y.idx, y.val, y.floors,
            counts.targets.astype(np.int64), counts.inputs.astype(np.int64), x.n_tokens,
            counts.beta, counts.beta_ok, stride, offsets, points, values, sums, ratio,
            context.astype(np.int64),
        )  # fmt: skip
    s, se, m = _ratio_of(sums, config.min_tokens)
    rho, rho_se, _ = _ratio_of(ratio, config.min_tokens)
    return _Events(s, se, m, points, values, offsets, totals, rho, rho_se)


def _bits(width: int) -> np.ndarray:
    """(R, K) bool: which inputs each truth-table row has active."""
    rows = np.arange(1 << width)
    return ((rows[:, None] >> np.arange(width)) & 1).astype(bool)


# --- mutual information ------------------------------------------------------------------


def mutual_information(counts: np.ndarray) -> np.ndarray:
    """I(U; V) in bits of contingency tables counts[..., u, v] (0 for an empty table)."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum(axis=(-2, -1), keepdims=True)
    joint = c / np.where(total > 0, total, 1.0)
    pu, pv = joint.sum(axis=-1, keepdims=True), joint.sum(axis=-2, keepdims=True)
    ratio = np.divide(joint, pu * pv, out=np.ones_like(joint), where=joint > 0)
    return (joint * np.log2(ratio)).sum(axis=(-2, -1))


def information(
    n: np.ndarray, active: np.ndarray, k: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From truth-table counts (T, R): I(T; row), I(T; X_i) per input (T, K; NaN past k)
    and synergy = I(T; row) − Σ_i I(T; X_i)."""
    table = np.stack([n - active, active], axis=-1)  # (T, R, 2)
    whole = mutual_information(table)
    width = int(np.log2(n.shape[-1]))
    bits = _bits(width)
    parts = np.full((len(n), width), np.nan)
    for j in range(width):
        on = table[:, bits[:, j]].sum(axis=1)
        off = table[:, ~bits[:, j]].sum(axis=1)
        parts[:, j] = mutual_information(np.stack([off, on], axis=1))
    parts[np.arange(width)[None, :] >= k[:, None]] = np.nan
    return whole, parts, whole - np.nansum(parts, axis=1)
