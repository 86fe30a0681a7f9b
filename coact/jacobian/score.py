"""A linearity score per output feature that needs no fitted connector.

The block's output feature j, as a function of the input codes with the input SAE's error
held fixed, is g_j(c). On a token where j fires, the block's own first-order account of j
from its active inputs is A_j(t) = Σ_i J_ji(t)·c_i(t), with the token-wise Jacobian. A
block linear in the features has one slope per connection, the same on every token; a
gated block (AND-like) changes a slope with the other inputs. The constant account
Ā_j(t) = Σ_i J̄_ji·c_i(t) uses the slope J̄_ji averaged over every token where input i
fires, whether j fires or not (an AND gate's slope from one input depends on whether the
other is present, and the average must see both), and

    nonlinearity_j = Σ_t (A_j − Ā_j)² / Σ_t (A_j − mean A_j)²

over the tokens where j fires is the share of that account's variation one slope per
connection misses: 0 for a linear block, large for a gated one. (Comparing with g_j itself
would charge the input SAE's error, which varies per token, to the block; comparing with
g_j(c) − g_j(0) would extrapolate every token to the far-off stream with no feature.) J̄ is
cross-fitted (contexts split by parity, each half read with the other half's slopes; an
input that never fires in the other half uses its own half's), so a feature seen on few
tokens cannot look linear by averaging its own slopes. The 95 % interval resamples
contexts, not tokens: tokens inside one context share their inputs. It is the verdict's
noise floor: linear when the upper bound is at most `max_nonlinearity`, nonlinear when the
lower bound exceeds it, uncertain otherwise.

Memory: the slopes are dense, 2 × n_in × n_out floats (42 MB for two 2,304-wide SAEs).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from torch import Tensor

from coact.jacobian.entries import Entries
from coact.jacobian.feature_map import TokenJacobians

VERDICTS = ("linear", "nonlinear", "uncertain", "too few tokens")


@dataclass(frozen=True)
class ScoreConfig:
    max_nonlinearity: float = 0.1  # share of the feature-driven variation one slope may miss
    min_tokens: int = 20  # active tokens below which a feature gets no score
    resamples: int = 200  # bootstrap over contexts
    seed: int = 0


class InputSlopes:
    """Σ over the tokens where input i fires of ∂(block output)/∂c_i, per context half."""

    def __init__(self, n_in: int, d: int) -> None:
        self.sums = torch.zeros(2, n_in, d, dtype=torch.float64)
        self.counts = torch.zeros(2, n_in, dtype=torch.float64)

    def add(self, found: TokenJacobians, contexts: np.ndarray) -> None:
        half = torch.as_tensor(contexts % 2, device=found.inputs.device)
        live = found.inputs >= 0
        for h in (0, 1):
            rows = live & (half == h)[:, None]
            index = found.inputs[rows].cpu()
            self.sums[h].index_add_(0, index, found.pushed[rows].cpu().double())
            self.counts[h].index_add_(0, index, torch.ones(len(index), dtype=torch.float64))

    def cross_fitted(self, encoder: Tensor) -> np.ndarray:
        """(2, n_in, n_out): slopes to read half h's tokens with (from half 1 − h)."""
        own = self.sums / self.counts.clamp(min=1)[..., None]
        other = own.flip(0)
        missing = (self.counts.flip(0) == 0)[..., None]
        chosen = torch.where(missing, own, other)  # chosen[h]: the slopes half h is read with
        return (chosen.float() @ encoder.detach().cpu().float()).numpy()


def per_context_sums(entries: Entries, slopes: np.ndarray, n_out: int) -> np.ndarray:
    """(4, n_out, n_contexts): Σ(A − Ā)², ΣA, ΣA², n over each feature's tokens."""
    n_pairs = len(entries.pair_output)
    half = entries.entry_context % 2
    slope = slopes[half, entries.entry_input, entries.entry_output]
    constant = np.bincount(entries.entry_pair, slope * entries.entry_code, n_pairs)
    driven = np.bincount(
        entries.entry_pair, entries.entry_jacobian * entries.entry_code, n_pairs
    )  # A_j(t)
    cell = entries.pair_output * entries.n_contexts + entries.pair_context
    size = n_out * entries.n_contexts
    values = ((driven - constant) ** 2, driven, driven**2, np.ones(n_pairs))
    return np.stack([np.bincount(cell, v, minlength=size) for v in values]).reshape(
        4, n_out, entries.n_contexts
    )


def _nonlinearity(sums: np.ndarray) -> np.ndarray:
    """From sums over contexts (4, ..., n_out): the score (0 when nothing varies or is
    missed, NaN when the part varies not at all but is missed)."""
    missed, total, squares, n = sums
    with np.errstate(divide="ignore", invalid="ignore"):
        spread = squares - total**2 / n
        score = missed / spread
    scale = 1e-9 * np.maximum(squares, 1e-30)
    return np.where(spread <= scale, np.where(missed <= scale, 0.0, np.nan), score)


def linearity_scores(
    entries: Entries, slopes: np.ndarray, n_out: int, config: ScoreConfig
) -> pl.DataFrame:
    """One row per output feature: n_tokens, nonlinearity, its 95 % interval, verdict."""
    sums = per_context_sums(entries, slopes, n_out)
    point = _nonlinearity(sums.sum(axis=2))
    rng = np.random.default_rng(config.seed)
    weights = rng.multinomial(
        entries.n_contexts, np.full(entries.n_contexts, 1 / entries.n_contexts), config.resamples
    ).astype(np.float64)  # resamples × contexts
    resampled = _nonlinearity(np.einsum("bc,soc->sbo", weights, sums))
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)  # features with no score: all NaN
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
