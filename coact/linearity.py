"""Which output features the MLP computes linearly: per-feature loss differences and shares.

For output feature j, on held-out tokens: d(j) = MSE_lin(j) − MSE_mlp(j), both connectors
fitted without L1. d is reported raw, as a fraction of the feature's variance (`fvu`, fair
across layers of different norms), and in the seed study's normalisation (`seed`:
× (min layer norm / layer norm)²). A feature is linear when d(j) ≤ τ in the chosen form;
features never active in the sample are dead and never counted as linear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
import scipy.sparse as sp

Form = Literal["raw", "fvu", "seed"]
SEED_TAU = 0.001


@dataclass(frozen=True)
class LinearityConfig:
    tau: float = SEED_TAU
    form: Form = "seed"  # the seed's τ = 0.001 was set on seed-normalised MSE


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
) -> pl.DataFrame:
    """One row per output feature: MSEs, d in three forms, and linear / nonlinear / dead."""
    mse_linear, mse_mlp = np.asarray(mse_linear, float), np.asarray(mse_mlp, float)
    variance, active = np.asarray(variance, float), np.asarray(active_count)
    d = mse_linear - mse_mlp
    dead = (active == 0) | (variance <= 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        d_fvu = np.where(dead, np.nan, d / np.where(variance > 0, variance, 1.0))
    forms = {"raw": d, "fvu": d_fvu, "seed": d * seed_scale(layer_norm, min_layer_norm)}
    chosen = forms[config.form]
    status = np.where(dead, "dead", np.where(chosen <= config.tau, "linear", "nonlinear"))
    return pl.DataFrame(
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


def percent_linear(table: pl.DataFrame) -> dict[str, float]:
    """Share of alive features that are linear (dead ones are counted apart)."""
    counts = dict(table.group_by("status").len().iter_rows())
    linear, nonlinear, dead = (counts.get(k, 0) for k in ("linear", "nonlinear", "dead"))
    alive = linear + nonlinear
    return {
        "percent_linear": 100.0 * linear / alive if alive else float("nan"),
        "linear": linear,
        "nonlinear": nonlinear,
        "dead": dead,
        "alive": alive,
    }


def relabel(table: pl.DataFrame, config: LinearityConfig) -> pl.DataFrame:
    """The same table with `status` recomputed at another τ or form (no refitting)."""
    column = {"raw": "d", "fvu": "d_fvu", "seed": "d_seed"}[config.form]
    return table.with_columns(
        pl.when(pl.col("status") == "dead")
        .then(pl.lit("dead"))
        .when(pl.col(column) <= config.tau)
        .then(pl.lit("linear"))
        .otherwise(pl.lit("nonlinear"))
        .alias("status")
    )
