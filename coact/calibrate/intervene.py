"""Measuring what an intervention at a site costs the model's own next-token loss.

These are the primitives for calibrating the linearity threshold τ: per-context sums of
next-token cross-entropy and of KL(clean ‖ modified) under a splice, noise of a chosen
normalised MSE (isotropic, or along the decoder directions of the SAE features active on
each token), a ΔCE-versus-noise curve and a table of named splices. Everything is summed
per context (row of `tokens`) so intervals come from a bootstrap over contexts, the unit
that is sampled independently; tokens of one context are not independent.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import polars as pl
import torch
from torch import Tensor
from tqdm.auto import tqdm

from coact.errors import CoactError
from coact.models.load import LoadedModel
from coact.models.sites import Site
from coact.models.tracing import SpliceFn, capture, next_token_loss, spliced_logits
from coact.sae.base import Sae
from coact.sae.evaluate import check_sae_fits

NoiseKind = Literal["isotropic", "sae"]
NOISE_KINDS: tuple[NoiseKind, ...] = ("isotropic", "sae")


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


@torch.no_grad()
def activation_variance(
    lm: LoadedModel,
    tokens: Tensor,
    site: Site,
    *,
    batch_size: int = 8,
    skip_first_positions: int = 0,
) -> float:
    """Total variance per token at `site`: Σ over dims of each dim's variance (float64).

    This is E‖x − E x‖², the MSE of predicting every token by the mean, so a noise or
    reconstruction MSE divided by it is a fraction of variance (normalised MSE).
    """
    skip = skip_first_positions
    _check_tokens(tokens, skip)
    total: Tensor | None = None
    total_sq = 0.0
    n = 0
    for start in range(0, tokens.shape[0], batch_size):
        x = capture(lm, tokens[start : start + batch_size], [site])[site][:, skip:]
        x = x.reshape(-1, x.shape[-1]).double()
        total = x.sum(0) if total is None else total + x.sum(0)
        total_sq += float(x.pow(2).sum())
        n += x.shape[0]
    assert total is not None
    return total_sq / n - float(total.pow(2).sum()) / n**2


@torch.no_grad()
def sample_noise(
    x: Tensor,
    strength: float,
    kind: NoiseKind,
    *,
    generator: torch.Generator,
    sae: Sae | None = None,
    reference_variance: float,
) -> Tensor:
    """Noise n for activations x (..., d) with mean ‖n‖² over tokens ≈ strength × variance.

    isotropic: n ~ N(0, σ²I) with σ² = strength × reference_variance / d, matched in
    expectation (the realised mean fluctuates; measure it). sae: on token t,
    n_t = c · Σ_{i active at t} g_{t,i} · codes_{t,i} · W_dec[i], g ~ N(0, 1), with the one
    constant c per call that makes the mean ‖n‖² over all tokens of x match exactly. Each
    feature's term is scaled by its code because codes_{t,i} · W_dec[i] is what the feature
    actually writes: that is unchanged when a format moves scale between codes and decoder
    rows, and it makes the error relative to each feature's size, as reconstruction error
    is. Tokens with no active feature get no noise; the mean still runs over all tokens, so
    at equal strength both kinds carry the same total noise energy.
    """
    if not math.isfinite(strength) or strength < 0:
        raise CoactError(f"noise strength must be a finite number ≥ 0, got {strength}")
    target = strength * reference_variance
    if kind == "isotropic":
        z = _randn(x.shape, generator).to(x.device, x.dtype)
        return z * math.sqrt(target / x.shape[-1])
    if kind != "sae":
        raise CoactError(f"unknown noise kind {kind!r}; known: {', '.join(NOISE_KINDS)}")
    if sae is None:
        raise CoactError("SAE-shaped noise needs an SAE for the site")
    flat = x.reshape(-1, x.shape[-1])
    codes = sae.encode(flat.to(sae.W_dec.dtype))
    rows, cols = codes.nonzero(as_tuple=True)
    if rows.numel() == 0:
        raise CoactError(
            "no SAE feature is active on any token, so SAE-shaped noise is undefined; check "
            "that the SAE was trained for this site"
        )
    g = _randn((rows.numel(),), generator).to(codes.device, codes.dtype)
    coeff = torch.zeros_like(codes)
    coeff[rows, cols] = g * codes[rows, cols]
    raw = coeff @ sae.W_dec
    energy = float(raw.double().pow(2).sum(-1).mean())
    scale = math.sqrt(target / energy) if energy > 0 else 0.0
    return (raw * scale).reshape(x.shape).to(x.dtype)


def _randn(shape: Sequence[int] | torch.Size, generator: torch.Generator) -> Tensor:
    return torch.randn(tuple(shape), generator=generator, device=generator.device)


def add_noise(
    x: Tensor,
    strength: float,
    kind: NoiseKind,
    *,
    generator: torch.Generator,
    sae: Sae | None = None,
    reference_variance: float,
) -> Tensor:
    """x + n (see `sample_noise`); strength 0 returns x itself, so ΔCE is exactly 0."""
    if strength == 0:
        return x
    n = sample_noise(
        x, strength, kind, generator=generator, sae=sae, reference_variance=reference_variance
    )
    return x + n


def _batch_generator(seed: int, batch: int) -> torch.Generator:
    """One stream per (seed, batch): every strength reuses it, so the curve compares the
    same noise directions at different sizes (common random numbers, a smoother curve)."""
    state = np.random.SeedSequence([seed, batch]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def _noise_splice(
    strength: float,
    kind: NoiseKind,
    generator: torch.Generator,
    sae: Sae | None,
    variance: float,
    drawn: list[float],
) -> SpliceFn:
    """x ↦ x + noise, appending the noise's summed ‖n‖² to `drawn` (0 and x itself at 0)."""

    def apply(x: Tensor) -> Tensor:
        if strength == 0:
            drawn.append(0.0)
            return x
        n = sample_noise(
            x, strength, kind, generator=generator, sae=sae, reference_variance=variance
        )
        drawn.append(float(n.double().pow(2).sum()))
        return x + n

    return apply


@torch.no_grad()
def noise_curve(
    lm: LoadedModel,
    tokens: Tensor,
    site: Site,
    strengths: Sequence[float],
    kind: NoiseKind,
    *,
    sae: Sae | None = None,
    batch_size: int = 8,
    seed: int = 0,
    skip_first_positions: int = 1,
    n_boot: int = 1000,
    level: float = 0.95,
    reference_variance: float | None = None,
) -> pl.DataFrame:
    """ΔCE and KL against the realised normalised MSE of noise added at `site`.

    One row per strength. `strength` is the requested noise MSE as a fraction of the
    site's total variance per token (estimated from these clean contexts unless given);
    `realised_nmse` is what the drawn noise measured. ΔCE = mean CE(noisy) − mean CE(clean)
    per predicted token, KL = mean KL(clean ‖ noisy), both token-weighted over contexts
    with percentile bootstrap intervals over contexts.
    """
    skip = skip_first_positions
    _check_noise_request(lm, tokens, site, strengths, kind, sae, skip)
    variance = reference_variance
    if variance is None:
        variance = activation_variance(
            lm, tokens, site, batch_size=batch_size, skip_first_positions=skip
        )
    if not variance > 0:
        raise CoactError(f"activations at {site} have no variance; cannot scale noise to it")
    n_s = len(strengths)
    ce_clean, n_tok = [], []
    ce_noisy: list[np.ndarray] = []
    kl: list[np.ndarray] = []
    energy = np.zeros(n_s)
    noised = 0
    starts = range(0, tokens.shape[0], batch_size)
    bar = tqdm(total=len(starts) * n_s, desc=f"{kind} noise at {site}")
    for b, start in enumerate(starts):
        batch = tokens[start : start + batch_size].to(lm.device)
        clean, ce_b, kl_b, energy_b = _noise_batch(
            lm, batch, site, strengths, kind, sae, variance, (seed, b), skip, bar
        )
        ce_clean.append(clean.ce)
        n_tok.append(clean.n_tokens)
        noised += batch.shape[0] * (batch.shape[1] - skip)
        energy += energy_b
        ce_noisy.append(ce_b)
        kl.append(kl_b)
    bar.close()
    base = np.concatenate(ce_clean)
    n = np.concatenate(n_tok)
    noisy_ce, noisy_kl = np.concatenate(ce_noisy), np.concatenate(kl)
    stats = bootstrap_mean_ratio(
        np.concatenate([noisy_ce - base[:, None], noisy_kl], axis=1), n, n_boot, seed, level
    )
    return _curve_frame(site, kind, strengths, energy / noised / variance, variance, base, n, stats)


def _check_noise_request(
    lm: LoadedModel,
    tokens: Tensor,
    site: Site,
    strengths: Sequence[float],
    kind: NoiseKind,
    sae: Sae | None,
    skip: int,
) -> None:
    """Refuse a bad request before any forward pass: the tokens, the noise kind, an SAE
    that fits the site for SAE-shaped noise, and finite non-negative strengths."""
    _check_tokens(tokens, skip)
    if kind not in NOISE_KINDS:
        raise CoactError(f"unknown noise kind {kind!r}; known: {', '.join(NOISE_KINDS)}")
    if kind == "sae":
        if sae is None:
            raise CoactError("SAE-shaped noise needs an SAE for the site")
        check_sae_fits(sae, site, lm.adapter.d_model, lm.adapter.mlp_resid_kind())
    for s in strengths:
        if not math.isfinite(s) or s < 0:
            raise CoactError(f"noise strength must be a finite number ≥ 0, got {s}")


def _noise_batch(
    lm: LoadedModel,
    batch: Tensor,
    site: Site,
    strengths: Sequence[float],
    kind: NoiseKind,
    sae: Sae | None,
    variance: float,
    stream: tuple[int, int],
    skip: int,
    bar: tqdm,
) -> tuple[ContextLosses, np.ndarray, np.ndarray, np.ndarray]:
    """One batch of contexts: its clean losses, then per strength (columns) the noisy
    contexts' CE and KL from the clean pass, and the noise's summed ‖n‖². Every strength
    draws from a fresh generator of the same (seed, batch) `stream`, so all sizes share the
    noise directions (see `_batch_generator`); the clean logits are computed once."""
    n_s = len(strengths)
    clean_logits = spliced_logits(lm, batch, None, None)
    clean = context_losses(clean_logits, batch, skip)
    ce_b = np.zeros((batch.shape[0], n_s))
    kl_b = np.zeros((batch.shape[0], n_s))
    energy_b = np.zeros(n_s)
    for j, strength in enumerate(strengths):
        drawn: list[float] = []
        noisy = _noise_splice(strength, kind, _batch_generator(*stream), sae, variance, drawn)
        out = ce_and_kl(
            lm, batch, site, noisy, skip_first_positions=skip, clean_logits=clean_logits
        )
        ce_b[:, j], kl_b[:, j] = out.ce, out.kl
        energy_b[j] = sum(drawn)
        bar.update(1)
    return clean, ce_b, kl_b, energy_b


def _curve_frame(
    site: Site,
    kind: NoiseKind,
    strengths: Sequence[float],
    realised_nmse: np.ndarray,
    variance: float,
    base: np.ndarray,
    n: np.ndarray,
    stats: Interval,
) -> pl.DataFrame:
    """The curve's table, one row per strength: `stats` holds ΔCE for the strengths, then
    KL for them, each a point with its interval; the clean CE and counts repeat per row."""
    n_s = len(strengths)
    return pl.DataFrame(
        {
            "site": [str(site)] * n_s,
            "kind": [kind] * n_s,
            "strength": [float(s) for s in strengths],
            "realised_nmse": realised_nmse,
            "reference_variance": [variance] * n_s,
            "ce_clean": [float(base.sum() / n.sum())] * n_s,
            "delta_ce": stats.point[:n_s],
            "delta_ce_low": stats.low[:n_s],
            "delta_ce_high": stats.high[:n_s],
            "kl": stats.point[n_s:],
            "kl_low": stats.low[n_s:],
            "kl_high": stats.high[n_s:],
            "n_tokens": [int(n.sum())] * n_s,
            "n_contexts": [len(n)] * n_s,
        }
    )


@dataclass(frozen=True)
class SpliceLosses:
    """Per context: clean CE, predicted positions, and CE and KL under each named splice."""

    names: list[str]
    ce_clean: np.ndarray  # (contexts,)
    n_tokens: np.ndarray  # (contexts,)
    ce: np.ndarray  # (contexts, splices)
    kl: np.ndarray  # (contexts, splices): KL(clean ‖ spliced)

    def column(self, name: str) -> int:
        return self.names.index(name)


# For one batch of tokens: a function from a splice's name to the logits under it.
SplicedLogits = Callable[[Tensor], Callable[[str], Tensor]]


@torch.no_grad()
def splice_losses(
    lm: LoadedModel,
    tokens: Tensor,
    names: Sequence[str],
    spliced: SplicedLogits,
    *,
    batch_size: int = 8,
    skip_first_positions: int = 1,
    desc: str = "splicing",
    progress: bool = True,
) -> SpliceLosses:
    """One clean pass per batch, then one pass per splice, reusing the clean logits for KL.
    `spliced(batch)` may prepare per-batch state (e.g. a connector's predictions) once."""
    skip = skip_first_positions
    _check_tokens(tokens, skip)
    names = list(names)
    ce_clean, n_tok = [], []
    ce: dict[str, list[np.ndarray]] = {name: [] for name in names}
    kl: dict[str, list[np.ndarray]] = {name: [] for name in names}
    starts = range(0, tokens.shape[0], batch_size)
    bar = tqdm(total=len(starts) * len(names), desc=desc, disable=not progress)
    for start in starts:
        batch = tokens[start : start + batch_size].to(lm.device)
        clean_logits = spliced_logits(lm, batch, None, None)
        clean = context_losses(clean_logits, batch, skip)
        ce_clean.append(clean.ce)
        n_tok.append(clean.n_tokens)
        logits_of = spliced(batch)
        for name in names:
            out = context_losses(logits_of(name), batch, skip, clean_logits)
            ce[name].append(out.ce)
            kl[name].append(out.kl)
            bar.update(1)
    bar.close()
    return SpliceLosses(
        names,
        np.concatenate(ce_clean),
        np.concatenate(n_tok),
        np.stack([np.concatenate(ce[name]) for name in names], axis=1),
        np.stack([np.concatenate(kl[name]) for name in names], axis=1),
    )


def splice_summary(
    losses: SpliceLosses,
    *,
    baseline: str = "zero",
    reference: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> pl.DataFrame:
    """Token-weighted means with context-bootstrap intervals, one row per splice: ΔCE and
    KL against the clean model and ce_recovered = (CE_baseline − CE_spliced) / (CE_baseline
    − CE_clean); with `reference`, also the extra ΔCE and KL over that splice, paired by
    context. Every column resamples the same contexts, so differences stay paired."""
    base, n, spliced, kls = losses.ce_clean, losses.n_tokens, losses.ce, losses.kl
    boot = (n_boot, seed, level)
    ablated = spliced[:, losses.column(baseline)]
    delta = bootstrap_mean_ratio(spliced - base[:, None], n, *boot)
    kl = bootstrap_mean_ratio(kls, n, *boot)
    recovered = bootstrap_mean_ratio(ablated[:, None] - spliced, ablated - base, *boot)
    columns: dict[str, Any] = {
        "splice": losses.names,
        "ce_clean": float(base.sum() / n.sum()),
        "ce_spliced": spliced.sum(0) / n.sum(),
        "delta_ce": delta.point,
        "delta_ce_low": delta.low,
        "delta_ce_high": delta.high,
        "kl": kl.point,
        "kl_low": kl.low,
        "kl_high": kl.high,
    }
    if reference is not None:
        col = losses.column(reference)
        extra = bootstrap_mean_ratio(spliced - spliced[:, [col]], n, *boot)
        extra_kl = bootstrap_mean_ratio(kls - kls[:, [col]], n, *boot)
        for name, interval in (("extra_delta_ce", extra), ("extra_kl", extra_kl)):
            columns.update(
                {name: interval.point, f"{name}_low": interval.low, f"{name}_high": interval.high}
            )
    columns.update(
        {
            "ce_recovered": recovered.point,
            "ce_recovered_low": recovered.low,
            "ce_recovered_high": recovered.high,
            "n_tokens": int(n.sum()),
            "n_contexts": len(n),
        }
    )
    return pl.DataFrame(columns)


@torch.no_grad()
def splice_table(
    lm: LoadedModel,
    tokens: Tensor,
    site: Site,
    splices: Mapping[str, SpliceFn],
    *,
    batch_size: int = 8,
    skip_first_positions: int = 1,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> pl.DataFrame:
    """One row per named splice of `site`, plus the zero ablation as the row "zero".

    Columns: mean CE clean and spliced, ΔCE and KL(clean ‖ spliced) per predicted token
    with bootstrap intervals, and ce_recovered = (CE_zero − CE_spliced) / (CE_zero −
    CE_clean), whose interval resamples numerator and denominator with the same contexts.
    A splice under the name "zero" must be torch.zeros_like, since that row is the baseline.
    """
    skip = skip_first_positions
    if "zero" in splices and splices["zero"] is not torch.zeros_like:
        raise CoactError('the splice name "zero" is reserved for the zero ablation')
    named: dict[str, SpliceFn] = {k: v for k, v in splices.items() if k != "zero"}
    named["zero"] = torch.zeros_like

    def spliced(batch: Tensor) -> Callable[[str], Tensor]:
        return lambda name: spliced_logits(lm, batch, site, after_skip(named[name], skip))

    losses = splice_losses(
        lm, tokens, list(named), spliced, batch_size=batch_size, skip_first_positions=skip,
        desc=f"splicing {site}",
    )  # fmt: skip
    table = splice_summary(losses, n_boot=n_boot, seed=seed, level=level)
    return table.insert_column(1, pl.Series("site", [str(site)] * table.height))


__all__ = [
    "NOISE_KINDS",
    "ContextLosses",
    "Interval",
    "NoiseKind",
    "SpliceLosses",
    "SplicedLogits",
    "activation_variance",
    "add_noise",
    "after_skip",
    "bootstrap_mean_ratio",
    "ce_and_kl",
    "context_losses",
    "next_token_kl",
    "noise_curve",
    "resample_indices",
    "sample_noise",
    "splice_losses",
    "splice_summary",
    "splice_table",
]
