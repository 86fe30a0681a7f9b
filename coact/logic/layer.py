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
from coact.logic.config import LABELS, NONLINEAR, REASONS, LayerLabels, LogicConfig
from coact.logic.contexts import bootstrap, context_counts, heldout_auc
from coact.logic.counts import _Codes, _count, _Counts, _Events, _events, information
from coact.logic.cover import Pool, _Rows, grow, inputs_needed
from coact.logic.magnitude import curvature, non_monotone
from coact.logic.rules import _decide, _relevant, _Shape

# --- the layer ---------------------------------------------------------------------------


def label_layer(
    x: sp.spmatrix,
    y: sp.spmatrix,
    weights: pl.DataFrame,
    config: LogicConfig = LogicConfig(),
    outputs: Sequence[int] | np.ndarray | None = None,
    progress: bool = True,
    contexts: np.ndarray | None = None,
    jacobian: pl.DataFrame | None = None,
) -> LayerLabels:
    """Label every target (column of y; all, or `outputs`) from its top connections in
    `weights` (columns output, input, weight_refit, and standardised when present), grown
    by coverage from those and the Jacobian's connections (`jacobian`: output, input,
    n_tokens, attribution_mean). `contexts` (token → context; None: every token its own)
    are what the confidence resamples and the AUC holds out."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} tokens and y {y.shape[0]}")
    context = np.arange(x.shape[0]) if contexts is None else np.asarray(contexts)
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
    rows, pool = _Rows.of(x, xc), Pool.of(targets, weights, jacobian, config)
    before = counts.k
    chosen, _ = grow(rows, xc, yc, targets, counts.inputs, pool, config, config.max_inputs)
    chosen = chosen[:, : config.max_inputs]
    changed = np.flatnonzero((chosen != counts.inputs).any(axis=1))
    if len(changed):
        counts = _recount(counts, xc, yc, changed, chosen, config)
    needed, reach = inputs_needed(rows, xc, yc, targets, pool, config)
    sources = _sources(counts.inputs, candidates, before)
    labels = _finish(counts, candidates, w, xc, yc, config, progress, context)
    extra = pl.DataFrame({
        "sources": sources,
        "inputs_needed": [int(v) if v > 0 else None for v in needed],
        "coverage_searched": reach,
    }, schema={"sources": pl.List(pl.String), "inputs_needed": pl.Int64,
               "coverage_searched": pl.Float64})  # fmt: skip
    features = pl.concat([labels.features, extra], how="horizontal")
    features = _with_jacobian_share(features, jacobian)
    return LayerLabels(features, labels.truth_tables, labels.clusters)


def _sources(inputs: np.ndarray, candidates: np.ndarray, before: np.ndarray) -> list[list[str]]:
    """Per input, how it was found: the connector, co-activation counts, or coverage."""
    out = []
    for t, row in enumerate(inputs):
        named = []
        for slot, i in enumerate(row[row >= 0]):
            if slot >= before[t]:
                named.append("coverage")
            else:
                named.append("connector" if i in candidates[t] else "co-activation")
        out.append(named)
    return out


def _with_jacobian_share(features: pl.DataFrame, jacobian: pl.DataFrame | None) -> pl.DataFrame:
    """The share of a feature's positive Jacobian attribution (Σ J·c over its stored
    connections) that its inputs carry; null without a Jacobian table."""
    if jacobian is None or jacobian.height == 0:
        return features.with_columns(pl.lit(None, dtype=pl.Float64).alias("jacobian_share"))
    total = (pl.col("attribution_mean") * pl.col("n_tokens")).clip(lower_bound=0.0)
    attr = jacobian.select(
        pl.col("output").cast(pl.Int64), pl.col("input").cast(pl.Int64), total.alias("a")
    )
    whole = attr.group_by("output").agg(pl.col("a").sum().alias("whole"))
    carried = (
        features.select("output", "inputs").explode("inputs")
        .rename({"inputs": "input"}).join(attr, on=["output", "input"])
        .group_by("output").agg(pl.col("a").sum().alias("carried"))
    )  # fmt: skip
    share = whole.join(carried, on="output", how="left").select(
        "output", (pl.col("carried").fill_null(0.0) / pl.col("whole")).alias("jacobian_share")
    )
    return features.join(share, on="output", how="left")


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


_PER_ROW = ("n", "active", "y_sum", "y_sum_active", "beta", "beta_ok", "moments", "tertiles")


def _complete(
    counts: _Counts,
    w: np.ndarray,
    x: sp.spmatrix,
    xc: _Codes,
    yc: _Codes,
    config: LogicConfig,
) -> tuple[_Counts, np.ndarray]:
    """Add, one at a time while a target has fewer than `max_inputs`, the input with the
    most conditional information about it given its current rows, when significant, else
    the one that splits its activation within its rows most (a gain that multiplies), when
    that removes `magnitude_cut` of the within-row variation and is significant."""
    rows_x = sp.csr_matrix(x, dtype=np.float32)
    rows_x.sum_duplicates()
    rows_x.sort_indices()
    r_ptr, r_idx = rows_x.indptr.astype(np.int64), rows_x.indices.astype(np.int64)
    above = xc.val > xc.floors[np.repeat(np.arange(len(xc.ptr) - 1), np.diff(xc.ptr))]
    x_total = np.diff(np.concatenate([[0], np.cumsum(above)])[xc.ptr])
    settled = counts.active.sum(axis=1) == 0  # dead, or nothing significant left to add
    c = np.arange(xc.n_tokens + 1, dtype=np.float64)
    xlogx = c * np.log2(np.maximum(c, 1.0))
    for _ in range(config.max_inputs):
        open_ = np.flatnonzero((counts.k < config.max_inputs) & ~settled)
        if len(open_) == 0:
            break
        best = np.full(len(open_), -1, np.int64)
        gain = np.zeros(len(open_))
        best_mag, gain_mag = np.full(len(open_), -1, np.int64), np.zeros(len(open_))
        _gain_kernel(
            xc.ptr, xc.idx, xc.val, xc.floors, r_ptr, r_idx, rows_x.data, x_total,
            yc.ptr, yc.idx, yc.val, yc.floors, counts.targets[open_].astype(np.int64),
            counts.inputs[open_], xc.n_tokens, counts.n[open_], counts.active[open_],
            best, gain, best_mag, gain_mag, xlogx,
        )  # fmt: skip
        informative = (best >= 0) & (2 * xc.n_tokens * np.log(2) * gain >= config.min_g)
        fires = counts.active[open_].sum(axis=1)
        f_stat = gain_mag * np.maximum(fires - 2, 1)
        modulates = (best_mag >= 0) & (gain_mag >= config.magnitude_cut) & (f_stat >= config.min_g)
        best = np.where(informative, best, best_mag)
        significant = informative | modulates
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
    context: np.ndarray,
) -> LayerLabels:
    events = _events(xc, yc, counts, config, context)
    k = counts.k
    gain, curved = curvature(counts.moments, config)
    shape = _Shape(events.ratio, curved, non_monotone(counts.tertiles, config))
    label, negated_slot, reason = _decide(
        counts.n, counts.active, k, events.additivity, config, shape
    )
    table = context_counts(xc, yc, counts, context)
    confidence = bootstrap(table, counts, events, shape, label, negated_slot, config)
    unexplained = np.isin(reason, [REASONS.index(r) for r in ("dead", "no inputs", "uncovered")])
    cluster_frame, n_clusters = _all_clusters(counts, events, xc, config, progress, ~unexplained)
    rows = np.arange(len(k))
    negated = np.where(negated_slot >= 0, counts.inputs[rows, np.maximum(negated_slot, 0)], -1)
    mass = counts.y_sum_active.sum(axis=1)
    kinds = [REASONS[r] if lab == NONLINEAR else None for lab, r in zip(label, reason, strict=True)]
    with np.errstate(invalid="ignore", divide="ignore"):
        coverage = np.where(mass > 0, 1 - counts.y_sum_active[:, 0] / mass, np.nan)
    fit = pl.DataFrame(
        {
            "kind": kinds,
            "coverage": coverage,
            "auc": heldout_auc(table, config),
            "ratio": events.ratio,
            "ratio_se": events.ratio_se,
            "curvature": [[float(v) for v in gain[t, : k[t]]] for t in rows],
            "non_monotone": [[bool(v) for v in shape.non_monotone[t, : k[t]]] for t in rows],
        },
        schema_overrides={"kind": pl.String, "curvature": pl.List(pl.Float64),
                          "non_monotone": pl.List(pl.Boolean)},
    )  # fmt: skip
    base = _base_frame(counts, candidates, w, events, label, confidence, reason, negated)
    features = pl.concat([base, fit, _cluster_counts(n_clusters)], how="horizontal")
    return LayerLabels(features, _truth_frame(counts, config), cluster_frame)


def _cluster_counts(n_clusters: np.ndarray) -> pl.DataFrame:
    return pl.DataFrame(
        {"n_clusters_fires": n_clusters[:, 0], "n_clusters_suppressed": n_clusters[:, 1]}
    )


def _base_frame(
    counts: _Counts, candidates: np.ndarray, w: np.ndarray, events: _Events,
    label: np.ndarray, confidence: np.ndarray, reason: np.ndarray, negated: np.ndarray,
) -> pl.DataFrame:  # fmt: skip
    """Label, rule, inputs and the counts and information they rest on."""
    k = counts.k
    mi_row, mi_inputs, synergy = information(counts.n, counts.active, k)
    width = counts.inputs.shape[1]
    single = counts.n[:, 1 << np.arange(width)] if width else np.zeros((len(k), 0))
    single_active = counts.active[:, 1 << np.arange(width)] if width else np.zeros((len(k), 0))
    everything = (1 << k) - 1
    rows = np.arange(len(k))

    def per_input(a: np.ndarray, cast: type) -> list[list]:
        return [[cast(v) for v in a[t, : k[t]]] for t in rows]

    return pl.DataFrame(
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
        },
        schema_overrides={"inputs": pl.List(pl.Int64), "weights": pl.List(pl.Float64),
                          "candidates": pl.List(pl.Int64), "alone_tokens": pl.List(pl.Int64),
                          "alone_active": pl.List(pl.Int64), "mi_inputs": pl.List(pl.Float64),
                          "negated": pl.Int64},
    )  # fmt: skip


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
