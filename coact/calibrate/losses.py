"""Per-context next-token losses under a splice, and the bootstrap over contexts.

The measurements every calibration rests on: per-context sums of next-token
cross-entropy and of KL(clean ‖ modified) with a site replaced by a function of its
activation, and the percentile bootstrap of token-weighted means over contexts. They are
summed per context (row of `tokens`) because the context is the unit that is sampled
independently; tokens of one context are not independent. `coact.calibrate.noise` and
`coact.calibrate.intervene` build on them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from coact.errors import CoactError
from coact.models.load import LoadedModel
from coact.models.sites import Site
from coact.models.tracing import SpliceFn, next_token_loss, spliced_logits


class Interval(NamedTuple):
    """A point estimate and its percentile bootstrap interval (arrays of one shape)."""

    point: np.ndarray
    low: np.ndarray
    high: np.ndarray


@dataclass(frozen=True)
class ContextLosses:
    """Per context (row of the batch): summed next-token CE and KL (nats), and positions."""

    ce: np.ndarray  # (batch,) float64
    kl: np.ndarray  # (batch,) float64; KL(clean ‖ modified), 0 for a clean pass
    n_tokens: np.ndarray  # (batch,) int64: predicted positions summed over


def resample_indices(n_contexts: int, n_boot: int, seed: int) -> np.ndarray:
    """The bootstrap draws (n_boot, n_contexts): contexts sampled with replacement."""
    return np.random.default_rng(seed).integers(0, n_contexts, size=(n_boot, n_contexts))


def bootstrap_mean_ratio(
    num: np.ndarray, den: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> Interval:
    """Σ num / Σ den over contexts, with a percentile interval from resampling contexts.

    `num` is (C, ...) and `den` is (C,); every column of `num` shares the same draws (see
    `resample_indices`), so differences and ratios of columns are resampled jointly. A
    ratio of sums (not a mean of ratios) is a token-weighted mean when `den` counts tokens.
    A zero denominator gives NaN; replicates with one are left out of the percentiles.
    """
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    n_ctx = num.shape[0]
    if den.shape != (n_ctx,):
        raise ValueError(f"den must be ({n_ctx},) to match num {num.shape}, got {den.shape}")
    if n_ctx == 0:
        raise CoactError("no contexts to average over: the token batch is empty")
    flat = num.reshape(n_ctx, -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        point = _ratio(flat.sum(0), den.sum())
        if n_boot <= 0:
            nan = np.full_like(point, np.nan)
            return Interval(*(a.reshape(num.shape[1:]) for a in (point, nan, nan.copy())))
        draws = resample_indices(n_ctx, n_boot, seed)
        rows = np.repeat(np.arange(n_boot), n_ctx)
        counts = np.bincount(rows * n_ctx + draws.ravel(), minlength=n_boot * n_ctx)
        weights = counts.reshape(n_boot, n_ctx).astype(np.float64)
        stats = _ratio(weights @ flat, (weights @ den)[:, None])
        tail = (1.0 - level) / 2.0
        with warnings.catch_warnings():  # an all-NaN column (Σ den = 0 always) stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            low, high = np.nanquantile(stats, [tail, 1.0 - tail], axis=0)
    shape = num.shape[1:]
    return Interval(point.reshape(shape), low.reshape(shape), high.reshape(shape))


def _ratio(num: np.ndarray, den: np.ndarray | float) -> np.ndarray:
    den = np.asarray(den, dtype=np.float64)
    return np.where(den != 0, num / np.where(den != 0, den, 1.0), np.nan)


def after_skip(fn: SpliceFn, skip: int) -> SpliceFn:
    """`fn` applied to positions ≥ skip only; earlier ones (BOS, an attention sink) kept."""
    if skip <= 0:
        return fn

    def apply(x: Tensor) -> Tensor:
        out = x.clone()
        out[:, skip:] = fn(x[:, skip:])
        return out

    return apply


def next_token_kl(clean_logits: Tensor, logits: Tensor) -> Tensor:
    """KL(clean ‖ modified) of the next-token distributions, (batch, seq-1), in nats.

    This direction weighs the change by how likely the clean model finds each token, so it
    is the expected extra loss if the clean model's predictions were the truth.
    """
    logp = torch.log_softmax(clean_logits[:, :-1].float(), dim=-1)
    logq = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


@torch.no_grad()
def ce_and_kl(
    lm: LoadedModel,
    tokens: Tensor,
    site: Site | None,
    fn: SpliceFn | None,
    *,
    skip_first_positions: int = 0,
    clean_logits: Tensor | None = None,
) -> ContextLosses:
    """Per-context CE and KL with `site` replaced by fn(activation) at positions ≥ skip.

    Predictions made at positions before `skip_first_positions` are excluded from the
    sums. `clean_logits` (from a clean pass over the same tokens) saves a forward pass when
    one batch is measured under many splices. With fn or site None the pass is clean.
    """
    skip = skip_first_positions
    _check_tokens(tokens, skip)
    tokens = tokens.to(lm.device)
    if site is None or fn is None:
        return context_losses(spliced_logits(lm, tokens, None, None), tokens, skip)
    if clean_logits is None:
        clean_logits = spliced_logits(lm, tokens, None, None)
    logits = spliced_logits(lm, tokens, site, after_skip(fn, skip))
    return context_losses(logits, tokens, skip, clean_logits)


def context_losses(
    logits: Tensor, tokens: Tensor, skip: int, clean_logits: Tensor | None = None
) -> ContextLosses:
    """Per-context sums of next-token CE, and of KL from `clean_logits` (0 without them)."""
    ce = next_token_loss(logits, tokens)[:, skip:].double().sum(1)
    if clean_logits is None:
        kl = torch.zeros_like(ce)
    else:
        kl = next_token_kl(clean_logits.to(logits.device), logits)[:, skip:].double().sum(1)
    n = np.full(tokens.shape[0], tokens.shape[1] - 1 - skip, dtype=np.int64)
    return ContextLosses(ce.cpu().numpy(), kl.cpu().numpy(), n)


def _check_tokens(tokens: Tensor, skip: int) -> None:
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise CoactError(
            f"tokens must be a non-empty (contexts, length) batch, got {tuple(tokens.shape)}"
        )
    if skip < 0 or tokens.shape[1] - 1 - skip <= 0:
        raise CoactError(
            f"contexts of length {tokens.shape[1]} leave no predicted position after skipping "
            f"the first {skip}; use longer contexts"
        )


__all__ = [
    "ContextLosses",
    "Interval",
    "after_skip",
    "bootstrap_mean_ratio",
    "ce_and_kl",
    "context_losses",
    "next_token_kl",
    "resample_indices",
]
