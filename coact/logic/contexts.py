"""Truth-table counts per context: the confidence resamples contexts (documents), not
tokens, and the truth table's fit is scored on contexts it was not counted on."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import scipy.sparse as sp

from coact.logic._kernels import _context_kernel
from coact.logic.config import LogicConfig
from coact.logic.counts import _Codes, _Counts, _Events
from coact.logic.rules import _decide, _Shape


@dataclass(frozen=True)
class ContextCounts:
    """Per target (entries offsets[t]:offsets[t + 1]): a context, a cell (2·row + active)
    and its tokens there; row 0's inactive cell is what the context's other tokens leave."""

    offsets: np.ndarray
    context: np.ndarray
    cell: np.ndarray
    count: np.ndarray
    tokens: np.ndarray  # (C,) tokens per context
    cells: int  # 2R

    def weighted(self, lo: int, hi: int, weights: np.ndarray) -> np.ndarray:
        """Cell counts of targets lo..hi−1 with contexts weighted (B, C) → (B, T, 2R)."""
        a, b = self.offsets[lo], self.offsets[hi]
        local = np.repeat(np.arange(hi - lo), np.diff(self.offsets[lo : hi + 1]))
        matrix = sp.csr_matrix(
            (self.count[a:b].astype(np.float64),
             (local * self.cells + self.cell[a:b], self.context[a:b])),
            shape=((hi - lo) * self.cells, len(self.tokens)),
        )  # fmt: skip
        out = np.asarray(matrix @ weights.T.astype(np.float64)).T.reshape(
            len(weights), hi - lo, self.cells
        )
        out[..., 0] = (weights @ self.tokens)[:, None] - out[..., 1:].sum(-1)
        return out


def context_counts(x: _Codes, y: _Codes, counts: _Counts, context: np.ndarray) -> ContextCounts:
    """Count every target's cells per context (two passes: sizes, then entries)."""
    ids, inverse = np.unique(context, return_inverse=True)
    inverse = inverse.astype(np.int64)
    n_targets, width = counts.inputs.shape
    offsets = np.zeros(n_targets + 1, np.int64)
    args = (x.ptr, x.idx, x.val, x.floors, y.ptr, y.idx, y.val, y.floors,
            counts.targets.astype(np.int64), counts.inputs.astype(np.int64), x.n_tokens,
            inverse)  # fmt: skip
    empty = np.zeros(0, np.int64)
    if n_targets:
        _context_kernel(*args, offsets, empty, empty, empty, False)
    offsets = np.cumsum(offsets)
    size = int(offsets[-1])
    out = np.zeros(size, np.int64), np.zeros(size, np.int64), np.zeros(size, np.int64)
    if n_targets:
        _context_kernel(*args, offsets, *out, True)
    tokens = np.bincount(inverse, minlength=len(ids)).astype(np.float64)
    return ContextCounts(offsets, *out, tokens, 2 << width)


def bootstrap(
    table: ContextCounts,
    counts: _Counts,
    events: _Events,
    shape: _Shape,
    label: np.ndarray,
    negated: np.ndarray,
    config: LogicConfig,
) -> np.ndarray:
    """Share of `n_boot` resamples of the contexts (with replacement) that give the same
    label and negated input; the additivity and the ratio are drawn from their normal
    approximations (standard errors over contexts), the magnitude tests held fixed."""
    if config.n_boot <= 0 or len(label) == 0:
        return np.full(len(label), np.nan)
    rng = np.random.default_rng(config.seed)
    n_contexts = len(table.tokens)
    agree = np.zeros(len(label))
    step = max(1, 2**16 // table.cells)
    for lo in range(0, len(label), step):
        hi = min(lo + step, len(label))
        part = slice(lo, hi)
        weights = rng.multinomial(n_contexts, np.full(n_contexts, 1 / n_contexts), config.n_boot)
        cells = table.weighted(lo, hi, weights)
        n_b, active_b = cells[..., 0::2] + cells[..., 1::2], cells[..., 1::2]
        noise = rng.standard_normal((2, config.n_boot, hi - lo))
        s = events.additivity[part] + events.additivity_se[part] * noise[0]
        ratio = events.ratio[part] + events.ratio_se[part] * noise[1]
        drawn = replace(shape, ratio=ratio, curved=shape.curved[part],
                        non_monotone=shape.non_monotone[part])  # fmt: skip
        lab, neg, _ = _decide(n_b, active_b, counts.k[part], s, config, drawn)
        agree[part] = ((lab == label[part]) & (neg == negated[part])).mean(axis=0)
    return agree


def heldout_auc(table: ContextCounts, config: LogicConfig) -> np.ndarray:
    """Per target, the AUC on held-out contexts (`heldout_fraction` of them, drawn with
    `seed`) of the truth table counted on the others: a token's score is its row's
    P(target active) on the training contexts (smoothed towards the overall rate)."""
    n_targets = len(table.offsets) - 1
    rng = np.random.default_rng(config.seed + 1)
    held = rng.random(len(table.tokens)) < config.heldout_fraction
    out = np.full(n_targets, np.nan)
    step = max(1, 2**14 // table.cells)
    for lo in range(0, n_targets, step):
        hi = min(lo + step, n_targets)
        train, test = table.weighted(lo, hi, np.stack([~held, held]).astype(np.float64))
        out[lo:hi] = _auc(train, test)
    return out


def _auc(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """AUC per target from cell counts (T, 2R): rows ranked by their training firing rate."""
    n_tr, a_tr = train[:, 0::2] + train[:, 1::2], train[:, 1::2]
    base = a_tr.sum(1, keepdims=True) / np.maximum(n_tr.sum(1, keepdims=True), 1)
    score = (a_tr + base) / (n_tr + 1)
    pos, neg = test[:, 1::2], test[:, 0::2]
    above = score[:, :, None] > score[:, None, :]
    tie = score[:, :, None] == score[:, None, :]
    pairs = pos[:, :, None] * neg[:, None, :]
    wins = (pairs * (above + 0.5 * tie)).sum(axis=(1, 2))
    total = pos.sum(1) * neg.sum(1)
    return np.where(total > 0, wins / np.where(total > 0, total, 1), np.nan)
