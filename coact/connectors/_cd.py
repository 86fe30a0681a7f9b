"""Compiled coordinate descent for the L1 path (numba): one output per thread.

Per output j, sweeps run on the active set with its dense centred Gram G_AA (G = A − μμᵀ,
A = XᵀX/n sparse): O(|A|) per step. The full gradient r = c − G w over every input is
rebuilt from the sparse columns of the active inputs only to check the duality gap and the
KKT conditions, so inactive inputs cost nothing until they violate them. Pure Python
over these loops is ~100× slower.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True, inline="always")
def _soft(z: float, lam: float, diag: float) -> float:
    if z > lam:
        return (z - lam) / diag
    if z < -lam:
        return (z + lam) / diag
    return 0.0


@njit(parallel=True, cache=True)
def solve_alpha(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    inv_n: float,
    mu: np.ndarray,
    usable: np.ndarray,
    sd_in: np.ndarray,
    C: np.ndarray,  # (m, n_in) the (centred) cross c = XᵀY/n − μȳ
    m2: np.ndarray,  # (m,) MSE of the constant fit (variance, or mean square without intercept)
    W: np.ndarray,  # (m, n_in) coefficients, warm start, updated in place
    Rt: np.ndarray,  # (m, n_in) c − A w, kept in step with W
    active: np.ndarray,  # (m, n_in) bool: cycled by CD
    lam: np.ndarray,  # (m,) λ_j = α var_j / 2
    lam_prev: np.ndarray,  # (m,) λ at the previous α (= lam at the first)
    inv_sd: np.ndarray,  # (m,) 1 / std(y_j)
    tol: float,  # on the duality gap of the normalised objective (NMSE + α‖w‖₁)
    max_iter: int,
    screening: bool,
    sweeps_out: np.ndarray,  # (m,) int64
    gap_out: np.ndarray,  # (m,) final normalised duality gap
) -> None:
    m = W.shape[0]
    for j in prange(m):
        sweeps, gap = _solve_one(
            indptr, indices, data, inv_n, mu, usable, sd_in, C[j], m2[j], W[j], Rt[j],
            active[j], lam[j], lam_prev[j], inv_sd[j], tol, max_iter, screening,
        )  # fmt: skip
        sweeps_out[j] = sweeps
        gap_out[j] = gap


@njit(cache=True)
def _full_residual(indptr, indices, data, inv_n, c, w, order, n_act, rt):
    """rt = c − A w from scratch over the active columns: O(Σ nnz of those columns)."""
    rt[:] = c
    for t in range(n_act):
        k = order[t]
        if w[k] != 0.0:
            dd = w[k] * inv_n
            for p in range(indptr[k], indptr[k + 1]):
                rt[indices[p]] -= data[p] * dd


@njit(cache=True)
def _active_gram(indptr, indices, data, inv_n, mu, order, n_act, where):
    """Dense centred G_AA = A_AA − μ_A μ_Aᵀ for the active set (where[k] = slot or −1)."""
    g = np.empty((n_act, n_act))
    for a in range(n_act):
        ka = order[a]
        for b in range(n_act):
            g[a, b] = -mu[ka] * mu[order[b]]
        for p in range(indptr[ka], indptr[ka + 1]):
            b = where[indices[p]]
            if b >= 0:
                g[a, b] += data[p] * inv_n
    return g


@njit(cache=True)
def _solve_one(
    indptr, indices, data, inv_n, mu, usable, sd_in, c, m2, w, rt, act, lj, lj_prev,
    sd_y_inv, tol, max_iter, screening,
):  # fmt: skip
    """One output at one α. Sweeps run on the active set with its dense Gram (covariance
    updates: O(|A|) per step, not O(nnz of a column)); the full gradient is rebuilt only to
    check the duality gap and the KKT conditions, and only then can the set grow."""
    n_in = len(w)
    scale = 2 * sd_y_inv * sd_y_inv
    order = np.empty(n_in, dtype=np.int64)
    where = np.full(n_in, -1, dtype=np.int64)
    n_act = 0
    for k in range(n_in):
        if act[k]:
            order[n_act] = k
            where[k] = n_act
            n_act += 1
    s = 0.0
    for t in range(n_act):
        s += mu[order[t]] * w[order[t]]
    strong = np.zeros(n_in, dtype=np.bool_)
    if screening:  # sequential strong rule: keep k if |r_k| ≥ 2λ − λ_prev
        cut = 2 * lj - lj_prev
        for k in range(n_in):
            strong[k] = usable[k] and abs(rt[k] + mu[k] * s) >= cut
    g = _active_gram(indptr, indices, data, inv_n, mu, order, n_act, where)
    r_act = np.empty(n_act)
    for t in range(n_act):
        r_act[t] = rt[order[t]] + mu[order[t]] * s
    sweeps, gap, inner_tol = 0, np.inf, 1e-3
    while True:
        # Sweep the active set until its steps settle (as a change in std(ŷ) / std(y)).
        while n_act > 0 and sweeps < max_iter:
            sweeps += 1
            biggest = 0.0
            for t in range(n_act):
                k = order[t]
                old = w[k]
                new = _soft(r_act[t] + g[t, t] * old, lj, g[t, t])
                d = new - old
                if d != 0.0:
                    w[k] = new
                    for u in range(n_act):
                        r_act[u] -= g[u, t] * d
                    step = abs(d) * sd_in[k] * sd_y_inv
                    if step > biggest:
                        biggest = step
            if biggest <= inner_tol:
                break
            if sweeps % 10 == 0:  # slow zigzag, e.g. two inputs with correlation 0.9998
                _newton(g, r_act, w, order, n_act, lj)
        # The full gradient r = c − G w, then the duality gap of the whole problem, as in
        # scikit-learn's Lasso, from the sums alone; ×2/var: in normalised units.
        _full_residual(indptr, indices, data, inv_n, c, w, order, n_act, rt)
        s = 0.0
        for t in range(n_act):
            s += mu[order[t]] * w[order[t]]
        dual_norm, wc, wr, l1 = 0.0, 0.0, 0.0, 0.0
        for k in range(n_in):
            if usable[k]:
                r_k = abs(rt[k] + mu[k] * s)
                if r_k > dual_norm:
                    dual_norm = r_k
        for t in range(n_act):
            k = order[t]
            wc += w[k] * c[k]
            wr += w[k] * (rt[k] + mu[k] * s)
            l1 += abs(w[k])
        mse = max(m2 - wc - wr, 0.0)
        const = min(1.0, lj / dual_norm) if dual_norm > 0 else 1.0
        gap = (0.5 * mse * (1 + const * const) + lj * l1 - const * (m2 - wc)) * scale
        if gap <= tol or sweeps >= max_iter:
            break
        # KKT: zero coordinates with |r_k| > λ join, strong-rule candidates first (the
        # likely ones); then any, since strong rules are not safe.
        n_new, n_strong = 0, 0
        for k in range(n_in):
            violated = abs(rt[k] + mu[k] * s) > lj * (1 + 1e-9)
            if usable[k] and not act[k] and violated:
                n_new += 1
                if strong[k]:
                    n_strong += 1
        if n_new == 0:
            if inner_tol < 1e-12:
                break  # nothing moves and nothing joins: the gap is rounding
            inner_tol *= 0.01  # the set is right; solve it more tightly
        else:
            for k in range(n_in):
                violated = abs(rt[k] + mu[k] * s) > lj * (1 + 1e-9)
                if usable[k] and not act[k] and violated and (n_strong == 0 or strong[k]):
                    act[k] = True
                    order[n_act] = k
                    where[k] = n_act
                    n_act += 1
            g = _active_gram(indptr, indices, data, inv_n, mu, order, n_act, where)
        r_act = np.empty(n_act)
        for t in range(n_act):
            r_act[t] = rt[order[t]] + mu[order[t]] * s
    return sweeps, gap


@njit(cache=True)
def _newton(g, r_act, w, order, n_act, lj):
    """Jump to the exact minimiser on the current non-zero inputs with their signs fixed,
    G_nz w = c_nz − λ·sign(w); inputs whose sign would flip are dropped (set to zero) and
    the rest solved again. Coordinate descent needs thousands of sweeps where inputs are
    nearly collinear; this needs a few small solves. The sweeps that follow check it."""
    keep = np.empty(n_act, dtype=np.int64)
    sign = np.zeros(n_act)
    c_act = np.empty(n_act)  # c = r + G w on the active set
    for u in range(n_act):
        c_act[u] = r_act[u]
        for t in range(n_act):
            c_act[u] += g[u, t] * w[order[t]]
    q = 0
    for t in range(n_act):
        if w[order[t]] != 0.0:
            keep[q] = t
            sign[t] = 1.0 if w[order[t]] > 0 else -1.0
            q += 1
    while q > 0:
        h = np.empty((q, q))
        rhs = np.empty(q)
        top = 0.0
        for a in range(q):
            for b in range(q):
                h[a, b] = g[keep[a], keep[b]]
            rhs[a] = c_act[keep[a]] - lj * sign[keep[a]]
            top = max(top, h[a, a])
        for a in range(q):
            h[a, a] += 1e-12 * top
        new = np.linalg.solve(h, rhs)
        kept = 0
        for a in range(q):
            if new[a] * sign[keep[a]] > 0:
                keep[kept] = keep[a]
                kept += 1
        if kept == q:
            # Accept only a descent: with G_nz nearly singular the solve can land far off.
            # Objective on the active set: ½wᵀGw − cᵀw + λ‖w‖₁ = −½ wᵀ(c + r) + λ‖w‖₁.
            before = 0.0
            for t in range(n_act):
                wt = w[order[t]]
                before += -0.5 * wt * (c_act[t] + r_act[t]) + lj * abs(wt)
            r_new = np.empty(n_act)
            for u in range(n_act):  # r = c − G w afresh
                r_new[u] = c_act[u]
                for a in range(q):
                    r_new[u] -= g[u, keep[a]] * new[a]
            after = 0.0
            for a in range(q):
                t = keep[a]
                after += -0.5 * new[a] * (c_act[t] + r_new[t]) + lj * abs(new[a])
            if after < before:
                for t in range(n_act):
                    w[order[t]] = 0.0
                for a in range(q):
                    w[order[keep[a]]] = new[a]
                for u in range(n_act):
                    r_act[u] = r_new[u]
            return
        q = kept
