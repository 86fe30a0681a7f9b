"""label_layer: candidates pruned and completed from counts, labelled into one features table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import polars as pl
import scipy.sparse as sp

from coact.logic._kernels import _gain_kernel
from coact.logic.candidates import _candidates, _compact, _std
from coact.logic.clustering import _all_clusters
from coact.logic.config import LABELS, REASONS, LayerLabels, LogicConfig
from coact.logic.counts import _Codes, _count, _Counts, _events, information
from coact.logic.rules import _bootstrap, _decide, _relevant

# --- the layer ---------------------------------------------------------------------------


def label_layer(
    x: sp.spmatrix,
    y: sp.spmatrix,
    weights: pl.DataFrame,
    config: LogicConfig = LogicConfig(),
    outputs: Sequence[int] | np.ndarray | None = None,
    progress: bool = True,
) -> LayerLabels:
    """Label every target (column of y; all, or `outputs`) from its top connections in
    `weights` (columns output, input, weight_refit, and standardised when present)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} tokens and y {y.shape[0]}")
    targets = np.arange(y.shape[1]) if outputs is None else np.asarray(outputs, np.int64)
    xc, yc = _Codes.of(x, config.floor), _Codes.of(y, config.floor)
    std = None if "standardised" in weights.columns else (_std(x), _std(y))
    inputs, w = _candidates(weights, targets, std, config)
    candidates = inputs.copy()
    counts = _count(xc, yc, targets, inputs, config.min_tokens)
    if config.prune:
        counts, w = _prune(counts, w, xc, yc, config)
    if config.complete:
        counts, w = _complete(counts, w, x, xc, yc, config)
        if config.prune:
            counts, w = _prune(counts, w, xc, yc, config)
    return _finish(counts, candidates, w, xc, yc, config, progress)


def _prune(
    counts: _Counts, w: np.ndarray, xc: _Codes, yc: _Codes, config: LogicConfig
) -> tuple[_Counts, np.ndarray]:
    """Drop inputs that never change a row's verdict, and count again where any went."""
    keep = _relevant(counts, config)
    changed = np.flatnonzero((keep != (counts.inputs >= 0)).any(axis=1))
    if len(changed) == 0:
        return counts, w
    inputs, w = _compact(counts.inputs, w, keep)
    return _recount(counts, xc, yc, changed, inputs, config), w


def _recount(
    counts: _Counts,
    xc: _Codes,
    yc: _Codes,
    which: np.ndarray,
    inputs: np.ndarray,
    config: LogicConfig,
) -> _Counts:
    """`counts` with the targets `which` counted again over their rows of `inputs`."""
    part = _count(xc, yc, counts.targets[which], inputs[which], config.min_tokens)
    out = replace(counts, inputs=inputs.copy(), **{k: getattr(counts, k).copy() for k in _PER_ROW})
    for name in _PER_ROW:
        getattr(out, name)[which] = getattr(part, name)
    return out


_PER_ROW = ("n", "active", "y_sum", "y_sum_active", "beta", "beta_ok")


def _complete(
    counts: _Counts,
    w: np.ndarray,
    x: sp.spmatrix,
    xc: _Codes,
    yc: _Codes,
    config: LogicConfig,
) -> tuple[_Counts, np.ndarray]:
    """Add, one at a time while a target has fewer than `max_inputs`, the input with the
    most conditional information about it given its current rows, when significant."""
    rows_x = sp.csr_matrix(x, dtype=np.float32)
    rows_x.sum_duplicates()
    rows_x.sort_indices()
    r_ptr, r_idx = rows_x.indptr.astype(np.int64), rows_x.indices.astype(np.int64)
    above = xc.val > xc.floors[np.repeat(np.arange(len(xc.ptr) - 1), np.diff(xc.ptr))]
    x_total = np.diff(np.concatenate([[0], np.cumsum(above)])[xc.ptr])
    settled = counts.active.sum(axis=1) == 0  # dead, or nothing significant left to add
    for _ in range(config.max_inputs):
        open_ = np.flatnonzero((counts.k < config.max_inputs) & ~settled)
        if len(open_) == 0:
            break
        best = np.full(len(open_), -1, np.int64)
        gain = np.zeros(len(open_))
        _gain_kernel(
            xc.ptr, xc.idx, xc.val, xc.floors, r_ptr, r_idx, rows_x.data, x_total,
            yc.ptr, yc.idx, yc.val, yc.floors, counts.targets[open_].astype(np.int64),
            counts.inputs[open_], xc.n_tokens, counts.n[open_], counts.active[open_],
            best, gain,
        )  # fmt: skip
        significant = (best >= 0) & (2 * xc.n_tokens * np.log(2) * gain >= config.min_g)
        settled[open_[~significant]] = True
        which = open_[significant]
        if len(which) == 0:
            break
        inputs = counts.inputs.copy()
        slot = counts.k[which]
        inputs[which, slot] = best[significant]
        w = w.copy()
        w[which, slot] = np.nan
        counts = _recount(counts, xc, yc, which, inputs, config)
    return counts, w


def _finish(
    counts: _Counts,
    candidates: np.ndarray,
    w: np.ndarray,
    xc: _Codes,
    yc: _Codes,
    config: LogicConfig,
    progress: bool,
) -> LayerLabels:
    events = _events(xc, yc, counts, config)
    k = counts.k
    label, negated_slot, reason = _decide(counts.n, counts.active, k, events.additivity, config)
    confidence = _bootstrap(counts, events, label, negated_slot, config)
    mi_row, mi_inputs, synergy = information(counts.n, counts.active, k)
    cluster_frame, n_clusters = _all_clusters(counts, events, xc, config, progress)
    width = counts.inputs.shape[1]
    single = counts.n[:, 1 << np.arange(width)] if width else np.zeros((len(k), 0))
    single_active = counts.active[:, 1 << np.arange(width)] if width else np.zeros((len(k), 0))
    everything = (1 << k) - 1
    rows = np.arange(len(k))
    negated = np.where(negated_slot >= 0, counts.inputs[rows, np.maximum(negated_slot, 0)], -1)

    def per_input(a: np.ndarray, cast: type) -> list[list]:
        return [[cast(v) for v in a[t, : k[t]]] for t in rows]

    features = pl.DataFrame(
        {
            "output": counts.targets.astype(np.int64),
            "label": [LABELS[i] for i in label],
            "confidence": confidence,
            "rule": [REASONS[i] for i in reason],
            "inputs": per_input(counts.inputs, int),
            "weights": per_input(w, float),
            "negated": [int(v) if v >= 0 else None for v in negated],
            "candidates": [[int(i) for i in c[c >= 0]] for c in candidates],
            "n_tokens": np.full(len(k), counts.n_tokens, dtype=np.int64),
            "n_active": counts.active.sum(axis=1),
            "n_uncovered": counts.active[:, 0],
            "alone_tokens": per_input(single, int),
            "alone_active": per_input(single_active, int),
            "together_tokens": counts.n[rows, everything],
            "together_active": counts.active[rows, everything],
            "additivity": events.additivity,
            "additivity_se": events.additivity_se,
            "additivity_tokens": events.additivity_tokens,
            "mi_pattern": mi_row,
            "mi_inputs": per_input(mi_inputs, float),
            "synergy": synergy,
            "n_clusters_fires": n_clusters[:, 0],
            "n_clusters_suppressed": n_clusters[:, 1],
        },
        schema_overrides={"inputs": pl.List(pl.Int64), "weights": pl.List(pl.Float64),
                          "candidates": pl.List(pl.Int64), "alone_tokens": pl.List(pl.Int64),
                          "alone_active": pl.List(pl.Int64), "mi_inputs": pl.List(pl.Float64),
                          "negated": pl.Int64},
    )  # fmt: skip
    return LayerLabels(features, _truth_frame(counts, config), cluster_frame)


def _truth_frame(counts: _Counts, config: LogicConfig) -> pl.DataFrame:
    """One row per target and truth-table row over its own inputs."""
    k = counts.k
    width = counts.inputs.shape[1]
    rows = np.arange(1 << width)
    t_idx, r_idx = np.nonzero(rows[None, :] < (1 << k)[:, None])
    n, a = counts.n[t_idx, r_idx], counts.active[t_idx, r_idx]
    ysum, ysum_a = counts.y_sum[t_idx, r_idx], counts.y_sum_active[t_idx, r_idx]
    patterns = [
        "".join("1" if (r >> j) & 1 else "0" for j in range(kk)) or "-"
        for r, kk in zip(r_idx, k[t_idx], strict=True)
    ]
    with np.errstate(invalid="ignore", divide="ignore"):
        return pl.DataFrame(
            {
                "output": counts.targets[t_idx].astype(np.int64),
                "pattern": patterns,
                "n_inputs_active": np.array([bin(r).count("1") for r in r_idx], dtype=np.int64),
                "count": n,
                "n_active": a,
                "p_active": np.where(n > 0, a / np.maximum(n, 1), np.nan),
                "mean_activation": np.where(n > 0, ysum / np.maximum(n, 1), np.nan),
                "mean_activation_when_active": np.where(a > 0, ysum_a / np.maximum(a, 1), np.nan),
                "observed": n >= config.min_tokens,
            }
        )
