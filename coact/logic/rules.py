"""The label rules, vectorised over targets so the bootstrap reruns them on resampled counts."""

from __future__ import annotations

from dataclasses import dataclass

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
from coact.logic.counts import _bits, _Counts

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
    shape: _Shape | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label, negated slot or −1, rule) per target; n, active: (..., T, R), additivity and
    the shape's ratio (..., T), its curved and non-monotone flags (T, K); rule indexes
    REASONS."""
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

    negated, xor = _pairs(n, fires, silent, alone, has_slot, width)
    multi = bits.sum(axis=1) >= 2
    and_rule = ~alone.any(-1) & (alone_silent | ~has_slot).all(-1) & (fires & multi).any(-1)
    with_alone = (alone[..., None, :] & bits).any(-1)  # (…, T, R)
    pattern_ok = np.where(seen, np.where(with_alone, fires, silent), True).all(-1)
    or_rule = alone.any(-1) & pattern_ok
    is_or = np.nan_to_num(additivity, nan=np.inf) < config.additive_cut
    shape = shape or _Shape.none(k.shape[0], width, additivity.shape)
    superadditive = np.nan_to_num(shape.ratio, nan=0.0) >= config.superadditive_cut
    curved = (shape.curved & alone).any(-1)
    bump = (shape.non_monotone & has_slot & seen[..., single]).any(-1)

    untested = np.isnan(additivity)
    branch = np.where(untested, 7, 6)
    branch = np.where(curved, 10, branch)
    branch = np.where(superadditive, 9, branch)
    branch = np.where(is_or, 5, branch)
    reason = np.full(total.shape, REASONS.index("no rule fits"))
    reason = np.where(or_rule, branch, reason)
    reason = np.where(xor, 12, reason)
    reason = np.where(bump, 11, reason)
    reason = np.where(and_rule, 4, reason)
    reason = np.where(negated >= 0, 3, reason)
    reason = np.where(uncovered > config.max_uncovered, 2, reason)
    reason = np.where(k == 0, 1, reason)
    reason = np.where(total == 0, 0, reason)
    label = np.asarray(_REASON_LABEL)[reason]
    return label, np.where(label == AND_NOT, negated, -1), reason


@dataclass(frozen=True)
class _Shape:
    """What the truth table's counts cannot show: Σy / Σβx on multi-input rows (..., T),
    and per input (T, K) whether the target is curved or non-monotone in its magnitude."""

    ratio: np.ndarray
    curved: np.ndarray
    non_monotone: np.ndarray

    @classmethod
    def none(cls, n_targets: int, width: int, shape: tuple[int, ...]) -> _Shape:
        flags = np.zeros((n_targets, width), dtype=bool)
        return cls(np.full(shape, np.nan), flags, flags)


def _pairs(
    n: np.ndarray, fires: np.ndarray, silent: np.ndarray, alone: np.ndarray,
    has_slot: np.ndarray, width: int,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The negated slot of A-AND-NOT-B (−1: none) and whether some pair is XOR-like (each
    fires the target alone, together they are silent)."""
    veto = np.zeros(alone.shape, dtype=bool)  # (…, T, K): slot j vetoes some A
    veto_n = np.full(alone.shape, -1, dtype=np.int64)
    xor = np.zeros(alone.shape[:-1], dtype=bool)
    for a in range(width):
        for b in range(width):
            if a == b:
                continue
            pair = (1 << a) | (1 << b)
            ok = alone[..., a] & silent[..., pair] & ~fires[..., 1 << b] & has_slot[:, b]
            xor |= alone[..., a] & alone[..., b] & silent[..., pair]
            better = ok & (n[..., pair] > veto_n[..., b])
            veto[..., b] |= ok
            veto_n[..., b] = np.where(better, n[..., pair], veto_n[..., b])
    return np.where(veto.any(-1), np.argmax(veto_n, axis=-1), -1), xor


def _relevant(counts: _Counts, config: LogicConfig) -> np.ndarray:
    """(T, K): does flipping the input ever change an observed row's verdict, or the mean
    activation of a firing row by `magnitude_cut` of it (a gain that multiplies)?"""
    width = counts.inputs.shape[1]
    level = _levels(counts.n, counts.active, config)
    out = np.zeros(counts.inputs.shape, dtype=bool)
    rows = np.arange(1 << width)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = counts.y_sum_active / counts.active
    for j in range(width):
        low = rows[(rows >> j) & 1 == 0]
        a, b = level[:, low], level[:, low | (1 << j)]
        out[:, j] = ((a != b) & (a >= 0) & (b >= 0)).any(axis=1)
        both = (a == _LEVEL_FIRES) & (b == _LEVEL_FIRES)
        change = np.abs(mean[:, low | (1 << j)] / mean[:, low] - 1)
        out[:, j] |= (both & (np.nan_to_num(change) >= config.magnitude_cut)).any(axis=1)
    return out & (counts.inputs >= 0)
