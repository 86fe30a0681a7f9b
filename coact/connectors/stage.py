"""`connect`: how the features of one site are computed from those of another.

From a code store it fits, on a held-out split by context: the L1 path of sparse linear
connectors (its Pareto frontier of held-out error against size, and the elbow chosen
automatically), the stability of the chosen connections across disjoint halves of the
training tokens, and the linearity of every output feature (least squares against an mlp
that starts from it, both without L1). Everything lands in `<run>/connect/`
(`coact.rundir.layout.ConnectFiles`):

    sweep.parquet       one row per α: held-out and train NMSE, mean ‖w‖₁, weights above
                        the magnitude, frontier membership, the chosen α
    weights.parquet     connections at the chosen α (L1 weight and its least-squares
                        refit on the chosen inputs), with both halves' weights
    features.parquet    per output feature: linearity, sparse-fit error, formula, large W2
    top_tokens.parquet  the tokens each feature of either site fires hardest on
    mlp_curve.parquet   the mlp fit's loss per step (and per epoch on held-back contexts)
    linearity_contexts.npz  per held-out context Σ(e_lin² − e_mlp²): d's bootstrap
    linearity_connectors.safetensors  the least-squares maps and mlps the table rests on
    connect.json        the headline (`ConnectResult`, written last: it marks completion)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl
import scipy.sparse as sp

from coact.codes.store import CodeStore
from coact.connectors.config import ConnectConfig
from coact.connectors.exact import GramStats
from coact.connectors.formulas import formula, top_tokens_table
from coact.connectors.sparse import (
    SparseFit,
    fit_sparse,
    read_pair,
    stability,
    weights_table,
)
from coact.errors import CoactError
from coact.linearity.fits import (
    LinearityFits,
    linearity_fits,
    save_linearity_connectors,
)
from coact.linearity.table import (
    Form,
    LinearShare,
    feature_stats,
    finite_mean,
    linearity_table,
    percent_linear,
)
from coact.models.sites import SitePair
from coact.progress import tqdm
from coact.rundir.files import atomic_write
from coact.rundir.layout import ConnectFiles
from coact.rundir.results import Result, Timings, pair_head, result_key

Decode = Callable[[list[int]], str]
RESULT_VERSION = 3  # bumped when what connect writes changes: older results are redone


@dataclass(frozen=True, kw_only=True)
class ConnectResult(Result):
    """The headline of one connect run: the chosen sparse connector, how well least
    squares and the mlp fit, and the linear share at the τ it was fitted with."""

    key: str
    in_site: str
    out_site: str
    directory: str
    tokens_train: int
    tokens_heldout: int
    alpha: float  # chosen at the elbow of the Pareto frontier
    alpha_index: int
    n_alphas: int
    path_converged: bool
    path_unconverged_alphas: int
    path_unconverged_outputs_max: int
    path_max_gap: float
    heldout_nmse_sparse: float  # the sparse linear connector at the chosen α
    weights_per_output: float  # its weights per alive output
    stable_share: float | None  # of its connections, those found on both halves
    heldout_nmse_linear: float  # least squares, no L1 (mean over alive outputs)
    heldout_nmse_mlp: float  # the mlp started from it
    mlp_epochs_run: int
    mlp_best_epoch: int | None
    linearity_output_chunks: int
    heldout_contexts: int
    norms: dict[str, float]
    tau: float
    form: Form
    share: LinearShare  # at `tau` in `form`
    timings: dict[str, float]


def connect(
    store: CodeStore | str | Path,
    pair: SitePair,
    out_dir: str | Path,
    config: ConnectConfig = ConnectConfig(),
    decode: Decode | None = None,
) -> ConnectResult:
    """Fit, measure and write the tables of `pair`; return (and write to connect.json)
    the headline. A finished result for the same codes, sites and config is reused."""
    store = CodeStore.of(store)
    store.require(pair.slugs)
    if not 0 < config.heldout_fraction < 1:
        raise CoactError(f"heldout_fraction must be in (0, 1), got {config.heldout_fraction}")
    files = ConnectFiles(Path(out_dir))
    inputs = [store.fingerprint, str(pair.in_site), str(pair.out_site)]
    key = result_key(inputs, config, RESULT_VERSION)
    if (previous := ConnectResult.finished(files, key)) is not None:
        return previous
    files.path.mkdir(parents=True, exist_ok=True)
    fitted = _fit(store, pair, config)
    tables = _tables(fitted, config, decode, pair)
    written = {
        files.sweep: fitted.sparse.sweep,
        files.weights: fitted.weights,
        files.features: tables.features,
        files.top_tokens: tables.top_tokens,
        files.mlp_curve: fitted.linearity.curve,
    }
    for path, frame in written.items():
        atomic_write(path, frame.write_parquet)
    atomic_write(files.heldout_contexts, fitted.linearity.contexts.save)
    save_linearity_connectors(files.connectors, fitted.linearity.connectors)
    result = _result(fitted, tables, key, pair, files, config)
    result.write(files.result)
    return result


@dataclass
class _Fitted:
    """What `connect` computed before it writes: the codes, the split and every fit."""

    x: sp.csr_matrix
    y: sp.csr_matrix
    tokens: pl.DataFrame
    train: np.ndarray
    held: np.ndarray
    stats: GramStats
    sparse: SparseFit
    weights: pl.DataFrame
    linearity: LinearityFits
    timings: Timings


def _fit(store: CodeStore, pair: SitePair, config: ConnectConfig) -> _Fitted:
    timings = Timings()
    with timings.part("gram"):
        x, y, tokens, groups, train, held = read_pair(
            store, pair, config.heldout_fraction, config.seed
        )
        x_train, y_train = x[train], y[train]  # sliced once: the halves refit reads them again
        stats = GramStats.empty(x.shape[1], y.shape[1]).add(x_train, y_train)
        stats_held = GramStats.empty(x.shape[1], y.shape[1]).add(x[held], y[held])

    sparse = fit_sparse(stats, stats_held, config.path, config.magnitude, config.progress)
    timings["path_s"] = sparse.path_s

    with timings.part("stability"):
        weights = weights_table(sparse.coef, sparse.refit, stats, config.magnitude)
        if config.stability:
            weights = stability(
                weights, x_train, y_train, groups[train], sparse, config.seed, config.path,
                config.progress,
            )  # fmt: skip

    with timings.part("linearity"):
        fits = linearity_fits(x, y, stats, stats_held, groups, held, config)
    return _Fitted(x, y, tokens, train, held, stats, sparse, weights, fits, timings)


class _Tables(NamedTuple):
    linearity: pl.DataFrame  # the linearity table alone
    features: pl.DataFrame  # with formulas, sparse-fit error, large W2, stability
    top_tokens: pl.DataFrame


def _tables(
    fitted: _Fitted, config: ConnectConfig, decode: Decode | None, pair: SitePair
) -> _Tables:
    with fitted.timings.part("tables"):
        sparse, fits = fitted.sparse, fitted.linearity
        active, _, variance = feature_stats(fitted.y)
        table = linearity_table(
            fits.mse_linear, fits.mse_mlp, variance, active, **_norms(config),
            config=config.linearity, contexts=fits.contexts,
        )  # fmt: skip
        features = _features_table(
            table, sparse.refit, sparse.refit_intercepts, sparse.held_nmse[sparse.chosen],
            fitted.weights, fits.w2_large, config,
        )  # fmt: skip
        top = _top_tokens(fitted.x, fitted.y, fitted.tokens, sparse.coef, config, decode, pair)
    return _Tables(table, features, top)


def _norms(config: ConnectConfig) -> dict[str, float]:
    return {"layer_norm": config.layer_norm, "min_layer_norm": config.min_layer_norm}


def _result(
    fitted: _Fitted,
    tables: _Tables,
    key: str,
    pair: SitePair,
    files: ConnectFiles,
    config: ConnectConfig,
) -> ConnectResult:
    path, chosen, fits = fitted.sparse.path, fitted.sparse.chosen, fitted.linearity
    table, weights = tables.linearity, fitted.weights
    share = percent_linear(table)
    stable = (
        float(weights["in_both"].to_numpy().mean()) if config.stability and len(weights) else None
    )
    return ConnectResult(
        **pair_head(key, pair, files),
        tokens_train=len(fitted.train),
        tokens_heldout=len(fitted.held),
        alpha=float(path.alphas[chosen]),
        alpha_index=int(chosen),
        n_alphas=len(path.alphas),
        path_converged=bool(path.converged.all()),
        path_unconverged_alphas=int((~path.converged).sum()),
        path_unconverged_outputs_max=int(path.unconverged.max(initial=0)),
        path_max_gap=float(path.max_gap.max(initial=0.0)),
        heldout_nmse_sparse=float(fitted.sparse.sweep["heldout_nmse"].to_numpy()[chosen]),
        weights_per_output=float(path.coef[chosen].nnz / max(share.alive, 1)),
        stable_share=stable,
        heldout_nmse_linear=finite_mean(table["mse_linear"] / table["variance"]),
        heldout_nmse_mlp=finite_mean(table["mse_mlp"] / table["variance"]),
        mlp_epochs_run=fits.epochs_run,
        mlp_best_epoch=fits.best_epoch,
        linearity_output_chunks=fits.chunks,
        heldout_contexts=len(fits.contexts.tokens),
        norms=_norms(config),
        tau=config.linearity.tau,
        form=config.linearity.form,
        share=share,
        timings=fitted.timings,
    )


def _features_table(
    table: pl.DataFrame,
    coef: sp.csc_matrix,
    intercepts: np.ndarray,
    held_nmse: np.ndarray,
    weights: pl.DataFrame,
    w2_large: np.ndarray,
    config: ConnectConfig,
) -> pl.DataFrame:
    n_out = coef.shape[1]
    terms = np.diff(coef.indptr)
    texts = [
        formula(coef, j, float(intercepts[j]), config.formula_terms)
        for j in tqdm(range(n_out), desc="formulas", disable=not config.progress)
    ]
    columns = {
        "nmse_sparse": held_nmse,
        "n_terms": terms,
        "intercept": intercepts,
        "formula": texts,
        "w2_large": w2_large,
    }
    frame = table.with_columns(*(pl.Series(k, v) for k, v in columns.items()))
    if "in_both" in weights.columns:
        stable = weights.group_by("output").agg(pl.col("in_both").mean().alias("stable_share"))
        frame = frame.join(stable, left_on="feature", right_on="output", how="left")
    return frame


def _top_tokens(
    x: sp.csr_matrix,
    y: sp.csr_matrix,
    tokens: pl.DataFrame,
    coef: sp.csc_matrix,
    config: ConnectConfig,
    decode: Decode | None,
    pair: SitePair,
) -> pl.DataFrame:
    """Top tokens of every output feature and of every input that appears in a formula."""
    used = np.unique(coef.indices)
    in_slug, out_slug = pair.slugs
    parts = [
        top_tokens_table(x, tokens, used, decode, config.top_tokens).with_columns(
            pl.lit(in_slug).alias("site")
        ),
        top_tokens_table(y, tokens, np.arange(y.shape[1]), decode, config.top_tokens).with_columns(
            pl.lit(out_slug).alias("site")
        ),
    ]
    return pl.concat(parts)
