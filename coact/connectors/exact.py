"""Exact linear connectors: the whole L1 path from one pass of Gram statistics.

One pass over the tokens accumulates XᵀX, XᵀY and Y's moments (`GramStats`); every linear
fit after that (the L1 path over α, the unpenalised least squares fit, train and held-out
MSE) uses these sums alone, so no token is read twice; the held-out error of every α
comes from the held-out tokens' sums the same way. Features rarely co-occur, so XᵀX is
stored sparse; with an intercept the centred Gram G = XᵀX/n − μμᵀ is never formed, only
used as "sparse minus rank one". Up to DENSE_GRAM_MAX inputs the Gram pass, the path and
the held-out errors work on a dense copy of XᵀX (≤ 128 MiB, several times faster than
sparse rows); above it nothing n_in × n_in is ever dense.

Per output j the objective is (1/n)‖y_j − Xw − b‖²/var(y_j) + α‖w‖₁ (normalised MSE, the
fraction of variance unexplained, plus L1; var is the population variance). Times
var(y_j)/2 it is scikit-learn's Lasso objective (1/2n)‖y − Xw − b‖² + λ‖w‖₁ with
λ_j = α·var(y_j)/2, which the coordinate descent below minimises. Outputs of zero variance
are dead: w = 0, b = their mean, NaN normalised MSE.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from coact.codes.store import CodeStore
from coact.connectors._cd import solve_alpha
from coact.connectors._csr import (
    cross_dense,
    cross_products,
    dense_to_csr,
    quadratic_terms,
    symmetrise,
    transpose,
)
from coact.progress import tqdm
from coact.settings import check_ranges, setting

Outputs = Sequence[int] | np.ndarray | None
_TINY = 1e-12  # relative threshold for "zero" variances
PATH_CHUNK_ENTRIES = 2**23  # outputs × inputs per chunk of the path: ~200 MiB of state
DENSE_GRAM_MAX = 4096  # up to this many inputs the path keeps XᵀX/n dense too (≤ 128 MiB)
DENSE_QUADRATIC_MAX = 8192  # `mse` of a dense map forms XᵀX dense up to here (≤ 512 MiB),
# as `linear_fit` does to factorise it


def _csr64(m: object) -> sp.csr_matrix:
    out = sp.csr_matrix(m, dtype=np.float64)
    out.sum_duplicates()  # canonical rows: CD updates index with them, duplicates would be lost
    return out


def _csr_codes(m: object) -> sp.csr_matrix:
    """CSR in canonical form (sorted, no duplicates), float32 kept as it is."""
    out = sp.csr_matrix(m)
    if out.dtype not in (np.float32, np.float64):
        out = out.astype(np.float64)
    if not out.has_canonical_format:
        out = out.copy()
        out.sum_duplicates()
    return out


def _cross_products(xt: tuple[np.ndarray, ...], b: sp.csr_matrix, upper: bool) -> sp.csr_matrix:
    """Xᵀ B from the parts of Xᵀ (`transpose`); with `upper`, B = X and only the upper
    triangle is summed. Dense accumulation where the result fits (≤ DENSE_GRAM_MAX²
    entries: no symbolic pass), sparse otherwise."""
    shape = (len(xt[0]) - 1, b.shape[1])
    args = (*xt, b.indptr, b.indices, b.data, b.shape[1], upper)
    if shape[0] * shape[1] <= DENSE_GRAM_MAX**2:
        return _csr_from_parts(dense_to_csr(cross_dense(*args)), shape)
    parts = cross_products(*args)
    return _csr_from_parts(symmetrise(*parts) if upper else parts, shape)


def _csr_from_parts(parts: tuple[np.ndarray, ...], shape: tuple[int, int]) -> sp.csr_matrix:
    indptr, indices, data = parts
    out = sp.csr_matrix((data, indices, indptr), shape=shape)
    out.has_canonical_format = True  # sorted and unique by construction
    return out


def _colsums(m: object, square: bool = False) -> np.ndarray:
    """Column sums (of squares) in float64 whatever the input's dtype."""
    if sp.issparse(m):
        c = sp.csr_matrix(m)
        v = c.data.astype(np.float64)
        return np.bincount(c.indices, weights=v * v if square else v, minlength=c.shape[1])
    a = np.asarray(m, dtype=np.float64)
    return (a * a if square else a).sum(axis=0)


@dataclass
class GramStats:
    """Sums over tokens of x, y, y², xxᵀ and xyᵀ: all a linear least squares fit needs."""

    n: int
    x_sum: np.ndarray  # (n_in,)
    y_sum: np.ndarray  # (n_out,)
    y_sq_sum: np.ndarray  # (n_out,)
    xtx: sp.csr_matrix  # (n_in, n_in), sparse: features rarely co-occur
    xty: sp.csr_matrix  # (n_in, n_out)

    @classmethod
    def empty(cls, n_in: int, n_out: int) -> GramStats:
        z = np.zeros
        xtx, xty = sp.csr_matrix((n_in, n_in)), sp.csr_matrix((n_in, n_out))
        return cls(0, z(n_in), z(n_out), z(n_out), xtx, xty)

    @classmethod
    def from_store(
        cls, store: CodeStore, in_slug: str, out_slug: str, shards: Iterable[int] | None = None
    ) -> GramStats:
        """One pass over the store, shard by shard (one shard's codes in memory at a time)."""
        wanted = None if shards is None else list(shards)
        stats = cls.empty(store.sites[in_slug], store.sites[out_slug])
        pairs = zip(
            store.iter_site(in_slug, wanted), store.iter_site(out_slug, wanted), strict=True
        )
        for (i, x), (j, y) in pairs:
            if i != j:
                raise ValueError(f"sites {in_slug} and {out_slug} disagree on shards ({i} vs {j})")
            stats.add(x, y)
        return stats

    @property
    def n_in(self) -> int:
        return len(self.x_sum)

    @property
    def n_out(self) -> int:
        return len(self.y_sum)

    def add(self, xs: object, ys: object) -> GramStats:
        """Accumulate one block of tokens in place: XᵀX and XᵀY in one compiled pass over
        the block's rows of Xᵀ (sparse products, parallel over inputs; float32 codes are
        read as they are and summed in float64)."""
        x, y = _csr_codes(xs), _csr_codes(ys)
        if x.shape[0] != y.shape[0] or (x.shape[1], y.shape[1]) != (self.n_in, self.n_out):
            raise ValueError(
                f"block shapes {x.shape}, {y.shape} do not fit {self.n_in, self.n_out}"
            )
        xt = transpose(x.indptr, x.indices, x.data, self.n_in)
        xtx, xty = _cross_products(xt, x, upper=True), _cross_products(xt, y, upper=False)
        self.n += x.shape[0]
        self.x_sum = self.x_sum + _colsums(x)
        self.y_sum = self.y_sum + _colsums(y)
        self.y_sq_sum = self.y_sq_sum + _colsums(y, square=True)
        self.xtx = xtx if self.xtx.nnz == 0 else _csr64(self.xtx + xtx)
        self.xty = xty if self.xty.nnz == 0 else _csr64(self.xty + xty)
        return self

    def merge(self, other: GramStats) -> GramStats:
        """The stats of both token sets (a new object; e.g. shards summed in parallel)."""
        return GramStats(
            self.n + other.n,
            self.x_sum + other.x_sum,
            self.y_sum + other.y_sum,
            self.y_sq_sum + other.y_sq_sum,
            _csr64(self.xtx + other.xtx),
            _csr64(self.xty + other.xty),
        )

    def y_var(self) -> np.ndarray:
        n = max(self.n, 1)
        var = np.maximum(self.y_sq_sum / n - (self.y_sum / n) ** 2, 0.0)
        return np.where(var > _TINY * self.y_sq_sum / n, var, 0.0)  # rounding noise of constants

    def means(self, center: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(μ_x, ȳ), or zeros without an intercept, so one code path serves both (b = ȳ − μᵀw)."""
        n = max(self.n, 1) if center else np.inf
        return self.x_sum / n, self.y_sum / n

    def gram(self, center: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(μ, diag G) of the (centred) Gram G = A − μμᵀ with A = XᵀX/n; the solvers use
        `xtx` scaled on the fly rather than a scaled copy, which could be gigabytes."""
        mu = self.means(center)[0]
        return mu, self.xtx.diagonal() / max(self.n, 1) - mu**2

    def gram_matvec(self, v: np.ndarray, center: bool = True) -> np.ndarray:
        """G v for a vector or n_in × m block, as XᵀX v/n − μ(μᵀv): G is never formed."""
        mu = self.means(center)[0]
        return self.xtx @ v / max(self.n, 1) - np.multiply.outer(mu, mu @ v)

    def cross(self, outputs: Outputs = None, center: bool = True) -> np.ndarray:
        """Dense (centred) XᵀY/n − μȳᵀ for some outputs: n_in × len(outputs)."""
        cols = np.arange(self.n_out) if outputs is None else np.asarray(outputs)
        return _cross(self.xty.tocsc(), self, cols, center)


def _cross(xty_csc: sp.csc_matrix, stats: GramStats, cols: np.ndarray, center: bool) -> np.ndarray:
    mu, ybar = stats.means(center)
    return xty_csc[:, cols].toarray() / max(stats.n, 1) - np.outer(mu, ybar[cols])


@dataclass(frozen=True)
class LassoPathConfig:
    """The α grid and the solver. Without `alphas`, the grid is log-spaced from alpha_max
    down to alpha_max·alpha_min_ratio. Output j is all-zero for α ≥ 2·max_k|c_kj|/var_j
    (c = centred XᵀY/n); alpha_max is the `top_quantile` of that over the alive outputs
    solved, so the first α already gives a few outputs a weight (with quantile 1, none):
    the maximum is set by a handful of extreme outputs and would waste grid points. Pass
    `alphas` to share a grid between calls on different outputs (e.g. one process per
    output range)."""

    n_alphas: int = setting(20, "points on the α grid", low=1)
    alpha_min_ratio: float = 1e-2
    top_quantile: float = 0.99  # of the outputs' own all-zero α: the grid's first α
    alphas: tuple[float, ...] | None = None
    fit_intercept: bool = True
    max_iter: int = 300  # CD sweeps over the active set per α and output
    tol: float = 1e-6  # on the duality gap of NMSE + α‖w‖₁ (a certificate, per output)
    chunk_outputs: int | None = None  # outputs solved together; None: PATH_CHUNK_ENTRIES
    screening: bool = True

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass
class LassoPath:
    alphas: np.ndarray  # (n_alphas,), descending
    coef: list[sp.csr_matrix]  # per α: n_in × len(outputs)
    intercepts: np.ndarray  # (n_alphas, len(outputs))
    nmse: np.ndarray  # (n_alphas, len(outputs)) train normalised MSE; NaN for dead
    dead: np.ndarray  # (len(outputs),) zero-variance outputs
    n_iter: np.ndarray  # (n_alphas,) sweeps, max over chunks
    converged: np.ndarray  # (n_alphas,) every output's duality gap ≤ tol within max_iter
    outputs: np.ndarray  # which output columns of the stats these are
    max_gap: np.ndarray  # (n_alphas,) the largest duality gap over outputs (normalised)
    unconverged: np.ndarray  # (n_alphas,) outputs whose gap stayed above tol
    seconds: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (n_alphas,) solver
    # wall time per α, summed over chunks (timing only: not part of the result)


_AParts = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # XᵀX CSR parts, dense A


class _ChunkCD:
    """Coordinate descent for a chunk of outputs, warm-started along descending α; the
    loops run compiled, one output per thread (see `_cd`). Arrays are output-major
    (m × n_in) so each thread walks contiguous memory. Memory O(n_in × m)."""

    def __init__(self, a_parts: _AParts, n: int, mu: np.ndarray,
                 usable: np.ndarray, sd_in: np.ndarray, c: np.ndarray, var: np.ndarray,
                 m2: np.ndarray, config: LassoPathConfig) -> None:  # fmt: skip
        self.a_parts, self.inv_n = a_parts, 1 / max(n, 1)
        self.mu, self.usable, self.sd_in, self.cfg = mu, usable, sd_in, config
        self.c = np.ascontiguousarray(c)  # m × n_in
        m = self.c.shape[0]
        self.W = np.zeros_like(self.c)
        self.Rt = self.c.copy()  # c − A w at w = 0
        self.active = np.zeros(self.c.shape, dtype=bool)
        self.half_var, self.inv_sd = var / 2, 1 / np.sqrt(var)
        self.prev_lam: np.ndarray | None = None
        self.m2 = m2
        self.sweeps, self.gap = np.zeros(m, dtype=np.int64), np.zeros(m)
        self.mse, self.S = m2.copy(), np.zeros(m)  # training MSE; μᵀw (the intercept's shift)

    @property
    def converged(self) -> bool:
        return bool((self.gap <= self.cfg.tol).all())

    def solve(self, alpha: float) -> int:
        lam = alpha * self.half_var
        prev = lam if self.prev_lam is None else self.prev_lam
        solve_alpha(
            *self.a_parts, self.inv_n, self.mu, self.usable, self.sd_in,
            self.c, self.m2, self.W, self.Rt, self.active, lam, prev, self.inv_sd,
            self.cfg.tol, self.cfg.max_iter, self.cfg.screening, self.sweeps, self.gap,
            self.mse, self.S,
        )  # fmt: skip
        self.prev_lam = lam
        return int(self.sweeps.max(initial=0))


def _outputs(stats: GramStats, outputs: Outputs) -> np.ndarray:
    return np.arange(stats.n_out) if outputs is None else np.asarray(outputs, dtype=np.int64)


def lasso_path(
    stats: GramStats,
    config: LassoPathConfig = LassoPathConfig(),
    outputs: Outputs = None,
    progress: bool = False,
) -> LassoPath:
    """The L1 path over a descending α grid for the chosen outputs, from the stats alone."""
    outputs, center = _outputs(stats, outputs), config.fit_intercept
    mu, diag = stats.gram(center)
    usable = diag > _TINY * max(float(diag.max(initial=0.0)), 1e-300)  # constant inputs: no use
    var, ybar = stats.y_var(), stats.means(center)[1]
    m2 = var if center else stats.y_sq_sum / max(stats.n, 1)  # MSE of ŷ = 0 (+ b)
    dead = var[outputs] <= 0
    alive = np.flatnonzero(~dead)
    per_chunk = config.chunk_outputs or max(1, PATH_CHUNK_ENTRIES // max(stats.n_in, 1))
    chunks = [alive[i : i + per_chunk] for i in range(0, len(alive), per_chunk)]
    cross = _ChunkCross(stats, outputs, chunks, mu, center)
    alphas = _alpha_grid(config, cross, usable, var, outputs)
    tally = _PathTally.start(alphas, ybar[outputs], config.tol)
    a = stats.xtx  # XᵀX = n·A, symmetric: its CSR rows are its columns
    dense_a = a.toarray() / max(stats.n, 1) if stats.n_in <= DENSE_GRAM_MAX else np.zeros((0, 0))
    a_parts = (a.indptr.astype(np.int64), a.indices.astype(np.int64), a.data, dense_a)
    sd_in = np.sqrt(np.where(usable, diag, 1.0))
    bar = tqdm(
        total=len(chunks) * len(alphas), desc="L1 path", unit="α·chunk", disable=not progress
    )
    for i_chunk, pos in enumerate(chunks):
        v, out_m2 = var[outputs[pos]], m2[outputs[pos]]
        cd = _ChunkCD(a_parts, stats.n, mu, usable, sd_in, cross(i_chunk), v, out_m2, config)
        cross.clear()
        tally.run_chunk(cd, pos, v, bar)
    bar.close()
    return tally.path(stats.n_in, dead, outputs)


class _ChunkCross:
    """Each chunk's (centred) cross c = XᵀY/n − μȳ, output-major (m × n_in), built from
    the stats when asked for. With a single chunk the one built for the α grid is kept for
    the solve rather than built twice; with several, keeping them all would hold every
    output's dense cross at once."""

    def __init__(self, stats: GramStats, outputs: np.ndarray, chunks: list[np.ndarray],
                 mu: np.ndarray, center: bool) -> None:  # fmt: skip
        self.stats, self.outputs, self.chunks, self.mu = stats, outputs, chunks, mu
        self.yx = stats.xty.T.tocsr()  # output-major: a chunk's rows are contiguous
        self.mu_y = stats.means(center)[1]
        self.kept: dict[int, np.ndarray] = {}

    def __call__(self, i: int) -> np.ndarray:
        """Chunk i's (centred) cross, output-major (m × n_in); kept if it is the only one."""
        if i in self.kept:
            return self.kept[i]
        rows = self.outputs[self.chunks[i]]
        c = self.yx[rows].toarray() / max(self.stats.n, 1) - np.multiply.outer(
            self.mu_y[rows], self.mu
        )
        if len(self.chunks) == 1:
            self.kept[i] = c
        return c

    def clear(self) -> None:
        """Drop the kept cross once the solver has its own copy."""
        self.kept.clear()


def _alpha_grid(config: LassoPathConfig, cross: _ChunkCross, usable: np.ndarray,
                var: np.ndarray, outputs: np.ndarray) -> np.ndarray:  # fmt: skip
    """The descending α grid: config.alphas if given (shared between calls), else log
    spaced down from the top_quantile of the alive outputs' all-zero α (2·max_k|c_kj|/var_j),
    nudged up so that at the first α those outputs are exactly zero."""
    if config.alphas is not None:
        return np.sort(np.asarray(config.alphas, dtype=np.float64))[::-1]
    tops = [
        2 * np.abs(cross(i)[:, usable]).max(axis=1, initial=0) / var[outputs[p]]
        for i, p in enumerate(cross.chunks)
    ]
    tops_all = np.concatenate([np.zeros(0), *tops])
    alpha_max = float(np.quantile(tops_all, config.top_quantile)) if len(tops_all) else 0.0
    alpha_max = alpha_max * (1 + 1e-9) or 1.0
    return np.geomspace(alpha_max, alpha_max * config.alpha_min_ratio, config.n_alphas)


@dataclass
class _PathTally:
    """The path's results gathered chunk by chunk: each α's weights as COO parts (stacked
    once at the end, not per chunk), intercepts and NMSE by output position, and over
    chunks the most sweeps, the largest gap and the count of unconverged outputs."""

    alphas: np.ndarray
    tol: float
    parts: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]]
    intercepts: np.ndarray
    n_iter: np.ndarray
    converged: np.ndarray
    max_gap: np.ndarray
    unconverged: np.ndarray
    nmse: np.ndarray
    seconds: np.ndarray

    @classmethod
    def start(cls, alphas: np.ndarray, ybar: np.ndarray, tol: float) -> _PathTally:
        """Empty results for len(ybar) outputs: intercepts start at ȳ (w = 0), NMSE at NaN
        (dead outputs keep it)."""
        n_a, m = len(alphas), len(ybar)
        return cls(
            alphas, tol, [[] for _ in alphas], np.tile(ybar, (n_a, 1)),
            np.zeros(n_a, dtype=np.int64), np.ones(n_a, dtype=bool), np.zeros(n_a),
            np.zeros(n_a, dtype=np.int64), np.full((n_a, m), np.nan), np.zeros(n_a),
        )  # fmt: skip

    def run_chunk(self, cd: _ChunkCD, pos: np.ndarray, v: np.ndarray, bar: tqdm) -> None:
        """Solve one chunk (outputs at positions `pos`, variances v) down the whole grid,
        warm-started α to α, recording each α's results as it goes."""
        for i, alpha in enumerate(self.alphas):
            start = time.perf_counter()
            self.n_iter[i] = max(self.n_iter[i], cd.solve(float(alpha)))
            self.seconds[i] += time.perf_counter() - start
            self.converged[i] &= cd.converged
            self.max_gap[i] = max(self.max_gap[i], float(cd.gap.max(initial=0.0)))
            self.unconverged[i] += int((cd.gap > self.tol).sum())
            indptr, rows, vals = dense_to_csr(cd.W)  # CSR of W = CSC of Wᵀ
            self.parts[i].append((rows, np.repeat(pos, np.diff(indptr)), vals))
            self.intercepts[i, pos] -= cd.S
            # MSE = m2 − 2wᵀc + wᵀGw, exact from the stats (the solver's last full gradient)
            self.nmse[i, pos] = cd.mse / v
            bar.update()

    def path(self, n_in: int, dead: np.ndarray, outputs: np.ndarray) -> LassoPath:
        """The finished path: each α's chunk parts stacked into one n_in × m matrix."""
        m = len(outputs)
        coef = []
        for i in range(len(self.alphas)):
            rows, cols, vals = (
                np.concatenate([np.zeros(0), *(p[t] for p in self.parts[i])]) for t in range(3)
            )
            coef.append(
                sp.csr_matrix(
                    (vals, (rows.astype(np.int64), cols.astype(np.int64))), shape=(n_in, m)
                )
            )
        return LassoPath(
            self.alphas, coef, self.intercepts, self.nmse, dead, self.n_iter, self.converged,
            outputs, self.max_gap, self.unconverged, self.seconds,
        )  # fmt: skip


def mse(
    stats: GramStats, coef: object, intercept: np.ndarray, outputs: Outputs = None
) -> np.ndarray:
    """Raw per-output MSE of ŷ = Xw + b over the stats' tokens, from the sums alone:
    (Σy² − 2wᵀXᵀy − 2bΣy + wᵀXᵀXw + 2b·wᵀΣx + n b²)/n. coef: n_in × len(outputs)."""
    outputs = _outputs(stats, outputs)
    w = sp.csc_matrix(coef) if sp.issparse(coef) else np.asarray(coef, dtype=np.float64)
    b = np.asarray(intercept, dtype=np.float64)
    if isinstance(w, np.ndarray) and stats.n_in <= DENSE_QUADRATIC_MAX:
        # a dense map (least squares): BLAS on the dense Gram, where scipy's sparse × dense
        # product is single-threaded and its broadcast multiply slow
        wxxw = ((stats.xtx.toarray() @ w) * w).sum(axis=0)
        wxy = (stats.xty[:, outputs].toarray() * w).sum(axis=0)
    else:
        xtxw = stats.xtx @ w
        wxxw = _colsums(xtxw.multiply(w)) if sp.issparse(xtxw) else (xtxw * w).sum(axis=0)
        wxy = _colsums(stats.xty.tocsc()[:, outputs].multiply(w))
    total = stats.y_sq_sum[outputs] - 2 * wxy - 2 * b * stats.y_sum[outputs] + wxxw
    total = total + 2 * b * np.asarray(w.T @ stats.x_sum).ravel() + stats.n * b**2
    return np.maximum(total, 0.0) / max(stats.n, 1)


def heldout_nmse(path: LassoPath, stats_heldout: GramStats) -> np.ndarray:
    """(n_alphas, len(outputs)) MSE on held-out tokens divided by the held-out variance
    (i.e. 1 − held-out R²), from held-out stats alone; NaN where that variance is zero.
    One compiled pass over every α's weights: per output the quadratic wᵀ(XᵀX)w over its
    non-zeros, as in `mse`."""
    h, outputs = stats_heldout, path.outputs
    var = h.y_var()[outputs]
    m, n_a = len(outputs), len(path.alphas)
    coef = sp.hstack([sp.csc_matrix(c) for c in path.coef], format="csc") if n_a else None
    if coef is None or m == 0:
        return np.full((n_a, m), np.nan)
    coef.sum_duplicates()
    a, xty = h.xtx, h.xty.tocsc()[:, outputs]
    xty.sum_duplicates()
    dense_a = a.toarray() if h.n_in <= DENSE_GRAM_MAX else np.zeros((0, 0))
    quad, cross, wsum = (
        t.reshape(n_a, m)
        for t in quadratic_terms(
            coef.indptr.astype(np.int64), coef.indices.astype(np.int64), coef.data,
            np.tile(np.arange(m, dtype=np.int64), n_a), a.indptr.astype(np.int64),
            a.indices.astype(np.int64), a.data, dense_a, xty.indptr.astype(np.int64),
            xty.indices.astype(np.int64), xty.data, h.x_sum,
        )
    )  # fmt: skip
    b = path.intercepts
    total = h.y_sq_sum[outputs] - 2 * cross - 2 * b * h.y_sum[outputs] + quad
    raw = np.maximum(total + 2 * b * wsum + h.n * b**2, 0.0) / max(h.n, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(var > 0, raw / var, np.nan)


def linear_fit(
    stats: GramStats,
    l2: float = 0.0,
    outputs: Outputs = None,
    fit_intercept: bool = True,
    tol: float = 1e-10,
    max_iter: int = 2000,
    dense_limit: int = 8192,
) -> tuple[np.ndarray, np.ndarray]:
    """Least squares W (n_in × len(outputs), dense) and b: (G + l2·I) w = c per output.
    Up to `dense_limit` usable inputs G is formed and factorised once (Cholesky: seconds at
    a few thousand features, where G is about half dense anyway); above it, Jacobi-
    preconditioned conjugate gradients on the sparse Gram, all outputs at once. A ridge of
    1e-12·max diag G keeps singular G (co-linear features) solvable; inputs of zero variance
    get w = 0. Memory O(n_in × len(outputs)): pass chunks for wide sites."""
    outputs = _outputs(stats, outputs)
    mu, diag = stats.gram(fit_intercept)
    u = np.flatnonzero(diag > _TINY * max(float(diag.max(initial=0.0)), 1e-300))
    au = stats.xtx if len(u) == stats.n_in else _csr64(stats.xtx[u][:, u])  # n·A_uu
    mu_u, inv_n = mu[u], 1 / max(stats.n, 1)
    ridge = l2 + _TINY * float(diag.max(initial=0.0))
    rhs = stats.cross(outputs, fit_intercept)[u]
    rhs[:, stats.y_var()[outputs] <= 0] = 0.0
    w = np.zeros((stats.n_in, len(outputs)))
    if len(u) <= dense_limit:
        g = au.toarray() * inv_n - np.outer(mu_u, mu_u)
        g[np.diag_indices_from(g)] += ridge
        w[u] = scipy.linalg.solve(g, rhs, assume_a="pos", check_finite=False)
    else:
        matvec = lambda p: inv_n * (au @ p) - np.outer(mu_u, mu_u @ p) + ridge * p  # noqa: E731
        w[u] = _pcg(matvec, rhs, 1 / (diag[u] + ridge), tol, max_iter)
    return w, stats.means(fit_intercept)[1][outputs] - mu @ w


def _pcg(matvec: Callable[[np.ndarray], np.ndarray], rhs: np.ndarray, pinv: np.ndarray,
         tol: float, max_iter: int) -> np.ndarray:  # fmt: skip
    """Independent preconditioned CG per column of rhs, vectorised across the columns."""
    x, r = np.zeros_like(rhs), rhs.copy()
    z = pinv[:, None] * r
    p, rz = z.copy(), (r * z).sum(axis=0)
    goal = tol * np.linalg.norm(rhs, axis=0)
    for _ in range(max_iter):
        if np.all(np.linalg.norm(r, axis=0) <= goal):
            return x
        ap = matvec(p)
        pap = (p * ap).sum(axis=0)
        step = np.divide(rz, pap, out=np.zeros_like(rz), where=pap > 0)
        x += step * p
        r -= step * ap
        z = pinv[:, None] * r
        rz_new = (r * z).sum(axis=0)
        p = z + np.divide(rz_new, rz, out=np.zeros_like(rz), where=rz > 0) * p
        rz = rz_new
    if not np.all(np.linalg.norm(r, axis=0) <= goal):
        warnings.warn(f"linear_fit: CG not converged to {tol} in {max_iter} steps", stacklevel=3)
    return x


def refit_support(
    stats: GramStats, coef: sp.spmatrix, outputs: Outputs = None, fit_intercept: bool = True
) -> tuple[sp.csc_matrix, np.ndarray]:
    """Least squares on each output's L1-selected inputs ("relaxed lasso"): the L1 path
    picks which inputs, this undoes its shrinkage of how much, so formulas read the true
    coefficients. Returns the refitted weights (same sparsity) and intercepts."""
    outputs = _outputs(stats, outputs)
    coef = sp.csc_matrix(coef, dtype=np.float64)
    mu, _ = stats.gram(fit_intercept)
    ybar = stats.means(fit_intercept)[1][outputs]
    xtx, inv_n = stats.xtx.tocsr(), 1 / max(stats.n, 1)
    data = np.zeros(coef.nnz)
    for j in range(coef.shape[1]):
        lo, hi = coef.indptr[j], coef.indptr[j + 1]
        support = coef.indices[lo:hi]
        if hi == lo:
            continue
        g = xtx[support][:, support].toarray() * inv_n - np.outer(mu[support], mu[support])
        c = stats.xty[support][:, [outputs[j]]].toarray().ravel() * inv_n - mu[support] * ybar[j]
        g[np.diag_indices_from(g)] += _TINY * max(float(np.abs(g).max()), 1e-300)
        data[lo:hi] = scipy.linalg.solve(g, c, assume_a="sym", check_finite=False)
    refit = sp.csc_matrix((data, coef.indices, coef.indptr), shape=coef.shape)
    return refit, ybar - np.asarray(refit.T @ mu).ravel()
