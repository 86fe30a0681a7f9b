"""Which output features the MLP computes linearly: per-feature loss differences and shares.

For output feature j, on held-out tokens: d(j) = MSE_lin(j) − MSE_mlp(j), both connectors
fitted without L1. d is reported raw, as a fraction of the feature's variance (`fvu`, fair
across layers of different norms), and in the seed study's normalisation (`seed`:
× (min layer norm / layer norm)²). A feature is linear when d(j) ≤ τ in the chosen form;
features never active in the sample are dead and never counted as linear.

d(j) is itself an estimate from held-out tokens. Its noise floor comes from a bootstrap over
held-out contexts (tokens of one context are correlated, so contexts are the unit): each
feature gets an interval for d, and a verdict that is only "linear" when the whole interval
is at or under τ and only "nonlinear" when the whole interval is above it; the rest is
"undecided". The share of linear features is then bracketed: linear beyond doubt, and not
nonlinear beyond doubt.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import scipy.sparse as sp

from coact.rundir.results import Result
from coact.settings import Range, check_ranges, setting

Form = Literal["raw", "fvu", "seed"]
SEED_TAU = 0.001


@dataclass(frozen=True)
class LinearityConfig:
    # any number but NaN: d(j) can fall below 0 (the mlp worse than least squares), and so
    # can a calibrated τ that puts every feature on the mlp's side
    tau: float = dataclasses.field(
        default=SEED_TAU, metadata={"help": "linearity threshold on d(j)", "range": Range()}
    )
    # the seed's τ = 0.001 was set on seed-normalised MSE
    form: Form = setting("seed", "form of d(j) τ applies to: raw, fvu or seed")
    n_boot: int = 500  # bootstrap replicates over held-out contexts
    level: float = 0.95  # of every interval
    seed: int = 0

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass(frozen=True)
class HeldoutContexts:
    """Per held-out context c and output j: Σ_t (e_lin² − e_mlp²) over its tokens, and its
    token count. d(j) = Σ_c diff[c, j] / Σ_c tokens[c]; resampling contexts bootstraps it."""

    diff: np.ndarray  # contexts × outputs
    tokens: np.ndarray  # contexts

    def replicates(self, n_boot: int, seed: int) -> np.ndarray:
        """n_boot × outputs bootstrap draws of d: contexts resampled with replacement."""
        n = len(self.tokens)
        if n == 0:
            return np.full((n_boot, self.diff.shape[1]), np.nan)
        counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot)
        return (counts @ self.diff) / (counts @ self.tokens)[:, None]

    def save(self, path: str | Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, diff=self.diff, tokens=self.tokens)

    @classmethod
    def load(cls, path: str | Path) -> HeldoutContexts:
        with np.load(path) as data:
            return cls(diff=data["diff"], tokens=data["tokens"])


def _form_scale(form: Form, variance: np.ndarray, scale_seed: float) -> np.ndarray:
    """The factor that turns raw d into `form`; NaN where fvu is undefined (dead)."""
    if form == "raw":
        return np.ones_like(variance)
    if form == "seed":
        return np.full_like(variance, scale_seed)
    return np.where(variance > 0, 1.0 / np.where(variance > 0, variance, 1.0), np.nan)


def feature_stats(codes: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per feature: tokens active, mean and variance (population), from sparse codes."""
    n = max(codes.shape[0], 1)
    active = np.bincount(codes.indices[codes.data != 0], minlength=codes.shape[1])
    mean = np.asarray(codes.sum(axis=0), dtype=float).ravel() / n
    mean_sq = np.asarray(codes.multiply(codes).sum(axis=0), dtype=float).ravel() / n
    return active, mean, np.maximum(mean_sq - mean**2, 0.0)


def seed_scale(layer_norm: float, min_layer_norm: float) -> float:
    """The seed's normalisation factor (min layer norm / layer norm)², applied to MSEs."""
    return (min_layer_norm / layer_norm) ** 2


def linearity_table(
    mse_linear: np.ndarray,
    mse_mlp: np.ndarray,
    variance: np.ndarray,
    active_count: np.ndarray,
    *,
    layer_norm: float = 1.0,
    min_layer_norm: float = 1.0,
    config: LinearityConfig = LinearityConfig(),
    contexts: HeldoutContexts | None = None,
) -> pl.DataFrame:
    """One row per output feature: MSEs, d in three forms, linear / nonlinear / dead; with
    `contexts`, also d's bootstrap interval in each form and the verdict it supports."""
    mse_linear, mse_mlp = np.asarray(mse_linear, float), np.asarray(mse_mlp, float)
    variance, active = np.asarray(variance, float), np.asarray(active_count)
    d = mse_linear - mse_mlp
    dead = (active == 0) | (variance <= 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        d_fvu = np.where(dead, np.nan, d / np.where(variance > 0, variance, 1.0))
    forms = {"raw": d, "fvu": d_fvu, "seed": d * seed_scale(layer_norm, min_layer_norm)}
    chosen = forms[config.form]
    status = np.where(dead, "dead", np.where(chosen <= config.tau, "linear", "nonlinear"))
    frame = pl.DataFrame(
        {
            "feature": np.arange(len(d)),
            "mse_linear": mse_linear,
            "mse_mlp": mse_mlp,
            "d": d,
            "d_fvu": d_fvu,
            "d_seed": forms["seed"],
            "variance": variance,
            "active_count": active,
            "status": status,
        }
    )
    if contexts is None:
        return frame
    tail = (1 - config.level) / 2
    reps = contexts.replicates(config.n_boot, config.seed)
    low, high = np.quantile(reps, [tail, 1 - tail], axis=0)
    scale = seed_scale(layer_norm, min_layer_norm)
    bounds = {}
    for form, name in (("raw", "d"), ("fvu", "d_fvu"), ("seed", "d_seed")):
        factor = _form_scale(form, variance, scale)  # type: ignore[arg-type]
        bounds[f"{name}_low"] = np.where(dead, np.nan, low * factor)
        bounds[f"{name}_high"] = np.where(dead, np.nan, high * factor)
    return _with_verdict(frame.with_columns(*(pl.Series(k, v) for k, v in bounds.items())), config)


def _with_verdict(table: pl.DataFrame, config: LinearityConfig) -> pl.DataFrame:
    """`verdict`: linear when d's whole interval is ≤ τ, nonlinear when all of it is > τ."""
    name = {"raw": "d", "fvu": "d_fvu", "seed": "d_seed"}[config.form]
    low, high = pl.col(f"{name}_low"), pl.col(f"{name}_high")
    return table.with_columns(
        pl.when(pl.col("status") == "dead")
        .then(pl.lit("dead"))
        .when(high <= config.tau)
        .then(pl.lit("linear"))
        .when(low > config.tau)
        .then(pl.lit("nonlinear"))
        .otherwise(pl.lit("undecided"))
        .alias("verdict")
    )


@dataclass(frozen=True, kw_only=True)
class LinearShare(Result):
    """Alive features that are linear at one τ (dead ones counted apart); with d's noise
    floor, the share linear beyond doubt and the share not nonlinear beyond doubt, which
    bracket it, and how many features the mlp fits better (or worse) beyond the noise."""

    percent_linear: float
    linear: int
    nonlinear: int
    dead: int
    alive: int
    confident_linear: int | None = None
    confident_nonlinear: int | None = None
    undecided: int | None = None
    percent_linear_confident: float | None = None
    percent_linear_possible: float | None = None
    mlp_gain_beyond_noise: int | None = None
    mlp_loss_beyond_noise: int | None = None


def percent_linear(table: pl.DataFrame) -> LinearShare:
    """Share of alive features that are linear (dead ones are counted apart). With a
    verdict column, what d's noise floor allows: the share that is linear beyond doubt
    (`percent_linear_confident`) and the share not nonlinear beyond doubt
    (`percent_linear_possible`), which bracket the point share; and how many features have
    an mlp gain d > 0 (or < 0) that its interval separates from zero.

    (A bootstrap interval of the share itself is biased where many features sit near τ:
    resampling pushes each one across τ with probability near one half.)"""
    counts = dict(table.group_by("status").len().iter_rows())
    linear, nonlinear, dead = (int(counts.get(k, 0)) for k in ("linear", "nonlinear", "dead"))
    alive = linear + nonlinear
    percent = lambda n: 100.0 * n / alive if alive else float("nan")  # noqa: E731
    share = LinearShare(
        percent_linear=percent(linear), linear=linear, nonlinear=nonlinear, dead=dead,
        alive=alive,
    )  # fmt: skip
    if "verdict" not in table.columns:
        return share
    verdicts = dict(table.group_by("verdict").len().iter_rows())
    sure, unsure = int(verdicts.get("linear", 0)), int(verdicts.get("undecided", 0))
    low, high = table["d_low"].to_numpy(), table["d_high"].to_numpy()  # NaN when dead
    return replace(
        share,
        confident_linear=sure,
        confident_nonlinear=int(verdicts.get("nonlinear", 0)),
        undecided=unsure,
        percent_linear_confident=percent(sure),
        percent_linear_possible=percent(sure + unsure),
        mlp_gain_beyond_noise=int(np.sum(low > 0)),
        mlp_loss_beyond_noise=int(np.sum(high < 0)),
    )


def finite_mean(values: Any) -> float:
    """Mean over the finite entries (dead features give NaN), NaN when there are none."""
    a = np.asarray(values, dtype=float)
    a = a[np.isfinite(a)]
    return float(a.mean()) if len(a) else float("nan")


def relabel(table: pl.DataFrame, config: LinearityConfig) -> pl.DataFrame:
    """The same table with `status` (and `verdict`) at another τ or form (no refitting)."""
    column = {"raw": "d", "fvu": "d_fvu", "seed": "d_seed"}[config.form]
    if "verdict" in table.columns:
        table = _with_verdict(table, config)
    return table.with_columns(
        pl.when(pl.col("status") == "dead")
        .then(pl.lit("dead"))
        .when(pl.col(column) <= config.tau)
        .then(pl.lit("linear"))
        .otherwise(pl.lit("nonlinear"))
        .alias("status")
    )
