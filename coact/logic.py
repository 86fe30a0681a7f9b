"""Logic labels: which computation turns a feature's inputs into its activation.

A target is an output feature (its inputs: its strongest connections in a connector's
weights table) or a hidden latent of the sae-connector (`hidden_targets`). Everything below
is counted on tokens, with no model fitted.

Binarising. A feature is active on a token when its value exceeds `floor` × its median
active (non-zero) value. The floor is relative, so one setting serves features of every
scale; at the default 0.1 it keeps more than 99 % of the activations SAEs emit (on the
SmolLM2 layer-3 codes 0.6 % of input and 0.2 % of output activations lie below a tenth of
their feature's median) and drops only slivers, which a threshold-like computation
produces just above its threshold. An input below its floor counts as inactive and as 0.

Inputs. A target's candidates are its strongest connections in the weights table by
standardised weight |w|·sd(x_i)/sd(y) (connect's `standardised` column; computed when
absent), at least `min_standardised` and `relative_cut` × its strongest, at most
`max_inputs`. A linear connector under-weights exactly the inputs a gate needs: a veto
matters only on the tokens where it meets the input it vetoes, the second input of an AND
only where it meets the first, and L1 shrinks the weaker parts of a sum to zero. So the
candidates are then, in turn:
- pruned (`prune`): an input is kept when some pair of observed rows (below) that differ
  only in it differ in their verdict (silent / mixed / fires); one that never changes the
  truth table is dropped;
- completed (`complete`): while a target has fewer than `max_inputs`, the input with the
  largest conditional mutual information I(T; X | current row), from counts, is added when
  its G = 2·N·ln 2·I reaches `min_g` (under independence G is χ² with one degree of
  freedom per row: chance reaches 30 with p < 5e-6 for up to four rows);
- pruned again, and the table rebuilt on what is left.
The `candidates` column keeps the connector's candidates, `inputs` the final ones (their
`weights` are NaN for inputs added from co-activations).

Truth table. With the target's k inputs (k ≤ `max_inputs`), each token falls in one row:
the set of inputs active on it (a bit pattern, bit j for input j of `inputs`, left to
right; the empty row is "none active"). Per row: tokens, tokens where the target is
active, P(target active) and its mean activation. A row is observed when it has at least
`min_tokens` tokens; an observed row fires when P ≥ `p_fire`, is silent when P ≤
`p_silent`, and is mixed in between.

The rules, in plain words, applied in this order (the `rule` column names the one used):
1. DEAD ("dead"): the target is never active in the sample.
2. UNEXPLAINED ("no inputs", "uncovered"): it has no inputs left, or more than
   `max_uncovered` of its activations happen on tokens where none of its inputs is active
   (the inputs do not account for most of it).
3. A-AND-NOT-B ("veto"): some input A fires the target alone (its one-input row fires),
   the row where A and another input B are active (and no other of its inputs) is silent,
   and B alone does not fire it. B is the negated input (when several qualify: the one
   whose row with its A has most tokens).
4. AND ("conjunction"): no input fires the target alone (every observed one-input row is
   silent), and some row with two or more inputs fires.
5. OR ("saturating") or WEIGHTED-SUM ("additive"): some input fires the target alone,
   every observed row that contains such an input fires, and every other observed row
   (only inputs that do not fire it alone) is silent. The two differ in how activations
   combine when several inputs fire together. Each input's effect alone is the
   least-squares slope β_i (through 0) of the target on that input over its one-input
   row; on tokens where two or more inputs with β_i > 0 are active, additivity
   s = Σ(y − max_i β_i x_i) / Σ(Σ_i β_i x_i − max_i β_i x_i) is 1 for a sum and 0 for a
   saturating OR (the target no larger than its largest part). s < `additive_cut` is OR,
   otherwise WEIGHTED-SUM. When fewer than `min_tokens` such tokens are seen, the inputs
   (nearly) never fire together and co-activations cannot tell OR from a sum: the label
   is WEIGHTED-SUM, what a linear connector computes ("additivity untested", s NaN).
6. UNEXPLAINED ("no rule fits"): anything else (a mixed row; a row that breaks the
   pattern, e.g. XOR, where A and B each fire it and together do not).

Confidence: the share of `n_boot` bootstrap resamples of the tokens that give the same
label (and the same negated input), the inputs held fixed. Resampling tokens resamples
the truth table's cells (row × target active or not) multinomially, which is what is
drawn; the additivity s is drawn from its normal approximation (delta-method standard
error over tokens). Tokens, not contexts, are the unit: the confidence is optimistic
where contexts repeat a pattern.

Mutual information (bits), from the truth table's counts: I(T; X_i) per input, I(T; row)
for the whole pattern, and synergy = I(T; row) − Σ_i I(T; X_i) (the whole minus the sum of
its parts; for two inputs it is minus the co-information). Positive synergy means the
inputs tell more together than apart (XOR-like), negative means they repeat each other
(co-firing inputs). It does not tell AND from OR: complementing every bit turns one into
the other and leaves every mutual information unchanged, so for independent inputs AND
and OR have equal synergy; the labels come from the truth table.

Co-activation clusters: HDBSCAN (scikit-learn's; a cluster holds at least
`min_cluster_size` tokens and `min_cluster_share` of the sample) over the inputs'
activation vectors, each input divided by its median active value, on a systematic sample
(every n-th token) of at most `max_cluster_points` tokens where the target fires (its
modes: "A large, B small" versus "B large, A small"), and separately on tokens where some
input fires but the target does not (what suppresses it). Per cluster: tokens in the
sample, their share, the tokens it stands for, the centroid in raw units and the target's
mean activation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import polars as pl
import scipy.sparse as sp
from numba import njit, prange
from tqdm.auto import tqdm

LABELS = ("WEIGHTED-SUM", "OR", "AND", "A-AND-NOT-B", "UNEXPLAINED", "DEAD")
SUM, OR, AND, AND_NOT, UNEXPLAINED, DEAD = range(6)
_LEVEL_SILENT, _LEVEL_MIXED, _LEVEL_FIRES, _LEVEL_UNSEEN = 0, 1, 2, -1
# Which rule decided (the `rule` column), and the label each gives.
REASONS = ("dead", "no inputs", "uncovered", "veto", "conjunction", "saturating", "additive",
           "additivity untested", "no rule fits")  # fmt: skip
_REASON_LABEL = (DEAD, UNEXPLAINED, UNEXPLAINED, AND_NOT, AND, OR, SUM, SUM, UNEXPLAINED)


@dataclass(frozen=True)
class LogicConfig:
    max_inputs: int = 3  # k: inputs per target (at most 4: 16 truth-table rows)
    floor: float = 0.1  # active above floor × the feature's median active value
    min_standardised: float = 0.05  # candidate inputs: |w|·sd(x_i)/sd(y) at least this...
    relative_cut: float = 0.2  # ...and at least this share of the target's strongest
    min_tokens: int = 20  # tokens for a truth-table row to count as observed
    p_fire: float = 0.5  # an observed row fires at P(target active) ≥ this
    p_silent: float = 0.1  # and is silent at P ≤ this
    max_uncovered: float = 0.5  # UNEXPLAINED above this share of activations with no input
    additive_cut: float = 0.5  # additivity s below this: OR; at or above: WEIGHTED-SUM
    prune: bool = True  # drop inputs that never change the truth table
    complete: bool = True  # add inputs the connector missed, by conditional information
    min_g: float = 30.0  # an addition's G = 2 N ln2 · I(T; X | row) at least this
    n_boot: int = 200  # bootstrap resamples for the confidence
    cluster: bool = True
    min_cluster_size: int = 10  # tokens, and at least min_cluster_share of the sample
    min_cluster_share: float = 0.05
    max_cluster_points: int = 256  # tokens per clustering, a systematic sample
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.max_inputs <= 4:
            raise ValueError(f"max_inputs must be 1–4, got {self.max_inputs}")
        if not 0 <= self.p_silent < self.p_fire <= 1:
            raise ValueError("need 0 ≤ p_silent < p_fire ≤ 1")


@dataclass(frozen=True)
class LayerLabels:
    """`features`: one row per target; `truth_tables`: one row per target and pattern;
    `clusters`: one row per target, kind ("fires" / "suppressed") and cluster (−1: noise)."""

    features: pl.DataFrame
    truth_tables: pl.DataFrame
    clusters: pl.DataFrame


# --- binarising --------------------------------------------------------------------------


def activation_floors(codes: sp.spmatrix, floor: float) -> np.ndarray:
    """Per column: floor × the median of its non-zero values (0 for an empty column)."""
    csc = sp.csc_matrix(codes)
    csc.sort_indices()
    counts = np.diff(csc.indptr)
    cols = np.repeat(np.arange(csc.shape[1]), counts)
    data = csc.data[np.lexsort((csc.data, cols))]
    lo = csc.indptr[:-1] + np.maximum(counts - 1, 0) // 2
    hi = csc.indptr[:-1] + counts // 2
    median = np.zeros(csc.shape[1])
    has = counts > 0
    median[has] = (data[lo[has]].astype(np.float64) + data[hi[has]]) / 2
    return floor * median


# --- counting (compiled: one target per thread, merging its columns' sorted token lists) ---


@njit(cache=True)
def _advance(x_ptr, x_idx, x_val, x_floor, y_idx, y_val, cols, k, p, e, py, ey, n_tokens, xs):
    """The next token where any input or the target has an entry: (token, code, y, py)."""
    tok = n_tokens
    for j in range(k):
        if p[j] < e[j] and x_idx[p[j]] < tok:
            tok = x_idx[p[j]]
    if py < ey and y_idx[py] < tok:
        tok = y_idx[py]
    code = 0
    for j in range(k):
        xs[j] = 0.0
        if p[j] < e[j] and x_idx[p[j]] == tok:
            v = x_val[p[j]]
            if v > x_floor[cols[j]]:
                code |= 1 << j
                xs[j] = v
            p[j] += 1
    yv = 0.0
    if py < ey and y_idx[py] == tok:
        yv = y_val[py]
        py += 1
    return tok, code, yv, py


@njit(parallel=True, cache=True)
def _count_kernel(x_ptr, x_idx, x_val, x_floor, y_ptr, y_idx, y_val, y_floor, targets, inputs,
                  n_tokens, n, act, ysum, ysum_act, sxy, sxx):  # fmt: skip
    """Per target and truth-table row (rows ≠ 0 fully; row 0 only where y > 0): tokens,
    target-active tokens, Σy, Σy when active; per input Σxy and Σx² on its one-input row."""
    n_targets, width = inputs.shape
    for t in prange(n_targets):
        k = 0
        while k < width and inputs[t, k] >= 0:
            k += 1
        cols = inputs[t, :k].copy()
        p, e = np.empty(k, np.int64), np.empty(k, np.int64)
        for j in range(k):
            p[j], e[j] = x_ptr[cols[j]], x_ptr[cols[j] + 1]
        py, ey = y_ptr[targets[t]], y_ptr[targets[t] + 1]
        floor_t = y_floor[targets[t]]
        xs = np.zeros(max(k, 1))
        while True:
            tok, code, yv, py = _advance(
                x_ptr, x_idx, x_val, x_floor, y_idx, y_val, cols, k, p, e, py, ey, n_tokens, xs
            )
            if tok >= n_tokens:
                break
            if code == 0 and yv == 0.0:
                continue  # inputs below their floors only: counted with the empty row later
            n[t, code] += 1
            ysum[t, code] += yv
            if yv > floor_t:
                act[t, code] += 1
                ysum_act[t, code] += yv
            if code != 0 and code & (code - 1) == 0:
                j = 0
                while (1 << j) != code:
                    j += 1
                sxy[t, j] += xs[j] * yv
                sxx[t, j] += xs[j] * xs[j]


@njit(parallel=True, cache=True)
def _events_kernel(x_ptr, x_idx, x_val, x_floor, y_ptr, y_idx, y_val, y_floor, targets, inputs,
                   n_tokens, beta, beta_ok, stride, offsets, points, values, additive):  # fmt: skip
    """Additivity sums per target (count, Σnum, Σden, Σnum², Σden², Σnum·den) and a
    systematic sample (every stride-th token) of the input vectors where the target fires
    (kind 0) and where some input fires but the target does not (kind 1)."""
    n_targets, width = inputs.shape
    for t in prange(n_targets):
        k = 0
        while k < width and inputs[t, k] >= 0:
            k += 1
        cols = inputs[t, :k].copy()
        p, e = np.empty(k, np.int64), np.empty(k, np.int64)
        for j in range(k):
            p[j], e[j] = x_ptr[cols[j]], x_ptr[cols[j] + 1]
        py, ey = y_ptr[targets[t]], y_ptr[targets[t] + 1]
        floor_t = y_floor[targets[t]]
        xs = np.zeros(max(k, 1))
        seen = np.zeros(2, np.int64)
        while True:
            tok, code, yv, py = _advance(
                x_ptr, x_idx, x_val, x_floor, y_idx, y_val, cols, k, p, e, py, ey, n_tokens, xs
            )
            if tok >= n_tokens:
                break
            kind = -1
            if yv > floor_t:
                kind = 0
            elif code != 0:
                kind = 1
            if kind >= 0:
                if seen[kind] % stride[t, kind] == 0:
                    slot = offsets[kind, t] + seen[kind] // stride[t, kind]
                    if slot < offsets[kind, t + 1]:
                        for j in range(k):
                            points[kind, slot, j] = xs[j]
                        values[kind, slot] = yv
                seen[kind] += 1
            if code == 0 or code & (code - 1) == 0:
                continue
            usable, positive, total, top = True, 0, 0.0, 0.0
            for j in range(k):
                if code & (1 << j):
                    if not beta_ok[t, j]:
                        usable = False
                    elif beta[t, j] > 0:
                        positive += 1
                        part = beta[t, j] * xs[j]
                        total += part
                        top = max(top, part)
            if usable and positive >= 2:
                num, den = yv - top, total - top
                additive[t, 0] += 1
                additive[t, 1] += num
                additive[t, 2] += den
                additive[t, 3] += num * num
                additive[t, 4] += den * den
                additive[t, 5] += num * den


@njit(cache=True, inline="always")
def _plogp(count: float, total: float) -> float:
    if count <= 0 or total <= 0:
        return 0.0
    q = count / total
    return q * np.log2(q)


@njit(cache=True)
def _table_mi(n1: float, a1: float, n0: float, a0: float) -> float:
    """I(T; X) in bits of the 2×2 table: n1 tokens with X on (a1 with T active), n0 off."""
    total = n1 + n0
    if total <= 0:
        return 0.0
    h_t = -_plogp(a1 + a0, total) - _plogp(total - a1 - a0, total)
    h_t_given = 0.0
    for n_x, a_x in ((n1, a1), (n0, a0)):
        if n_x > 0:
            h_t_given += (n_x / total) * (-_plogp(a_x, n_x) - _plogp(n_x - a_x, n_x))
    return max(h_t - h_t_given, 0.0)


@njit(parallel=True, cache=True)
def _gain_kernel(x_ptr, x_idx, x_val, x_floor, r_ptr, r_idx, r_val, x_total, y_ptr, y_idx, y_val,
                 y_floor, targets, inputs, n_tokens, n, act, best, gain):  # fmt: skip
    """Per target: the input (not yet among its inputs) with the largest conditional mutual
    information I(T; X_i | row) given its current truth-table row, from counts."""
    n_targets, width = inputs.shape
    n_in = len(x_total)
    rows = n.shape[1]
    for t in prange(n_targets):
        k = 0
        while k < width and inputs[t, k] >= 0:
            k += 1
        best[t], gain[t] = -1, 0.0
        cols = inputs[t, :k].copy()
        p, e = np.empty(k, np.int64), np.empty(k, np.int64)
        for j in range(k):
            p[j], e[j] = x_ptr[cols[j]], x_ptr[cols[j] + 1]
        py, ey = y_ptr[targets[t]], y_ptr[targets[t] + 1]
        floor_t = y_floor[targets[t]]
        xs = np.zeros(max(k, 1))
        cnt = np.zeros((n_in, rows), np.int64)
        hit = np.zeros((n_in, rows), np.int64)
        touched = np.zeros(n_in, np.bool_)
        order = np.empty(n_in, np.int64)
        n_touched = 0
        while True:
            tok, code, yv, py = _advance(
                x_ptr, x_idx, x_val, x_floor, y_idx, y_val, cols, k, p, e, py, ey, n_tokens, xs
            )
            if tok >= n_tokens:
                break
            if code == 0 and yv <= floor_t:
                continue  # the empty row's inactive tokens: by complement below
            on = 1 if yv > floor_t else 0
            for q in range(r_ptr[tok], r_ptr[tok + 1]):
                i = r_idx[q]
                if r_val[q] <= x_floor[i]:
                    continue
                cnt[i, code] += 1
                hit[i, code] += on
                if not touched[i]:
                    touched[i] = True
                    order[n_touched] = i
                    n_touched += 1
        for j in range(k):
            touched[cols[j]] = False
        for u in range(n_touched):
            i = order[u]
            if not touched[i]:
                continue
            c0 = x_total[i]
            for r in range(1, rows):
                c0 -= cnt[i, r]
            info = 0.0
            for r in range(rows):
                on_n = float(c0 if r == 0 else cnt[i, r])
                on_a = float(hit[i, r])
                info += (n[t, r] / n_tokens) * _table_mi(
                    on_n, on_a, n[t, r] - on_n, act[t, r] - on_a
                )
            if info > gain[t]:
                best[t], gain[t] = i, info


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
    n_tokens: int

    @classmethod
    def of(cls, codes: sp.spmatrix, floor: float) -> _Codes:
        csc = sp.csc_matrix(codes, dtype=np.float32)
        csc.sum_duplicates()
        csc.sort_indices()
        median = activation_floors(csc, 1.0)
        return cls(
            csc.indptr.astype(np.int64), csc.indices.astype(np.int64), csc.data,
            floor * median, median, csc.shape[0],
        )  # fmt: skip


def _count(
    x: _Codes, y: _Codes, targets: np.ndarray, inputs: np.ndarray, min_tokens: int
) -> _Counts:
    n_targets, width = inputs.shape
    rows = 1 << width
    n, act = np.zeros((n_targets, rows), np.int64), np.zeros((n_targets, rows), np.int64)
    ysum, ysum_act = np.zeros((n_targets, rows)), np.zeros((n_targets, rows))
    sxy, sxx = np.zeros((n_targets, width)), np.zeros((n_targets, width))
    if n_targets:
        _count_kernel(
            x.ptr, x.idx, x.val, x.floors, y.ptr, y.idx, y.val, y.floors,
            targets.astype(np.int64), inputs.astype(np.int64), x.n_tokens,
            n, act, ysum, ysum_act, sxy, sxx,
        )  # fmt: skip
    n[:, 0] = x.n_tokens - n[:, 1:].sum(axis=1)
    singles = n[:, 1 << np.arange(width)] if width else np.zeros((n_targets, 0), np.int64)
    beta = np.divide(sxy, sxx, out=np.zeros_like(sxy), where=sxx > 0)
    beta_ok = (singles >= min_tokens) & (inputs >= 0)
    return _Counts(targets, inputs, n, act, ysum, ysum_act, beta, beta_ok, x.n_tokens)


@dataclass
class _Events:
    additivity: np.ndarray  # (T,) s, NaN where untested
    additivity_se: np.ndarray  # (T,)
    additivity_tokens: np.ndarray  # (T,)
    points: np.ndarray  # (2, E, K) sampled input vectors: kind 0 fires, 1 suppressed
    values: np.ndarray  # (2, E) the target there
    offsets: np.ndarray  # (2, T + 1)
    totals: np.ndarray  # (T, 2) tokens of each kind before sampling


def _events(x: _Codes, y: _Codes, counts: _Counts, config: LogicConfig) -> _Events:
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
    sums = np.zeros((n_targets, 6))
    if n_targets:
        _events_kernel(
            x.ptr, x.idx, x.val, x.floors, y.ptr, y.idx, y.val, y.floors,
            counts.targets.astype(np.int64), counts.inputs.astype(np.int64), x.n_tokens,
            counts.beta, counts.beta_ok, stride, offsets, points, values, sums,
        )  # fmt: skip
    m, num, den, num2, den2, cross = sums.T
    tested = (m >= config.min_tokens) & (den > 0)
    safe = np.where(tested, den, 1.0)
    s = np.where(tested, num / safe, np.nan)
    var = np.maximum(num2 - 2 * np.nan_to_num(s) * cross + np.nan_to_num(s) ** 2 * den2, 0)
    se = np.where(tested, np.sqrt(var) / safe, np.nan)
    return _Events(s, se, m.astype(np.int64), points, values, offsets, totals)


# --- the rules, vectorised over targets (and bootstrap resamples) -------------------------


def _bits(width: int) -> np.ndarray:
    """(R, K) bool: which inputs each truth-table row has active."""
    rows = np.arange(1 << width)
    return ((rows[:, None] >> np.arange(width)) & 1).astype(bool)


def _levels(n: np.ndarray, active: np.ndarray, config: LogicConfig) -> np.ndarray:
    """Per row: silent 0, mixed 1, fires 2, or −1 when not observed."""
    p = active / np.maximum(n, 1)
    level = np.where(p >= config.p_fire, _LEVEL_FIRES, _LEVEL_MIXED)
    level = np.where(p <= config.p_silent, _LEVEL_SILENT, level)
    return np.where(n >= config.min_tokens, level, _LEVEL_UNSEEN)


def _decide(
    n: np.ndarray,
    active: np.ndarray,
    k: np.ndarray,
    additivity: np.ndarray,
    config: LogicConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label, negated slot or −1, rule) per target; n, active: (..., T, R), additivity
    (..., T); rule indexes REASONS."""
    width = int(np.log2(n.shape[-1]))
    bits = _bits(width)
    level = _levels(n, active, config)
    rows = np.arange(1 << width)
    in_range = rows[None, :] < (1 << k)[:, None]  # (T, R): rows over the target's own inputs
    seen = (level != _LEVEL_UNSEEN) & in_range & (rows > 0)
    fires, silent = seen & (level == _LEVEL_FIRES), seen & (level == _LEVEL_SILENT)
    single = 1 << np.arange(width)
    has_slot = np.arange(width)[None, :] < k[:, None]  # (T, K)
    alone = fires[..., single] & has_slot  # inputs that fire the target alone
    alone_silent = silent[..., single] | ~seen[..., single]
    total = active.sum(axis=-1)
    uncovered = active[..., 0] / np.maximum(total, 1)

    veto = np.zeros(alone.shape, dtype=bool)  # (…, T, K): slot j vetoes some A
    veto_n = np.full(alone.shape, -1, dtype=np.int64)
    for a in range(width):
        for b in range(width):
            if a == b:
                continue
            pair = (1 << a) | (1 << b)
            ok = alone[..., a] & silent[..., pair] & ~fires[..., 1 << b] & has_slot[:, b]
            better = ok & (n[..., pair] > veto_n[..., b])
            veto[..., b] |= ok
            veto_n[..., b] = np.where(better, n[..., pair], veto_n[..., b])
    negated = np.where(veto.any(-1), np.argmax(veto_n, axis=-1), -1)

    multi = bits.sum(axis=1) >= 2
    and_rule = ~alone.any(-1) & (alone_silent | ~has_slot).all(-1) & (fires & multi).any(-1)
    with_alone = (alone[..., None, :] & bits).any(-1)  # (…, T, R)
    pattern_ok = np.where(seen, np.where(with_alone, fires, silent), True).all(-1)
    or_rule = alone.any(-1) & pattern_ok
    is_or = np.nan_to_num(additivity, nan=np.inf) < config.additive_cut

    untested = np.isnan(additivity)
    reason = np.full(total.shape, REASONS.index("no rule fits"))
    reason = np.where(or_rule, np.where(is_or, 5, np.where(untested, 7, 6)), reason)
    reason = np.where(and_rule, 4, reason)
    reason = np.where(negated >= 0, 3, reason)
    reason = np.where(uncovered > config.max_uncovered, 2, reason)
    reason = np.where(k == 0, 1, reason)
    reason = np.where(total == 0, 0, reason)
    label = np.asarray(_REASON_LABEL)[reason]
    return label, np.where(label == AND_NOT, negated, -1), reason


def _relevant(counts: _Counts, config: LogicConfig) -> np.ndarray:
    """(T, K): does flipping the input ever change an observed row's verdict?"""
    width = counts.inputs.shape[1]
    level = _levels(counts.n, counts.active, config)
    out = np.zeros(counts.inputs.shape, dtype=bool)
    rows = np.arange(1 << width)
    for j in range(width):
        low = rows[(rows >> j) & 1 == 0]
        a, b = level[:, low], level[:, low | (1 << j)]
        out[:, j] = ((a != b) & (a >= 0) & (b >= 0)).any(axis=1)
    return out & (counts.inputs >= 0)


def _bootstrap(
    counts: _Counts, events: _Events, label: np.ndarray, negated: np.ndarray, config: LogicConfig
) -> np.ndarray:
    """Share of token resamples giving the same label (and negated input)."""
    if config.n_boot <= 0 or len(label) == 0:
        return np.full(len(label), np.nan)
    rng = np.random.default_rng(config.seed)
    k = counts.k
    agree = np.zeros(len(label))
    cells = np.concatenate([counts.n - counts.active, counts.active], axis=1).astype(np.float64)
    p = cells / cells.sum(axis=1, keepdims=True)
    rows = counts.n.shape[1]
    for lo in range(0, len(label), 256):
        part = slice(lo, lo + 256)
        draws = rng.multinomial(counts.n_tokens, p[part], size=(config.n_boot, len(p[part])))
        n_b = draws[..., :rows] + draws[..., rows:]
        s = events.additivity[part] + events.additivity_se[part] * rng.standard_normal(
            (config.n_boot, len(p[part]))
        )
        lab, neg, _ = _decide(n_b, draws[..., rows:], k[part], s, config)
        agree[part] = ((lab == label[part]) & (neg == negated[part])).mean(axis=0)
    return agree


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


# --- clusters ----------------------------------------------------------------------------


def _cluster_rows(
    points: np.ndarray, values: np.ndarray, unit: np.ndarray, config: LogicConfig
) -> list[tuple[int, int, np.ndarray, float]]:
    """(cluster, size, centroid, target mean) per HDBSCAN cluster (−1: noise)."""
    from sklearn.cluster import HDBSCAN

    size = max(config.min_cluster_size, int(np.ceil(config.min_cluster_share * len(points))))
    if len(points) < 2 * size or points.shape[1] == 0:
        return []
    scaled = points / np.where(unit > 0, unit, 1.0)
    if np.ptp(scaled, axis=0).max() == 0:
        labels = np.zeros(len(points), dtype=np.int64)
    else:
        labels = HDBSCAN(min_cluster_size=size, copy=True).fit(scaled).labels_
    return [
        (int(c), int((labels == c).sum()), points[labels == c].mean(axis=0),
         float(values[labels == c].mean()))
        for c in np.unique(labels)
    ]  # fmt: skip


def clusters(
    x_cols: np.ndarray | sp.spmatrix,
    target: np.ndarray | sp.spmatrix,
    config: LogicConfig = LogicConfig(),
    names: Sequence[str] | None = None,
) -> pl.DataFrame:
    """Co-activation clusters of one target over all the given input columns (tokens × k)."""
    return label_feature(x_cols, target, replace(config, prune=False), names).clusters


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


def _all_clusters(
    counts: _Counts, events: _Events, xc: _Codes, config: LogicConfig, progress: bool
) -> tuple[pl.DataFrame, np.ndarray]:
    """Cluster each target's sampled co-activation vectors, both kinds."""
    n_targets = len(counts.targets)
    n_clusters = np.zeros((n_targets, 2), np.int64)
    records: dict[str, list] = {
        k: [] for k in ("output", "kind", "cluster", "size", "share", "tokens", "centroid",
                        "target_mean", "inputs")
    }  # fmt: skip
    if config.cluster:
        k_all = counts.k
        for t in tqdm(range(n_targets), desc="clusters", disable=not progress):
            k = int(k_all[t])
            cols = counts.inputs[t, :k]
            for kind, name in ((0, "fires"), (1, "suppressed")):
                lo, hi = events.offsets[kind, t], events.offsets[kind, t + 1]
                pts = events.points[kind, lo:hi, :k].astype(np.float64)
                found = _cluster_rows(pts, events.values[kind, lo:hi], xc.median[cols], config)
                n_clusters[t, kind] = sum(1 for c, *_ in found if c >= 0)
                for c, size, centroid, mean in found:
                    records["output"].append(int(counts.targets[t]))
                    records["kind"].append(name)
                    records["cluster"].append(c)
                    records["size"].append(size)
                    records["share"].append(size / max(hi - lo, 1))
                    records["tokens"].append(size / max(hi - lo, 1) * events.totals[t, kind])
                    records["centroid"].append([float(v) for v in centroid])
                    records["target_mean"].append(mean)
                    records["inputs"].append([int(i) for i in cols])
    schema: dict[str, pl.DataType] = {
        "output": pl.Int64(), "kind": pl.String(), "cluster": pl.Int64(), "size": pl.Int64(),
        "share": pl.Float64(), "tokens": pl.Float64(), "centroid": pl.List(pl.Float64),
        "target_mean": pl.Float64(), "inputs": pl.List(pl.Int64),
    }  # fmt: skip
    return pl.DataFrame(records, schema=schema), n_clusters


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


# --- hidden latents of a two-layer connector ---------------------------------------------


def hidden_targets(
    connector: object, x: sp.spmatrix, batch_tokens: int = 4096, keep: int = 16
) -> tuple[sp.csr_matrix, pl.DataFrame]:
    """The hidden activations h = ReLU(W1 x + b1) of a two-layer connector (e.g. the
    sae-connector) as sparse codes, and W1 as a weights table (output = hidden unit, its
    `keep` strongest inputs by |w|·sd(x)/sd(h)), ready for `label_layer`."""
    import torch

    from coact.connectors.families import SparseConnector, csr_batch

    if not isinstance(connector, SparseConnector) or connector.hidden is None:
        raise ValueError("hidden_targets needs a two-layer connector (mlp, sae-connector, ...)")
    x = sp.csr_matrix(x, dtype=np.float32)
    parts = []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_tokens):
            rows = np.arange(start, min(start + batch_tokens, x.shape[0]))
            h = torch.relu(connector.first_layer(csr_batch(x, rows))).cpu().numpy()
            parts.append(sp.csr_matrix(h))
    hidden = sp.csr_matrix(sp.vstack(parts), dtype=np.float32)
    w1 = connector.weight_in.detach().cpu().numpy().astype(np.float64)  # n_in × hidden
    sd_in, sd_h = _std(x), _std(hidden)
    score = np.abs(w1) * sd_in[:, None] / np.where(sd_h > 0, sd_h, np.inf)[None, :]
    top = np.argsort(-score, axis=0, kind="stable")[: min(keep, w1.shape[0])]
    units = np.broadcast_to(np.arange(w1.shape[1]), top.shape)
    table = pl.DataFrame(
        {
            "output": units.ravel().astype(np.int64),
            "input": top.ravel().astype(np.int64),
            "weight_refit": w1[top, units].ravel(),
            "standardised": score[top, units].ravel(),
        }
    ).filter(pl.col("standardised") > 0)
    return hidden, table
