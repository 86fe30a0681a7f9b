"""Exact linear connectors: the whole L1 path from one pass of Gram statistics.

One pass over the tokens accumulates XᵀX, XᵀY and Y's moments (`GramStats`); every linear
fit after that (the L1 path over α, the unpenalised least squares fit, train and held-out
MSE) uses these sums alone, so no token is read twice. Features rarely co-occur, so XᵀX
is kept sparse; with an intercept the centred Gram G = XᵀX/n − μμᵀ is never formed, only
used as "sparse minus rank one", so nothing n_in × n_in is ever dense.

Per output j the objective is (1/n)‖y_j − Xw − b‖²/var(y_j) + α‖w‖₁ (normalised MSE, the
fraction of variance unexplained, plus L1; var is the population variance). Times
var(y_j)/2 it is scikit-learn's Lasso objective (1/2n)‖y − Xw − b‖² + λ‖w‖₁ with
λ_j = α·var(y_j)/2, which the coordinate descent below minimises. Outputs of zero variance
are dead: w = 0, b = their mean, NaN normalised MSE.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from coact.store import CodeStore

Outputs = Sequence[int] | np.ndarray | None
_TINY = 1e-12  # relative threshold for "zero" variances


def _csr64(m: object) -> sp.csr_matrix:
    out = sp.csr_matrix(m, dtype=np.float64)
    out.sum_duplicates()  # canonical rows: CD updates index with them, duplicates would be lost
    return out


def _colsums(m: object) -> np.ndarray:
    return np.asarray(m.sum(axis=0), dtype=np.float64).ravel()  # type: ignore[attr-defined]


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
        """Accumulate one block of tokens in place, with sparse products only."""
        x, y = _csr64(xs), _csr64(ys)
        if x.shape[0] != y.shape[0] or (x.shape[1], y.shape[1]) != (self.n_in, self.n_out):
            raise ValueError(
                f"block shapes {x.shape}, {y.shape} do not fit {self.n_in, self.n_out}"
            )
        xt = x.T.tocsr()
        self.n += x.shape[0]
        self.x_sum = self.x_sum + _colsums(x)
        self.y_sum = self.y_sum + _colsums(y)
        self.y_sq_sum = self.y_sq_sum + _colsums(y.multiply(y))
        self.xtx = _csr64(self.xtx + xt @ x)
        self.xty = _csr64(self.xty + xt @ y)
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
    down to alpha_max·alpha_min_ratio, where alpha_max = max over the alive outputs being
    solved of 2·max_k|c_kj|/var_j (c = centred XᵀY/n): one global grid, its first α the
    smallest at which every one of them is all-zero. Pass `alphas` to share a grid between
    calls on different outputs (e.g. one process per output range)."""

    n_alphas: int = 20
    alpha_min_ratio: float = 1e-3
    alphas: tuple[float, ...] | None = None
    fit_intercept: bool = True
    max_iter: int = 500  # CD sweeps over the active set per α (summed over KKT rounds)
    tol: float = 1e-7  # on a coordinate's step, as a change in ŷ's std / std(y)
    chunk_outputs: int = 256
    screening: bool = True


@dataclass
class LassoPath:
    alphas: np.ndarray  # (n_alphas,), descending
    coef: list[sp.csr_matrix]  # per α: n_in × len(outputs)
    intercepts: np.ndarray  # (n_alphas, len(outputs))
    nmse: np.ndarray  # (n_alphas, len(outputs)) train normalised MSE; NaN for dead
    dead: np.ndarray  # (len(outputs),) zero-variance outputs
    n_iter: np.ndarray  # (n_alphas,) sweeps, max over chunks
    converged: np.ndarray  # (n_alphas,) every chunk met tol within max_iter
    outputs: np.ndarray  # which output columns of the stats these are


class _ChunkCD:
    """Coordinate descent for a chunk of outputs at once, warm-started along descending α.

    Python loops only over the active set A: there it keeps r = C − G W incrementally,
    one sparse column of G_AA per step (G = XᵀX/n − μμᵀ is used as sparse A plus the
    rank-one term through s = μᵀW, never formed). Which coordinates join A is decided by
    vectorised KKT checks on the full R = C − G W, recomputed by one sparse product per
    round (strong-rule candidates first, then all). Memory O(n_in × m) for m outputs."""

    def __init__(self, stats: GramStats, mu: np.ndarray, diag: np.ndarray, usable: np.ndarray,
                 c: np.ndarray, var: np.ndarray, config: LassoPathConfig) -> None:  # fmt: skip
        self.xtx, self.inv_n = stats.xtx, 1 / max(stats.n, 1)  # A = XᵀX/n, symmetric
        self.mu, self.diag, self.usable, self.c, self.cfg = mu, diag, usable, c, config
        self.sd_in = np.sqrt(np.where(usable, diag, 1.0))
        self.W = np.zeros_like(c)
        self.half_var, self.inv_sd = var / 2, 1 / np.sqrt(var)
        self.active = np.zeros(len(mu), dtype=bool)  # ever non-zero: cycled by CD
        self.prev_alpha: float | None = None
        self.converged = True
        self.R, self.step = c.copy(), np.empty_like(c)  # R = C − G W at the current W

    def corr(self) -> np.ndarray:
        """R = C − G W from scratch: A W as sparse × sparse (W is mostly zero), so a round
        costs O(Σ over non-zero w_kj of nnz(A_k)), not O(nnz(A_active) × m)."""
        idx = np.flatnonzero(self.active)
        w = self.W[idx]
        aw = (sp.csr_matrix(w.T) @ self.xtx[idx]).tocoo()  # n·(A W)ᵀ
        r = self.R  # reused buffer: fresh n_in × m arrays per round cost page faults
        np.multiply.outer(self.mu, self.mu[idx] @ w, out=r)
        r += self.c
        r[aw.col, aw.row] -= aw.data * self.inv_n  # canonical: no duplicate (row, col)
        return r

    def descend(self, idx: np.ndarray, lam: np.ndarray, budget: int) -> tuple[int, bool]:
        """Gauss–Seidel sweeps over idx until the largest step, as a change in std(ŷ)/std(y),
        is ≤ tol: (sweeps, whether it settled within budget)."""
        g = _csr64(self.xtx[idx][:, idx] * self.inv_n)
        indptr, indices, data = g.indptr, g.indices.astype(np.intp), g.data
        mu, diag, neg = self.mu[idx], self.diag[idx], -lam
        ginv, scale = 1 / diag, self.inv_sd * self.sd_in[idx, None]
        W = self.W[idx]
        s = mu @ W
        r = self.c[idx] - g @ W
        for sweep in range(1, budget + 1):
            before = W.copy()
            for k in range(len(idx)):
                w = W[k]
                z = r[k] + mu[k] * s + diag[k] * w
                d = (z - np.minimum(np.maximum(z, neg), lam)) * ginv[k] - w  # soft threshold
                if not d.any():
                    continue
                w += d
                lo, hi = indptr[k], indptr[k + 1]
                r[indices[lo:hi]] -= data[lo:hi, None] * d
                s += mu[k] * d
            if (np.abs(W - before) * scale).max(initial=0.0) <= self.cfg.tol:
                self.W[idx] = W
                return sweep, True
        self.W[idx] = W
        return budget, False

    def solve(self, alpha: float) -> int:
        """CD on the active set, then a KKT check: coordinates at zero whose first step
        would exceed tol join (strong-rule candidates first, as the likely ones; then any,
        since strong rules are not safe) and it goes on."""
        cfg, lam = self.cfg, alpha * self.half_var
        strong = self.usable
        if cfg.screening:  # sequential strong rule: keep k if |R_kj| ≥ λ_j(2α − α_prev)/α
            prev = alpha if self.prev_alpha is None else self.prev_alpha
            keep = np.abs(self.R) >= (2 * alpha - prev) * self.half_var
            strong = self.usable & np.any(keep, axis=1)
        self.prev_alpha, sweeps, settled = alpha, 0, True
        while True:
            if self.active.any():
                done, settled = self.descend(
                    np.flatnonzero(self.active), lam, cfg.max_iter - sweeps
                )
                sweeps += done
            step = np.abs(self.corr(), out=self.step)  # to a zero coordinate's step × sd_in
            step -= lam
            step *= self.inv_sd
            violators = self.usable & ~self.active & (step.max(axis=1) > cfg.tol * self.sd_in)
            if not violators.any() or not settled:
                self.converged = settled and not violators.any()
                return sweeps
            first = violators & strong
            self.active |= first if first.any() else violators


def _outputs(stats: GramStats, outputs: Outputs) -> np.ndarray:
    return np.arange(stats.n_out) if outputs is None else np.asarray(outputs, dtype=np.int64)


def lasso_path(
    stats: GramStats, config: LassoPathConfig = LassoPathConfig(), outputs: Outputs = None
) -> LassoPath:
    """The L1 path over a descending α grid for the chosen outputs, from the stats alone."""
    outputs, center = _outputs(stats, outputs), config.fit_intercept
    mu, diag = stats.gram(center)
    usable = diag > _TINY * max(float(diag.max(initial=0.0)), 1e-300)  # constant inputs: no use
    var, ybar = stats.y_var(), stats.means(center)[1]
    m2 = var if center else stats.y_sq_sum / max(stats.n, 1)  # MSE of ŷ = 0 (+ b)
    dead = var[outputs] <= 0
    alive = np.flatnonzero(~dead)
    chunks = [
        alive[i : i + config.chunk_outputs] for i in range(0, len(alive), config.chunk_outputs)
    ]
    xty = stats.xty.tocsc()

    def cross(pos: np.ndarray) -> np.ndarray:
        return _cross(xty, stats, outputs[pos], center)

    if config.alphas is not None:
        alphas = np.sort(np.asarray(config.alphas, dtype=np.float64))[::-1]
    else:
        tops = [
            2 * np.abs(cross(p)[usable]).max(axis=0, initial=0) / var[outputs[p]] for p in chunks
        ]
        alpha_max = float(np.concatenate([[0.0], *tops]).max()) * (1 + 1e-9) or 1.0
        alphas = np.geomspace(alpha_max, alpha_max * config.alpha_min_ratio, config.n_alphas)
    n_a, m = len(alphas), len(outputs)
    parts: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in alphas]
    intercepts = np.tile(ybar[outputs], (n_a, 1))
    n_iter, converged = np.zeros(n_a, dtype=np.int64), np.ones(n_a, dtype=bool)
    nmse = np.full((n_a, m), np.nan)
    for pos in chunks:
        cd = _ChunkCD(stats, mu, diag, usable, cross(pos), var[outputs[pos]], config)
        for i, alpha in enumerate(alphas):
            n_iter[i] = max(n_iter[i], cd.solve(float(alpha)))
            converged[i] &= cd.converged
            act = np.flatnonzero(cd.active)  # W is zero elsewhere
            w = cd.W[act]
            rows, cols = np.nonzero(w)
            parts[i].append((act[rows], pos[cols], w[rows, cols]))
            intercepts[i, pos] -= mu[act] @ w
            # MSE = m2 − 2wᵀc + wᵀGw = m2 − wᵀ(c + R), as R = c − Gw: exact, from the stats
            fit = (w * (cd.c[act] + cd.R[act])).sum(axis=0)
            nmse[i, pos] = (m2[outputs[pos]] - fit) / var[outputs[pos]]
    coef = []
    for i in range(n_a):
        rows, cols, vals = (
            np.concatenate([np.zeros(0), *(p[t] for p in parts[i])]) for t in range(3)
        )
        coef.append(
            sp.csr_matrix(
                (vals, (rows.astype(np.int64), cols.astype(np.int64))), shape=(stats.n_in, m)
            )
        )
    return LassoPath(alphas, coef, intercepts, nmse, dead, n_iter, converged, outputs)


def mse(
    stats: GramStats, coef: object, intercept: np.ndarray, outputs: Outputs = None
) -> np.ndarray:
    """Raw per-output MSE of ŷ = Xw + b over the stats' tokens, from the sums alone:
    (Σy² − 2wᵀXᵀy − 2bΣy + wᵀXᵀXw + 2b·wᵀΣx + n b²)/n. coef: n_in × len(outputs)."""
    outputs = _outputs(stats, outputs)
    w = sp.csc_matrix(coef) if sp.issparse(coef) else np.asarray(coef, dtype=np.float64)
    b = np.asarray(intercept, dtype=np.float64)
    xtxw = stats.xtx @ w
    wxxw = _colsums(xtxw.multiply(w)) if sp.issparse(xtxw) else (xtxw * w).sum(axis=0)
    wxy = _colsums(stats.xty.tocsc()[:, outputs].multiply(w))
    total = stats.y_sq_sum[outputs] - 2 * wxy - 2 * b * stats.y_sum[outputs] + wxxw
    total = total + 2 * b * np.asarray(w.T @ stats.x_sum).ravel() + stats.n * b**2
    return np.maximum(total, 0.0) / max(stats.n, 1)


def heldout_nmse(path: LassoPath, stats_heldout: GramStats) -> np.ndarray:
    """(n_alphas, len(outputs)) MSE on held-out tokens divided by the held-out variance
    (i.e. 1 − held-out R²), from held-out stats alone; NaN where that variance is zero."""
    var = stats_heldout.y_var()[path.outputs]
    raw = np.array(
        [
            mse(stats_heldout, c, b, path.outputs)
            for c, b in zip(path.coef, path.intercepts, strict=True)
        ]
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(var > 0, raw / var, np.nan)


def linear_fit(
    stats: GramStats,
    l2: float = 0.0,
    outputs: Outputs = None,
    fit_intercept: bool = True,
    tol: float = 1e-10,
    max_iter: int = 2000,
) -> tuple[np.ndarray, np.ndarray]:
    """Least squares W (n_in × len(outputs), dense) and b: (G + l2·I) w = c per output, by
    Jacobi-preconditioned conjugate gradients on the sparse Gram for all outputs at once.
    A ridge of 1e-12·max diag G keeps singular G (co-linear features) solvable; inputs of
    zero variance get w = 0. Memory O(n_in × len(outputs)): pass chunks for wide sites."""
    outputs = _outputs(stats, outputs)
    mu, diag = stats.gram(fit_intercept)
    u = np.flatnonzero(diag > _TINY * max(float(diag.max(initial=0.0)), 1e-300))
    au = stats.xtx if len(u) == stats.n_in else _csr64(stats.xtx[u][:, u])  # n·A_uu
    mu_u, inv_n = mu[u], 1 / max(stats.n, 1)
    ridge = l2 + _TINY * float(diag.max(initial=0.0))
    rhs = stats.cross(outputs, fit_intercept)[u]
    rhs[:, stats.y_var()[outputs] <= 0] = 0.0
    matvec = lambda p: inv_n * (au @ p) - np.outer(mu_u, mu_u @ p) + ridge * p  # noqa: E731
    w = np.zeros((stats.n_in, len(outputs)))
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
