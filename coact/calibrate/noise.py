"""Noise of a chosen size at a site, and the ΔCE-versus-noise curve.

Calibrating the linearity threshold τ asks how much the model's loss grows when a site's
activation is perturbed by an error of a given normalised MSE: isotropic noise, or noise
along the decoder directions of the SAE features active on each token (shaped like
reconstruction error). This module draws that noise, scales it to the site's total
variance, and measures the curve over a range of strengths with the per-context losses and
bootstrap of `coact.calibrate.losses`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import polars as pl
import torch
from torch import Tensor

from coact.calibrate.losses import (
    ContextLosses,
    Interval,
    _check_tokens,
    bootstrap_mean_ratio,
    ce_and_kl,
    context_losses,
)
from coact.errors import CoactError
from coact.models.load import LoadedModel
from coact.models.sites import Site
from coact.models.tracing import SpliceFn, capture, spliced_logits
from coact.progress import tqdm
from coact.sae.base import SparseAutoencoder
from coact.sae.evaluate import check_sae_fits

NoiseKind = Literal["isotropic", "sae"]
NOISE_KINDS: tuple[NoiseKind, ...] = ("isotropic", "sae")


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
    sae: SparseAutoencoder | None = None,
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


def add_noise(x: Tensor, strength: float, kind: NoiseKind, **noise: Any) -> Tensor:
    """x + n, `noise` the keywords of `sample_noise`; strength 0 returns x itself, so
    ΔCE is exactly 0."""
    return x if strength == 0 else x + sample_noise(x, strength, kind, **noise)


def _batch_generator(seed: int, batch: int) -> torch.Generator:
    """One stream per (seed, batch): every strength reuses it, so the curve compares the
    same noise directions at different sizes (common random numbers, a smoother curve)."""
    state = np.random.SeedSequence([seed, batch]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def _noise_splice(
    strength: float,
    kind: NoiseKind,
    generator: torch.Generator,
    sae: SparseAutoencoder | None,
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
    sae: SparseAutoencoder | None = None,
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
    sae: SparseAutoencoder | None,
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
    sae: SparseAutoencoder | None,
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


__all__ = [
    "NOISE_KINDS",
    "NoiseKind",
    "activation_variance",
    "add_noise",
    "noise_curve",
    "sample_noise",
]
