"""The sparse linear connector read off one Gram pair: the L1 path, its α sweep and elbow,
the least-squares refit on the chosen support, its connections table, and their
stability across two halves of the training contexts. `connect` and `compose` share it."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import polars as pl
import scipy.sparse as sp

from coact.codes.store import CodeStore
from coact.connectors.exact import (
    GramStats,
    LassoPath,
    LassoPathConfig,
    heldout_nmse,
    lasso_path,
    refit_support,
)
from coact.connectors.interface import LinearConnector
from coact.connectors.sweep import elbow
from coact.connectors.train import split_rows
from coact.errors import CoactError
from coact.models.sites import SitePair
from coact.progress import tqdm


def context_split(
    tokens: pl.DataFrame, heldout_fraction: float, seed: int, store: CodeStore
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(context of each row, training rows, held-out rows): whole contexts held out, the
    same split for every stage that fits on these codes with this fraction and seed."""
    groups = tokens["context"].to_numpy()
    if len(groups) < 4 or len(np.unique(groups)) < 4:
        raise CoactError(f"the code store {store.directory} has too few contexts to hold any out")
    train, held = split_rows(len(groups), heldout_fraction, seed, groups)
    return groups, train, held


class PairCodes(NamedTuple):
    """A pair's codes, the token table and the held-out split by context (`context_split`)."""

    x: sp.csr_matrix
    y: sp.csr_matrix
    tokens: pl.DataFrame
    groups: np.ndarray
    train: np.ndarray
    held: np.ndarray


def read_pair(store: CodeStore, pair: SitePair, heldout_fraction: float, seed: int) -> PairCodes:
    """What every fit on a pair reads first: both sites' codes and the shared split."""
    x, y = store.read_site(pair.in_site.slug), store.read_site(pair.out_site.slug)
    tokens = store.read_tokens()
    return PairCodes(x, y, tokens, *context_split(tokens, heldout_fraction, seed, store))


def standardised(coef: sp.spmatrix, stats: GramStats, outputs: np.ndarray) -> sp.coo_matrix:
    """|w|·std(x_k)/std(y_j): a weight's effect in units of the output's spread."""
    _, diag = stats.gram()
    sd_in = np.sqrt(np.maximum(diag, 0))
    var = stats.y_var()[outputs]
    sd_out = np.sqrt(np.where(var > 0, var, np.inf))
    c = sp.coo_matrix(coef)
    return sp.coo_matrix(
        (np.abs(c.data) * sd_in[c.row] / sd_out[c.col], (c.row, c.col)), shape=c.shape
    )


@dataclass(frozen=True)
class SparseFit:
    """The L1 path, its sweep table, the chosen α (the elbow) and the least-squares refit
    on the chosen support: what connect and composition both read off one Gram pair."""

    path: LassoPath
    held_nmse: np.ndarray  # (alphas, outputs)
    sweep: pl.DataFrame
    chosen: int
    coef: sp.csc_matrix  # L1 weights at the chosen α
    refit: sp.csc_matrix  # least squares on the same support
    refit_intercepts: np.ndarray
    path_s: float  # seconds for the path and its sweep (the refit is cheap beside it)

    @property
    def connector(self) -> LinearConnector:
        """The chosen connector: least squares on the support the L1 path chose."""
        return LinearConnector(self.refit, self.refit_intercepts)


def fit_sparse(
    stats: GramStats,
    stats_held: GramStats,
    config: LassoPathConfig,
    magnitude: float,
    progress: bool = False,
) -> SparseFit:
    clock = time.perf_counter()
    path = lasso_path(stats, config, progress=progress)
    held_nmse = heldout_nmse(path, stats_held)
    sweep, chosen = sweep_table(path, held_nmse, stats, magnitude)
    path_s = time.perf_counter() - clock
    coef = sp.csc_matrix(path.coef[chosen])
    refit, refit_intercepts = refit_support(stats, coef)
    return SparseFit(path, held_nmse, sweep, chosen, coef, refit, refit_intercepts, path_s)


def sweep_table(
    path: LassoPath, held_nmse: np.ndarray, stats: GramStats, magnitude: float
) -> tuple[pl.DataFrame, int]:
    alive = ~path.dead
    n_alive = max(int(alive.sum()), 1)
    mean_l1 = np.array([abs(c).sum() / n_alive for c in path.coef])
    above = np.array(
        [int((standardised(c, stats, path.outputs).data >= magnitude).sum()) for c in path.coef]
    )
    with np.errstate(invalid="ignore"):
        held = np.array([np.nanmean(r) if np.isfinite(r).any() else np.nan for r in held_nmse])
        train = np.array([np.nanmean(r) if np.isfinite(r).any() else np.nan for r in path.nmse])
    front = elbow(np.nan_to_num(held, nan=np.inf), mean_l1)
    chosen = front.elbow if front.elbow >= 0 else len(path.alphas) - 1
    on_front = np.zeros(len(path.alphas), dtype=bool)
    on_front[front.indices] = True
    frame = pl.DataFrame(
        {
            "alpha": path.alphas,
            "heldout_nmse": held,
            "train_nmse": train,
            "mean_l1": mean_l1,
            "weights_nonzero": [c.nnz for c in path.coef],
            "weights_above": above,
            "converged": path.converged,
            "unconverged_outputs": path.unconverged,
            "max_gap": path.max_gap,
            "sweeps": path.n_iter,
            "on_frontier": on_front,
            "chosen": np.arange(len(path.alphas)) == chosen,
        }
    )
    return frame, int(chosen)


def weights_table(
    coef: sp.csc_matrix, refit: sp.csc_matrix, stats: GramStats, magnitude: float
) -> pl.DataFrame:
    """One row per connection: its L1 weight and its least-squares refit on the support
    (the coefficient a formula shows); `large` is judged on the refit, standardised."""
    c, r = coef.tocoo(), refit.tocoo()  # same sparsity pattern, same order
    std = standardised(r, stats, np.arange(coef.shape[1])).tocoo()
    order = np.lexsort((-np.abs(r.data), c.col))
    return pl.DataFrame(
        {
            "output": c.col[order].astype(np.int64),
            "input": c.row[order].astype(np.int64),
            "weight": c.data[order],
            "weight_refit": r.data[order],
            "standardised": std.data[order],
            "large": std.data[order] >= magnitude,
        }
    )


def stability(
    weights: pl.DataFrame,
    x: sp.csr_matrix,
    y: sp.csr_matrix,
    groups: np.ndarray,
    fit: SparseFit,
    seed: int,
    grid: LassoPathConfig,
    progress: bool,
) -> pl.DataFrame:
    """Refit at the chosen α on two disjoint halves of the training contexts (warm-started
    down the same grid): does each connection appear in both, with the same sign, and
    how far does its weight move? Connections are estimated from estimates (SAE codes)."""
    half_a, half_b = split_rows(x.shape[0], 0.5, seed + 1, groups)
    alphas = tuple(fit.path.alphas[: fit.chosen + 1])
    grid = LassoPathConfig(**{**asdict(grid), "alphas": alphas})
    fits = []
    for rows in tqdm((half_a, half_b), desc="stability halves", disable=not progress):
        stats = GramStats.empty(x.shape[1], y.shape[1]).add(x[rows], y[rows])
        fits.append(sp.csc_matrix(lasso_path(stats, grid).coef[-1]))
    rows_out, rows_in = weights["output"].to_numpy(), weights["input"].to_numpy()
    wa = np.asarray(fits[0][rows_in, rows_out]).ravel()
    wb = np.asarray(fits[1][rows_in, rows_out]).ravel()
    both = (wa != 0) & (wb != 0) & (np.sign(wa) == np.sign(wb))
    with np.errstate(divide="ignore", invalid="ignore"):
        change = np.abs(wa - wb) / np.maximum(np.abs(wa), np.abs(wb))
    return weights.with_columns(
        pl.Series("weight_half_a", wa),
        pl.Series("weight_half_b", wb),
        pl.Series("in_both", both),
        pl.Series("relative_change", np.where(both, change, np.nan)),
    )
