"""A linearity score per output feature that needs no fitted connector.

On the tokens where output j is active, the block's own first-order account of j from
its active inputs is A_j(t) = Σ_i J_ji(t)·c_i(t), with the token-wise Jacobian. A map
linear in the features has one Jacobian for every token; a gated map (AND-like) switches
its slopes with the other inputs. The constant-Jacobian account Ā_j(t) = Σ_i J̄_ji·c_i(t)
uses the token-averaged J̄, and

    nonlinearity_j = Σ_t (A_j − Ā_j)² / Σ_t (A_j − mean A_j)²

is the share of the token-wise account's variation that a constant Jacobian misses: 0 for
a linear map, large for a gated one. J̄ is cross-fitted (contexts split by parity, each
half read with the other half's mean; a connection seen in one half only falls back to
its own half's), so that a feature seen on few tokens cannot look linear by averaging
its own slopes. The 95 % interval resamples contexts, not tokens: tokens inside one
context share their inputs. The noise floor of the verdict is that interval: a feature is
linear when its upper bound is at most `max_nonlinearity`, nonlinear when its lower bound
exceeds it, uncertain otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from coact.jacobian.entries import Entries

VERDICTS = ("linear", "nonlinear", "uncertain", "too few tokens")


@dataclass(frozen=True)
class ScoreConfig:
    max_nonlinearity: float = 0.1  # share of variation a constant Jacobian may miss
    min_tokens: int = 20  # active tokens below which a feature gets no score
    resamples: int = 200  # bootstrap over contexts
    seed: int = 0


def cross_fitted_mean(entries: Entries, n_in: int) -> np.ndarray:
    """Per entry, J̄ of its connection from the other half of the contexts."""
    key = entries.entry_output * n_in + entries.entry_input
    _, inverse = np.unique(key, return_inverse=True)
    half = entries.entry_context % 2
    slot = inverse * 2 + half
    size = 2 * (int(inverse.max()) + 1) if len(inverse) else 0
    sums = np.bincount(slot, entries.entry_jacobian, minlength=size).reshape(-1, 2)
    counts = np.bincount(slot, minlength=size).reshape(-1, 2)
    other = 1 - half
    n_other = counts[inverse, other]
    with np.errstate(divide="ignore", invalid="ignore"):
        from_other = sums[inverse, other] / n_other
        from_own = sums[inverse, half] / counts[inverse, half]
    return np.where(n_other > 0, from_other, from_own)


def per_context_sums(entries: Entries, n_in: int, n_out: int) -> np.ndarray:
    """(4, n_out, n_contexts): Σ(A − Ā)², ΣA, ΣA², n over each feature's tokens per context."""
    n_pairs = len(entries.pair_output)
    weight = entries.entry_jacobian * entries.entry_code
    tokenwise = np.bincount(entries.entry_pair, weight, minlength=n_pairs)
    constant = np.bincount(
        entries.entry_pair, cross_fitted_mean(entries, n_in) * entries.entry_code, n_pairs
    )
    cell = entries.pair_output * entries.n_contexts + entries.pair_context
    size = n_out * entries.n_contexts
    values = ((tokenwise - constant) ** 2, tokenwise, tokenwise**2, np.ones(n_pairs))
    return np.stack([np.bincount(cell, v, minlength=size) for v in values]).reshape(
        4, n_out, entries.n_contexts
    )


def _nonlinearity(sums: np.ndarray) -> np.ndarray:
    """From sums over contexts (4, ..., n_out): the score, NaN without variation."""
    missed, total, squares, n = sums
    with np.errstate(divide="ignore", invalid="ignore"):
        spread = squares - total**2 / n
        score = missed / spread
    return np.where((spread <= 1e-12 * np.maximum(squares, 1e-30)) & (missed <= 1e-12), 0.0, score)


def linearity_scores(entries: Entries, n_in: int, n_out: int, config: ScoreConfig) -> pl.DataFrame:
    """One row per output feature: n_tokens, nonlinearity, its 95 % interval, verdict."""
    sums = per_context_sums(entries, n_in, n_out)
    point = _nonlinearity(sums.sum(axis=2))
    rng = np.random.default_rng(config.seed)
    weights = rng.multinomial(
        entries.n_contexts, np.full(entries.n_contexts, 1 / entries.n_contexts), config.resamples
    ).astype(np.float64)  # resamples × contexts
    resampled = _nonlinearity(np.einsum("bc,soc->sbo", weights, sums))
    with np.errstate(invalid="ignore"):
        low, high = np.nanpercentile(resampled, [2.5, 97.5], axis=0)
    n = sums[3].sum(axis=1).astype(np.int64)
    limit = config.max_nonlinearity
    verdict = np.where(high <= limit, "linear", np.where(low > limit, "nonlinear", "uncertain"))
    verdict = np.where((n < config.min_tokens) | np.isnan(point), "too few tokens", verdict)
    return pl.DataFrame(
        {
            "output": np.arange(n_out, dtype=np.int64),
            "n_tokens": n,
            "nonlinearity": point,
            "nonlinearity_low": low,
            "nonlinearity_high": high,
            "jacobian_verdict": verdict,
        }
    )
