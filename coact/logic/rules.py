"""The label rules, vectorised over targets so the bootstrap reruns them on resampled counts."""

from __future__ import annotations

import numpy as np

from coact.logic.config import (
    _LEVEL_FIRES,
    _LEVEL_MIXED,
    _LEVEL_SILENT,
    _LEVEL_UNSEEN,
    _REASON_LABEL,
    AND_NOT,
    REASONS,
    LogicConfig,
)
from coact.logic.counts import _bits, _Counts, _Events

# --- the rules, vectorised over targets (and bootstrap resamples) -------------------------


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
