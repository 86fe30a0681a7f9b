"""Compiled kernels of the exact linear path (numba): coordinate descent, one output per
thread, and the sums it reads (Gram products, held-out errors).

Per output j, the strong-rule candidates join the active set, and sweeps run on it with
its dense centred Gram G_AA (G = A − μμᵀ, A = XᵀX/n): O(|A|) per step, until the duality
gap restricted to the active set (O(|A|) to evaluate) is below tol/2. Only then is the full
gradient r = c − G w over every input rebuilt, from the active inputs' rows of A (dense
where n_in ≤ DENSE_GRAM_MAX, else sparse), to check the gap of the whole problem and the
KKT conditions; violators join and the loop repeats. Inactive inputs cost nothing until
they violate them. Pure Python over these loops is ~100× slower.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# Sweeps between Newton jumps: a jump costs O(|nz|³) and sweeps are cheap, so most outputs
# should converge by sweeping alone (every 10 measured ~25 % slower on SmolLM2 codes).
NEWTON_EVERY = 25


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
    dense_a: np.ndarray,  # (n_in, n_in) A = XᵀX/n where it fits in memory, else (0, 0)
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
    mse_out: np.ndarray,  # (m,) training MSE of the fit (centred: with its intercept)
    shift_out: np.ndarray,  # (m,) μᵀw, the intercept's shift
) -> None:
    m = W.shape[0]
    for j in prange(m):
        sweeps, gap, mse, s = _solve_one(
            indptr, indices, data, dense_a, inv_n, mu, usable, sd_in, C[j], m2[j], W[j], Rt[j],
            active[j], lam[j], lam_prev[j], inv_sd[j], tol, max_iter, screening,
        )  # fmt: skip
        sweeps_out[j] = sweeps
        gap_out[j] = gap
        mse_out[j] = mse
        shift_out[j] = s


@njit(cache=True)
def _full_residual(indptr, indices, data, dense_a, inv_n, c, w, order, n_act, rt):
    """rt = c − A w from scratch over the active columns: O(Σ nnz of those columns), or
    contiguous rows of the dense A."""
    rt[:] = c
    dense = dense_a.shape[0] > 0
    for t in range(n_act):
        k = order[t]
        if w[k] != 0.0:
            if dense:
                row, wk = dense_a[k], w[k]
                for i in range(len(rt)):
                    rt[i] -= row[i] * wk
            else:
                dd = w[k] * inv_n
                for p in range(indptr[k], indptr[k + 1]):
                    rt[indices[p]] -= data[p] * dd


@njit(cache=True)
def _gram_rows(indptr, indices, data, dense_a, inv_n, mu, order, where, g, lo, hi):
    """Rows and columns lo..hi of the dense centred G_AA = A_AA − μ_A μ_Aᵀ (slots 0..hi of
    the active set, where[k] = slot or −1); rows below lo are already there."""
    dense = dense_a.shape[0] > 0
    for a in range(lo, hi):
        ka = order[a]
        for b in range(hi):
            g[a, b] = -mu[ka] * mu[order[b]]
        if dense:
            row = dense_a[ka]
            for b in range(hi):
                g[a, b] += row[order[b]]
        else:
            for p in range(indptr[ka], indptr[ka + 1]):
                b = where[indices[p]]
                if b >= 0:
                    g[a, b] += data[p] * inv_n
        for b in range(lo):
            g[b, a] = g[a, b]


@njit(cache=True)
def _gap(m2, wc, wr, l1, dual_norm, lj, scale):
    """Duality gap of the whole problem at w, as in scikit-learn's Lasso, in normalised
    units, and the training MSE: everything but the dual norm needs only w's support."""
    mse = max(m2 - wc - wr, 0.0)
    const = min(1.0, lj / dual_norm) if dual_norm > 0 else 1.0
    return (0.5 * mse * (1 + const * const) + lj * l1 - const * (m2 - wc)) * scale, mse


@njit(cache=True)
def _solve_one(
    indptr, indices, data, dense_a, inv_n, mu, usable, sd_in, c, m2, w, rt, act, lj, lj_prev,
    sd_y_inv, tol, max_iter, screening,
):  # fmt: skip
    """One output at one α. The strong-rule candidates join the active set first; sweeps
    run on the active set with its dense Gram (covariance updates: O(|A|) per step) until
    the duality gap restricted to it is below tol/2, which costs O(|A|) to check. Only then
    is the full gradient rebuilt (O(Σ nnz of the active columns)) for the gap of the whole
    problem and the KKT conditions; violators join and the loop repeats."""
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
    if screening:  # sequential strong rule: |r_k| ≥ 2λ − λ_prev joins now
        cut = 2 * lj - lj_prev
        for k in range(n_in):
            if usable[k] and not act[k] and abs(rt[k] + mu[k] * s) >= cut:
                act[k] = True
                order[n_act] = k
                where[k] = n_act
                n_act += 1
    cap = max(16, 2 * n_act)
    g = np.empty((cap, cap))
    _gram_rows(indptr, indices, data, dense_a, inv_n, mu, order, where, g, 0, n_act)
    r_act = np.empty(cap)
    for t in range(n_act):
        r_act[t] = rt[order[t]] + mu[order[t]] * s
    sweeps, gap, mse, target = 0, np.inf, m2, 0.5 * tol
    while True:
        while n_act > 0 and sweeps < max_iter:
            sweeps += 1
            for t in range(n_act):
                k = order[t]
                old = w[k]
                gtt = g[t, t]
                new = _soft(r_act[t] + gtt * old, lj, gtt)
                d = new - old
                if d != 0.0:
                    w[k] = new
                    gt = g[t]
                    for u in range(n_act):
                        r_act[u] -= gt[u] * d
            wc, wr, l1, dual_norm = 0.0, 0.0, 0.0, 0.0
            for t in range(n_act):
                k = order[t]
                wc += w[k] * c[k]
                wr += w[k] * r_act[t]
                l1 += abs(w[k])
                dual_norm = max(dual_norm, abs(r_act[t]))
            if _gap(m2, wc, wr, l1, dual_norm, lj, scale)[0] <= target:
                break
            if sweeps % NEWTON_EVERY == 0:  # slow zigzag, e.g. correlation 0.9998
                _newton(g, r_act, w, order, n_act, lj)
        _full_residual(indptr, indices, data, dense_a, inv_n, c, w, order, n_act, rt)
        s = 0.0
        for t in range(n_act):
            s += mu[order[t]] * w[order[t]]
        dual_norm, wc, wr, l1 = 0.0, 0.0, 0.0, 0.0
        for k in range(n_in):
            if usable[k]:
                dual_norm = max(dual_norm, abs(rt[k] + mu[k] * s))
        for t in range(n_act):
            k = order[t]
            wc += w[k] * c[k]
            wr += w[k] * (rt[k] + mu[k] * s)
            l1 += abs(w[k])
        gap, mse = _gap(m2, wc, wr, l1, dual_norm, lj, scale)
        if gap <= tol or sweeps >= max_iter:
            break
        # KKT: zero coordinates with |r_k| > λ join (strong rules are not safe).
        lo = n_act
        for k in range(n_in):
            if usable[k] and not act[k] and abs(rt[k] + mu[k] * s) > lj * (1 + 1e-9):
                act[k] = True
                order[n_act] = k
                where[k] = n_act
                n_act += 1
        if n_act == lo:
            if target < 1e-8 * tol:
                break  # nothing moves and nothing joins: the gap is rounding
            target *= 0.01  # the set is right; solve it more tightly
        else:
            if n_act > cap:
                cap = max(2 * cap, n_act)
                grown = np.empty((cap, cap))
                grown[:lo, :lo] = g[:lo, :lo]
                g = grown
                r_act = np.empty(cap)
            _gram_rows(indptr, indices, data, dense_a, inv_n, mu, order, where, g, lo, n_act)
        for t in range(n_act):
            r_act[t] = rt[order[t]] + mu[order[t]] * s
    return sweeps, gap, mse, s


@njit(cache=True)
def _newton(g, r_act, w, order, n_act, lj, max_pieces=16):
    """Jump towards the exact minimiser on the current non-zero inputs with their signs
    fixed, G_nz w = c_nz − λ·sign(w), along the segment from w: the objective is a convex
    quadratic there until an input reaches zero, so the step stops at the optimum on the
    segment or where the first input reaches zero; that input leaves and the rest are
    solved again (piecewise, as LARS does). Coordinate descent needs thousands of sweeps
    where inputs are nearly collinear, or one input slowly returns to zero; this needs a
    few small solves. Accepted only if the objective, recomputed afresh, went down: with
    G_nz nearly singular the solve can land far off. The sweeps that follow check it."""
    x = np.empty(n_act)
    for t in range(n_act):
        x[t] = w[order[t]]
    nzs = np.empty(n_act, dtype=np.int64)  # the non-zero slots
    n_nz = 0
    for t in range(n_act):
        if x[t] != 0.0:
            nzs[n_nz] = t
            n_nz += 1
    c_act = np.empty(n_act)  # c = r + G w on the active set
    for u in range(n_act):
        acc = r_act[u]
        gu = g[u]
        for i in range(n_nz):
            acc += gu[nzs[i]] * x[nzs[i]]
        c_act[u] = acc
    # Objective on the active set: ½wᵀGw − cᵀw + λ‖w‖₁ = −½ wᵀ(c + r) + λ‖w‖₁.
    before = 0.0
    for t in range(n_act):
        before += -0.5 * x[t] * (c_act[t] + r_act[t]) + lj * abs(x[t])
    r = r_act[:n_act].copy()
    keep = np.empty(n_act, dtype=np.int64)
    sign = np.zeros(n_act)
    gd = np.empty(n_act)
    moved = False
    for _ in range(max_pieces):
        q = 0
        for t in range(n_act):
            if x[t] != 0.0:
                keep[q] = t
                sign[t] = 1.0 if x[t] > 0 else -1.0
                q += 1
        if q == 0:
            break
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
        d = np.linalg.solve(h, rhs)
        slope = 0.0
        for a in range(q):
            t = keep[a]
            d[a] -= x[t]
            slope += d[a] * (lj * sign[t] - r[t])  # gradient of the smooth part, this orthant
        for u in range(n_act):
            acc = 0.0
            gu = g[u]
            for a in range(q):
                acc += gu[keep[a]] * d[a]
            gd[u] = acc
        curv = 0.0
        for a in range(q):
            curv += d[a] * gd[keep[a]]
        if not (slope < 0.0 and curv > 0.0):
            break
        step, hit = min(1.0, -slope / curv), -1
        for a in range(q):
            xa = x[keep[a]]
            if d[a] * xa < 0.0 and -xa / d[a] < step:
                step, hit = -xa / d[a], a
        for a in range(q):
            x[keep[a]] += step * d[a]
        for u in range(n_act):
            r[u] -= step * gd[u]
        moved = True
        if hit < 0:
            break
        x[keep[hit]] = 0.0
    if not moved:
        return
    r_new = np.empty(n_act)
    after = 0.0
    n_nz = 0
    for t in range(n_act):
        if x[t] != 0.0:
            nzs[n_nz] = t
            n_nz += 1
    for u in range(n_act):  # r = c − G w afresh
        acc = c_act[u]
        gu = g[u]
        for i in range(n_nz):
            acc -= gu[nzs[i]] * x[nzs[i]]
        r_new[u] = acc
    for t in range(n_act):
        after += -0.5 * x[t] * (c_act[t] + r_new[t]) + lj * abs(x[t])
    if after < before:
        for t in range(n_act):
            w[order[t]] = x[t]
            r_act[t] = r_new[t]


# --- sufficient statistics: the Gram pass and held-out errors ----------------------------


@njit(cache=True)
def transpose(indptr, indices, data, n_cols):
    """CSR parts of the transpose of a CSR matrix (counting sort: rows stay in order), and
    for each of its entries the position of the same entry in the input."""
    counts = np.zeros(n_cols + 1, dtype=np.int64)
    for p in range(len(indices)):
        counts[indices[p] + 1] += 1
    t_ptr = np.cumsum(counts)
    fill = t_ptr[:-1].copy()
    t_ind = np.empty(len(indices), dtype=np.int64)
    t_val = np.empty(len(indices), dtype=data.dtype)
    t_src = np.empty(len(indices), dtype=np.int64)
    for row in range(len(indptr) - 1):
        for p in range(indptr[row], indptr[row + 1]):
            q = fill[indices[p]]
            t_ind[q] = row
            t_val[q] = data[p]
            t_src[q] = p
            fill[indices[p]] += 1
    return t_ptr, t_ind, t_val, t_src


@njit(parallel=True, cache=True)
def cross_products(t_ptr, t_ind, t_val, t_src, ptr, ind, val, n_cols, upper):
    """CSR parts (sorted, float64) of Mᵀ B for M given by its transpose (`transpose` of
    M: t_*) and B (CSR rows ptr/ind/val with n_cols columns): row k sums, over the tokens t
    where input k is active, m_tk · b_t. Rows run in parallel, each with its own
    accumulator; a symbolic pass sizes the output first, so memory is the result's, never
    dense. With `upper` (B = M, rows sorted) only the upper triangle, columns ≥ k."""
    n_rows = len(t_ptr) - 1
    n_blocks = min(n_rows, 256)
    counts = np.zeros(n_rows + 1, dtype=np.int64)
    for blk in prange(n_blocks):
        mark = np.full(n_cols, -1, dtype=np.int64)
        for k in range(blk * n_rows // n_blocks, (blk + 1) * n_rows // n_blocks):
            count = 0
            for p in range(t_ptr[k], t_ptr[k + 1]):
                t = t_ind[p]
                for q in range(t_src[p] if upper else ptr[t], ptr[t + 1]):
                    col = ind[q]
                    if mark[col] != k:
                        mark[col] = k
                        count += 1
            counts[k + 1] = count
    out_ptr = np.cumsum(counts)
    out_ind = np.empty(out_ptr[n_rows], dtype=np.int64)
    out_val = np.empty(out_ptr[n_rows])
    for blk in prange(n_blocks):
        mark = np.full(n_cols, -1, dtype=np.int64)
        acc = np.zeros(n_cols)
        for k in range(blk * n_rows // n_blocks, (blk + 1) * n_rows // n_blocks):
            lo, hi = out_ptr[k], out_ptr[k + 1]
            n = lo
            for p in range(t_ptr[k], t_ptr[k + 1]):
                t, v = t_ind[p], np.float64(t_val[p])
                for q in range(t_src[p] if upper else ptr[t], ptr[t + 1]):
                    col = ind[q]
                    if mark[col] != k:
                        mark[col] = k
                        out_ind[n] = col
                        n += 1
                    acc[col] += v * np.float64(val[q])
            if 8 * (hi - lo) > n_cols:  # dense row: one ordered scan beats a sort
                n = lo
                for col in range(k if upper else 0, n_cols):
                    if mark[col] == k:
                        out_ind[n] = col
                        n += 1
            else:
                out_ind[lo:hi] = np.sort(out_ind[lo:hi])
            for p in range(lo, hi):
                col = out_ind[p]
                out_val[p] = acc[col]
                acc[col] = 0.0
    return out_ptr, out_ind, out_val


@njit(parallel=True, cache=True)
def cross_dense(t_ptr, t_ind, t_val, t_src, ptr, ind, val, n_cols, upper):
    """As `cross_products`, into a dense n_rows × n_cols array (where that fits in memory:
    no symbolic pass, no sorting); with `upper`, the full symmetric matrix."""
    n_rows = len(t_ptr) - 1
    out = np.zeros((n_rows, n_cols))
    n_blocks = min(n_rows, 256)
    for blk in prange(n_blocks):
        for k in range(blk * n_rows // n_blocks, (blk + 1) * n_rows // n_blocks):
            row = out[k]
            for p in range(t_ptr[k], t_ptr[k + 1]):
                t, v = t_ind[p], np.float64(t_val[p])
                for q in range(t_src[p] if upper else ptr[t], ptr[t + 1]):
                    row[ind[q]] += v * np.float64(val[q])
    if upper:
        for blk in prange(n_blocks):
            for k in range(blk * n_rows // n_blocks, (blk + 1) * n_rows // n_blocks):
                for col in range(k):
                    out[k, col] = out[col, k]
    return out


@njit(parallel=True, cache=True)
def dense_to_csr(d):
    """CSR parts of the non-zeros of a dense matrix, rows in parallel."""
    n_rows, n_cols = d.shape
    counts = np.zeros(n_rows + 1, dtype=np.int64)
    for k in prange(n_rows):
        count = 0
        for col in range(n_cols):
            if d[k, col] != 0.0:
                count += 1
        counts[k + 1] = count
    ptr = np.cumsum(counts)
    ind = np.empty(ptr[n_rows], dtype=np.int64)
    val = np.empty(ptr[n_rows])
    for k in prange(n_rows):
        q = ptr[k]
        for col in range(n_cols):
            if d[k, col] != 0.0:
                ind[q] = col
                val[q] = d[k, col]
                q += 1
    return ptr, ind, val


@njit(cache=True)
def symmetrise(u_ptr, u_ind, u_val):
    """The full symmetric matrix from its upper triangle (CSR, sorted rows): row k is the
    transposed strict upper part (columns < k, in order) followed by row k of the upper."""
    n = len(u_ptr) - 1
    counts = np.zeros(n + 1, dtype=np.int64)
    for k in range(n):
        counts[k + 1] += u_ptr[k + 1] - u_ptr[k]
        for p in range(u_ptr[k], u_ptr[k + 1]):
            if u_ind[p] != k:
                counts[u_ind[p] + 1] += 1
    ptr = np.cumsum(counts)
    fill = ptr[:-1].copy()
    ind = np.empty(ptr[n], dtype=np.int64)
    val = np.empty(ptr[n])
    for k in range(n):  # lower parts first: rows k' > k get column k, in increasing k
        for p in range(u_ptr[k], u_ptr[k + 1]):
            col = u_ind[p]
            if col != k:
                ind[fill[col]] = k
                val[fill[col]] = u_val[p]
                fill[col] += 1
    for k in range(n):
        q = fill[k]
        for p in range(u_ptr[k], u_ptr[k + 1]):
            ind[q] = u_ind[p]
            val[q] = u_val[p]
            q += 1
    return ptr, ind, val


@njit(parallel=True, cache=True)
def quadratic_terms(c_ptr, c_ind, c_val, y_col, a_ptr, a_ind, a_val, dense_a, xy_ptr, xy_ind,
                    xy_val, x_sum):  # fmt: skip
    """Per column j of a sparse W (CSC parts c_*, n_in × m): wᵀ(XᵀX)w, wᵀ(XᵀY)[:, y_col[j]]
    and wᵀΣx, with XᵀX as CSR (symmetric) or dense (dense_a, else 0 × 0) and XᵀY as CSC.
    O(Σ_j |w_j|·nnz of its rows), or O(Σ_j |w_j|²) with the dense XᵀX."""
    m, n_in = len(c_ptr) - 1, len(x_sum)
    quad, cross, wsum = np.zeros(m), np.zeros(m), np.zeros(m)
    dense = dense_a.shape[0] > 0
    n_blocks = min(m, 256)
    for blk in prange(n_blocks):
        wd = np.zeros(n_in)
        for j in range(blk * m // n_blocks, (blk + 1) * m // n_blocks):
            lo, hi = c_ptr[j], c_ptr[j + 1]
            if lo == hi:
                continue
            for p in range(lo, hi):
                wd[c_ind[p]] = c_val[p]
            qq, ws = 0.0, 0.0
            for p in range(lo, hi):
                k = c_ind[p]
                acc = 0.0
                if dense:
                    row = dense_a[k]
                    for q in range(lo, hi):
                        acc += row[c_ind[q]] * c_val[q]
                else:
                    for q in range(a_ptr[k], a_ptr[k + 1]):
                        acc += a_val[q] * wd[a_ind[q]]
                qq += c_val[p] * acc
                ws += c_val[p] * x_sum[k]
            cc = 0.0
            col = y_col[j]
            for q in range(xy_ptr[col], xy_ptr[col + 1]):
                cc += xy_val[q] * wd[xy_ind[q]]
            quad[j], cross[j], wsum[j] = qq, cc, ws
            for p in range(lo, hi):
                wd[c_ind[p]] = 0.0
    return quad, cross, wsum
