"""`compose`: the next residual stream's features as a sparse mix of the block's sources.

In activations, resid_pre[ℓ+1] = resid_pre[ℓ] + attn_out[ℓ] + mlp_out[ℓ] holds exactly for
parallel (GPT-NeoX) and sequential (Llama, GPT-2) blocks alike. Each site has its own SAE,
so whether the next stream's *features* are a sparse linear mix of the sources' features
(and which source each one comes from) is an empirical question. This stage fits

    codes(resid_pre[ℓ+1]) ≈ W_r·codes(resid_pre[ℓ]) + W_a·codes(attn_out[ℓ])
                            + W_m·codes(mlp_out[ℓ]) + b

with the exact L1 path on the sources' codes side by side (one Gram pass, the same held-out
split and elbow rule as `connect`), refits the chosen support without L1, and fits least
squares on every input as the ceiling. Everything lands in `out_dir`:

    composition.parquet          per output feature: held-out R² of the sparse, refitted and
                                 least-squares fits; each source's share of the variance,
                                 cov(ŷ_s, y)/var(y), on the training tokens (where the
                                 shares of a fit with an intercept add up to its R²) and,
                                 for least squares, on held-out tokens too (honest where a
                                 wide fit overfits, but with no exact sum); the number of
                                 weights per source; intercepts
    composition_weights.parquet  connections at the chosen α: source site, in feature, out
                                 feature, L1 weight and its refit
    composition_sweep.parquet    one row per α, as connect's sweep.parquet
    composition.json             the headline (`CompositionResult`, written last: it marks
                                 completion)

`coact.block.decoded` tests the same story in activation space.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import scipy.sparse as sp

from coact.codes.store import CodeStore
from coact.connectors.exact import GramStats, LassoPathConfig, linear_fit, mse
from coact.connectors.sparse import SparseFit, context_split, fit_sparse, weights_table
from coact.errors import CoactError
from coact.linearity.fits import LINEAR_MAP_ENTRIES
from coact.linearity.table import finite_mean
from coact.models.sites import Site
from coact.rundir.files import atomic_write
from coact.rundir.layout import CompositionFiles
from coact.rundir.results import Result, Timings, result_key

RESULT_VERSION = 2  # bumped when what compose writes changes: older results are redone


def default_sources(layer: int) -> tuple[Site, ...]:
    """The three terms of the block's exact identity: skip, attention, MLP."""
    return Site("resid_pre", layer), Site("attn_out", layer), Site("mlp_out", layer)


@dataclass(frozen=True)
class CompositionSites:
    """What is composed: the `target` stream's features from its `sources`' features."""

    sources: tuple[Site, ...]
    target: Site

    def __post_init__(self) -> None:
        if not self.sources or len(set(self.sources)) != len(self.sources):
            raise CoactError(f"composition sources must be distinct and non-empty: {self.sources}")
        if self.target in self.sources:
            raise CoactError(f"the composition target {self.target} is also one of its sources")

    @classmethod
    def of_layer(
        cls, layer: int, sources: Sequence[str] | None = None, target: str | None = None
    ) -> CompositionSites:
        """Block ℓ's identity, resid_pre[ℓ+1] from resid_pre[ℓ], attn_out[ℓ] and
        mlp_out[ℓ], unless other sites are named."""
        return cls(
            default_sources(layer) if sources is None else tuple(Site.parse(s) for s in sources),
            Site("resid_pre", layer + 1) if target is None else Site.parse(target),
        )


@dataclass(frozen=True)
class CompositionConfig:
    heldout_fraction: float = 0.1  # of contexts, as in connect
    seed: int = 0
    path: LassoPathConfig = field(default_factory=LassoPathConfig)
    magnitude: float = 0.05  # a weight is large when |w|·std(x_in)/std(y_out) ≥ this
    least_squares_chunk_outputs: int | None = None  # None: as many as fit LINEAR_MAP_ENTRIES
    progress: bool = True


@dataclass(frozen=True, kw_only=True)
class CompositionResult(Result):
    """How much of the next stream's features a sparse mix of the sources' features
    explains (held-out R²), and each source's share of the variance."""

    key: str
    layer: int
    sources: list[str]
    source_keys: dict[str, str]  # column suffix → site
    source_widths: list[int]
    target: str
    target_width: int
    directory: str
    tokens_train: int
    tokens_heldout: int
    alive: int
    dead: int
    alpha: float
    alpha_index: int
    n_alphas: int
    path_converged: bool
    r2_sparse: float
    r2_refit: float
    r2_ls: float
    r2_ls_train: float
    variance_share_ls: dict[str, float]  # per source site, training tokens
    variance_share_ls_heldout: dict[str, float]
    variance_share_refit: dict[str, float]
    weights_per_output: float
    weights_per_output_by_source: dict[str, float]
    timings: dict[str, float]


def source_keys(sources: Sequence[Site]) -> list[str]:
    """Column suffix per source: its kind (`resid_pre`), or `resid_pre_3` if kinds repeat."""
    kinds = [s.kind for s in sources]
    unique = len(set(kinds)) == len(kinds)
    return [s.kind if unique else s.slug.replace(".", "_") for s in sources]


def compose(
    store: CodeStore | str | Path,
    sites: CompositionSites,
    out_dir: str | Path,
    config: CompositionConfig = CompositionConfig(),
) -> CompositionResult:
    """Fit, measure and write the tables; return (and write to composition.json) the
    headline. A finished result for the same codes, sites and config is reused."""
    store = CodeStore.of(store)
    store.require(s.slug for s in (*sites.sources, sites.target))
    if not 0 < config.heldout_fraction < 1:
        raise CoactError(f"heldout_fraction must be in (0, 1), got {config.heldout_fraction}")
    files = CompositionFiles(Path(out_dir))
    inputs = [store.fingerprint, [str(s) for s in sites.sources], str(sites.target)]
    key = result_key(inputs, config, RESULT_VERSION)
    if (previous := CompositionResult.finished(files, key)) is not None:
        return previous
    files.path.mkdir(parents=True, exist_ok=True)
    composed = _compose(store, sites, config)
    written = {files.features: composed.table, files.weights: composed.weights}
    written[files.sweep] = composed.sparse.sweep
    for path, frame in written.items():
        atomic_write(path, frame.write_parquet)
    result = _result(composed, key, sites, files)
    result.write(files.result)
    return result


@dataclass
class _Composed:
    """What `compose` fitted and measured, before it writes."""

    sparse: SparseFit
    table: pl.DataFrame
    weights: pl.DataFrame
    widths: list[int]
    var: np.ndarray
    tokens_train: int
    tokens_heldout: int
    timings: dict[str, float]


def _compose(store: CodeStore, sites: CompositionSites, config: CompositionConfig) -> _Composed:
    timings = Timings()
    with timings.part("gram"):
        sources, target = sites.sources, sites.target
        blocks = [store.read_site(s.slug) for s in sources]
        widths = [b.shape[1] for b in blocks]
        offsets = np.concatenate([[0], np.cumsum(widths)])
        x = sp.csr_matrix(sp.hstack(blocks, format="csr"))
        y = store.read_site(target.slug)
        _, train, held = context_split(
            store.read_tokens(), config.heldout_fraction, config.seed, store
        )
        stats = GramStats.empty(x.shape[1], y.shape[1]).add(x[train], y[train])
        stats_held = GramStats.empty(x.shape[1], y.shape[1]).add(x[held], y[held])

    sparse = fit_sparse(stats, stats_held, config.path, config.magnitude, config.progress)
    timings["path_s"] = sparse.path_s

    with timings.part("refit"):
        weights = _weights_table(
            sparse.coef, sparse.refit, stats, config.magnitude, sources, offsets, target
        )

    with timings.part("least_squares"):
        ceiling = _least_squares(stats, stats_held, offsets, config.least_squares_chunk_outputs)

    with timings.part("tables"):
        var, var_held = stats.y_var(), stats_held.y_var()
        fit = _Fit(
            r2_sparse=1 - sparse.held_nmse[sparse.chosen],
            r2_refit=_r2(mse(stats_held, sparse.refit, sparse.refit_intercepts), var_held),
            r2_refit_train=_r2(mse(stats, sparse.refit, sparse.refit_intercepts), var),
            shares_refit=variance_shares(stats, sparse.refit, offsets),
            intercept=sparse.path.intercepts[sparse.chosen],
            intercept_refit=sparse.refit_intercepts,
        )
        table = _features_table(fit, ceiling, sparse.coef, offsets, var, var_held, sources)
    return _Composed(sparse, table, weights, widths, var, len(train), len(held), timings)


def _result(
    composed: _Composed, key: str, sites: CompositionSites, files: CompositionFiles
) -> CompositionResult:
    sparse, table, var = composed.sparse, composed.table, composed.var
    path, chosen = sparse.path, sparse.chosen
    alive = var > 0
    n_alive = max(int(alive.sum()), 1)
    named = dict(zip(source_keys(sites.sources), map(str, sites.sources), strict=True))

    def per_source(column: str) -> dict[str, float]:
        return {s: finite_mean(table[f"{column}_{k}"]) for k, s in named.items()}

    return CompositionResult(
        key=key,
        layer=sites.target.layer - 1,
        sources=[str(s) for s in sites.sources],
        source_keys=named,
        source_widths=list(composed.widths),
        target=str(sites.target),
        target_width=len(var),
        directory=str(files.path),
        tokens_train=composed.tokens_train,
        tokens_heldout=composed.tokens_heldout,
        alive=int(alive.sum()),
        dead=int((~alive).sum()),
        alpha=float(path.alphas[chosen]),
        alpha_index=int(chosen),
        n_alphas=len(path.alphas),
        path_converged=bool(path.converged.all()),
        r2_sparse=finite_mean(table["r2_sparse"]),
        r2_refit=finite_mean(table["r2_refit"]),
        r2_ls=finite_mean(table["r2_ls"]),
        r2_ls_train=finite_mean(table["r2_ls_train"]),
        variance_share_ls=per_source("share_ls"),
        variance_share_ls_heldout=per_source("share_ls_heldout"),
        variance_share_refit=per_source("share_refit"),
        weights_per_output=float(sparse.coef.nnz / n_alive),
        weights_per_output_by_source={
            s: float(table[f"weights_{k}"].sum() / n_alive) for k, s in named.items()
        },
        timings=composed.timings,
    )


def variance_shares(
    stats: GramStats, coef: Any, offsets: Sequence[int] | np.ndarray, outputs: Any = None
) -> np.ndarray:
    """(n_sources, len(outputs)) share of each output's variance that source s explains,
    cov(ŷ_s, y)/var(y) with ŷ_s = X_s w_s (source s's part of the prediction), over the
    stats' tokens, from the sums alone: cov(ŷ_s, y) = w_sᵀ(XᵀY/n − μ_x ȳ) on s's rows.

    For a least-squares fit with an intercept on these tokens the residual is orthogonal
    to ŷ, so var(ŷ) = cov(ŷ, y) and the shares add up to R² exactly (a share can be
    negative when a source's part runs against the rest). NaN where var(y) = 0.
    `coef`: n_in × len(outputs), dense or sparse; `offsets`: each source's first row, and
    n_in last."""
    cols = np.arange(stats.n_out) if outputs is None else np.asarray(outputs, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets[0] != 0 or offsets[-1] != stats.n_in or np.any(np.diff(offsets) <= 0):
        raise ValueError(f"offsets {offsets.tolist()} do not split {stats.n_in} inputs")
    n = max(stats.n, 1)
    mu, ybar = stats.means()
    out = np.zeros((len(offsets) - 1, len(cols)))
    if sp.issparse(coef):
        c = sp.coo_matrix(coef)
        xty = np.asarray(stats.xty.tocsr()[c.row, cols[c.col]]).ravel()
        part = c.data * (xty / n - mu[c.row] * ybar[cols[c.col]])
        source = np.searchsorted(offsets, c.row, side="right") - 1
        np.add.at(out, (source, c.col), part)
    else:
        part = np.asarray(coef, dtype=np.float64) * stats.cross(cols)
        out = np.add.reduceat(part, offsets[:-1], axis=0)
    var = stats.y_var()[cols]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(var > 0, out / np.where(var > 0, var, 1.0), np.nan)


@dataclass
class _Fit:
    r2_sparse: np.ndarray  # held-out, L1 weights at the chosen α
    r2_refit: np.ndarray  # held-out, least squares on the chosen support
    r2_refit_train: np.ndarray
    shares_refit: np.ndarray  # (n_sources, n_out), training tokens
    intercept: np.ndarray
    intercept_refit: np.ndarray


@dataclass
class _Ceiling:
    r2: np.ndarray  # held-out
    r2_train: np.ndarray
    shares: np.ndarray  # (n_sources, n_out), training tokens: they add up to r2_train
    shares_heldout: np.ndarray  # the same covariances on held-out tokens (no exact sum)


def _least_squares(
    stats: GramStats, stats_held: GramStats, offsets: np.ndarray, chunk: int | None
) -> _Ceiling:
    """Least squares on every input, without L1 (the ceiling of any linear composition),
    a chunk of outputs at a time: its map is dense n_in × outputs."""
    n_out = stats.n_out
    per_chunk = chunk or max(1, LINEAR_MAP_ENTRIES // max(stats.n_in, 1))
    var, var_held = stats.y_var(), stats_held.y_var()
    r2, r2_train = np.full(n_out, np.nan), np.full(n_out, np.nan)
    shares = np.full((len(offsets) - 1, n_out), np.nan)
    shares_held = shares.copy()
    for start in range(0, n_out, per_chunk):
        outputs = np.arange(start, min(start + per_chunk, n_out))
        w, b = linear_fit(stats, outputs=outputs)
        r2[outputs] = _r2(mse(stats_held, w, b, outputs), var_held[outputs])
        r2_train[outputs] = _r2(mse(stats, w, b, outputs), var[outputs])
        shares[:, outputs] = variance_shares(stats, w, offsets, outputs)
        shares_held[:, outputs] = variance_shares(stats_held, w, offsets, outputs)
    return _Ceiling(r2, r2_train, shares, shares_held)


def _r2(error: np.ndarray, var: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(var > 0, 1 - error / np.where(var > 0, var, 1.0), np.nan)


def _features_table(
    fit: _Fit,
    ceiling: _Ceiling,
    coef: sp.csc_matrix,
    offsets: np.ndarray,
    var: np.ndarray,
    var_held: np.ndarray,
    sources: Sequence[Site],
) -> pl.DataFrame:
    keys = source_keys(sources)
    rows = sp.coo_matrix(coef)
    source = np.searchsorted(offsets, rows.row, side="right") - 1
    counts = np.zeros((len(sources), coef.shape[1]), dtype=np.int64)
    np.add.at(counts, (source, rows.col), 1)
    columns: dict[str, Any] = {
        "feature": np.arange(coef.shape[1], dtype=np.int64),
        "status": np.where(var > 0, "alive", "dead"),
        "variance": var,
        "variance_heldout": var_held,
        "r2_sparse": fit.r2_sparse,
        "r2_refit": fit.r2_refit,
        "r2_ls": ceiling.r2,
        "r2_refit_train": fit.r2_refit_train,
        "r2_ls_train": ceiling.r2_train,
    }
    for i, k in enumerate(keys):
        columns[f"share_ls_{k}"] = ceiling.shares[i]
    for i, k in enumerate(keys):
        columns[f"share_ls_heldout_{k}"] = ceiling.shares_heldout[i]
    for i, k in enumerate(keys):
        columns[f"share_refit_{k}"] = fit.shares_refit[i]
    for i, k in enumerate(keys):
        columns[f"weights_{k}"] = counts[i]
    columns["n_weights"] = counts.sum(axis=0)
    columns["intercept"] = fit.intercept
    columns["intercept_refit"] = fit.intercept_refit
    return pl.DataFrame(columns)


def _weights_table(
    coef: sp.csc_matrix,
    refit: sp.csc_matrix,
    stats: GramStats,
    magnitude: float,
    sources: Sequence[Site],
    offsets: np.ndarray,
    target: Site,
) -> pl.DataFrame:
    """connect's weights table, its concatenated input split back into (site, feature)."""
    table = weights_table(coef, refit, stats, magnitude)
    inputs = table["input"].to_numpy()
    source = np.searchsorted(offsets, inputs, side="right") - 1
    names = np.array([str(s) for s in sources], dtype=object)
    return table.select(
        pl.lit(str(target)).alias("target_site"),
        pl.col("output").alias("out_feature"),
        pl.Series("source_site", names[source].tolist(), dtype=pl.String),
        pl.Series("in_feature", (inputs - offsets[source]).astype(np.int64)),
        "weight",
        "weight_refit",
        "standardised",
        "large",
    )
