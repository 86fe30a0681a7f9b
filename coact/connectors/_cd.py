"""Compiled coordinate-descent kernels of the exact linear path (numba): the lasso solver,
one output per thread. The sums it reads (Gram products, held-out errors) are built by the
sparse-matrix kernels of `coact.connectors._csr`.

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
    n_act = _index_active(act, order, where)
    s = _shift(mu, w, order, n_act)
    if screening:  # sequential strong rule: |r_k| ≥ 2λ − λ_prev joins now
        n_act = _join(usable, act, rt, mu, s, 2 * lj - lj_prev, False, order, where, n_act)
    cap = max(16, 2 * n_act)
    g = np.empty((cap, cap))
    _gram_rows(indptr, indices, data, dense_a, inv_n, mu, order, where, g, 0, n_act)
    r_act = np.empty(cap)
    _fill_r_act(rt, mu, s, order, n_act, r_act)
    sweeps, gap, mse, target = 0, np.inf, m2, 0.5 * tol
    while True:
        sweeps = _sweep_active(g, r_act, w, c, m2, order, n_act, lj, scale, target, sweeps,
                               max_iter)  # fmt: skip
        _full_residual(indptr, indices, data, dense_a, inv_n, c, w, order, n_act, rt)
        s = _shift(mu, w, order, n_act)
        gap, mse = _full_gap(usable, rt, mu, s, c, w, order, n_act, m2, lj, scale)
        if gap <= tol or sweeps >= max_iter:
            break
        # KKT: zero coordinates with |r_k| > λ join (strong rules are not safe).
        lo = n_act
        n_act = _join(usable, act, rt, mu, s, lj * (1 + 1e-9), True, order, where, n_act)
        if n_act == lo:
            if target < 1e-8 * tol:
                break  # nothing moves and nothing joins: the gap is rounding
            target *= 0.01  # the set is right; solve it more tightly
        else:
            if n_act > cap:
                cap = max(2 * cap, n_act)
                g = _grown(g, lo, cap)
                r_act = np.empty(cap)
            _gram_rows(indptr, indices, data, dense_a, inv_n, mu, order, where, g, lo, n_act)
        _fill_r_act(rt, mu, s, order, n_act, r_act)
    return sweeps, gap, mse, s


@njit(cache=True)
def _index_active(act, order, where):
    """Slots of the inputs already active (warm start from the previous α), in input order,
    so the dense Gram and r_act can be indexed by slot; returns their count."""
    n_act = 0
    for k in range(len(act)):
        if act[k]:
            order[n_act] = k
            where[k] = n_act
            n_act += 1
    return n_act


@njit(cache=True)
def _shift(mu, w, order, n_act):
    """μᵀw over the active slots: the intercept's shift, which turns A's residual into G's
    (r_G = r_A + μ·μᵀw) without forming the centred Gram."""
    s = 0.0
    for t in range(n_act):
        s += mu[order[t]] * w[order[t]]
    return s


@njit(cache=True)
def _join(usable, act, rt, mu, s, cut, strict, order, where, n_act):
    """Inactive usable inputs whose centred gradient |r_k| reaches `cut` (strictly above
    it with `strict`) join the active set at the next slots; returns the new count. One
    routine for the strong rule (≥ 2λ − λ_prev) and the KKT check (> λ)."""
    for k in range(len(act)):
        if usable[k] and not act[k]:
            v = abs(rt[k] + mu[k] * s)
            joins = v > cut if strict else v >= cut
            if joins:
                act[k] = True
                order[n_act] = k
                where[k] = n_act
                n_act += 1
    return n_act


@njit(cache=True)
def _fill_r_act(rt, mu, s, order, n_act, r_act):
    """The centred gradient on the active slots, from the full A-residual: the sweeps then
    update it in O(|A|) per step without touching rt."""
    for t in range(n_act):
        r_act[t] = rt[order[t]] + mu[order[t]] * s


@njit(cache=True)
def _grown(g, lo, cap):
    """A cap × cap Gram buffer holding the first lo slots of g: the active set outgrew it,
    and the rows already built are kept rather than recomputed."""
    grown = np.empty((cap, cap))
    grown[:lo, :lo] = g[:lo, :lo]
    return grown


@njit(cache=True)
def _sweep_active(g, r_act, w, c, m2, order, n_act, lj, scale, target, sweeps, max_iter):
    """Coordinate sweeps over the active set until its restricted duality gap is below
    `target` or max_iter is reached, with a Newton jump every NEWTON_EVERY sweeps for slow
    zigzags; returns the sweep count so far (it is shared across KKT rounds)."""
    while n_act > 0 and sweeps < max_iter:
        sweeps += 1
        _sweep(g, r_act, w, order, n_act, lj)
        if _active_gap(r_act, w, c, m2, order, n_act, lj, scale) <= target:
            break
        if sweeps % NEWTON_EVERY == 0:  # slow zigzag, e.g. correlation 0.9998
            _newton(g, r_act, w, order, n_act, lj)
    return sweeps


@njit(cache=True)
def _sweep(g, r_act, w, order, n_act, lj):
    """One cyclic pass of soft-thresholded coordinate updates, keeping r_act = c − G w in
    step through G's rows (covariance updates: O(|A|) per moved coordinate)."""
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


@njit(cache=True)
def _active_gap(r_act, w, c, m2, order, n_act, lj, scale):
    """Duality gap of the problem restricted to the active set: O(|A|), cheap enough to
    check after every sweep, unlike the full gap, which needs the whole gradient."""
    wc, wr, l1, dual_norm = 0.0, 0.0, 0.0, 0.0
    for t in range(n_act):
        k = order[t]
        wc += w[k] * c[k]
        wr += w[k] * r_act[t]
        l1 += abs(w[k])
        dual_norm = max(dual_norm, abs(r_act[t]))
    return _gap(m2, wc, wr, l1, dual_norm, lj, scale)[0]


@njit(cache=True)
def _full_gap(usable, rt, mu, s, c, w, order, n_act, m2, lj, scale):
    """Duality gap of the whole problem and training MSE, from the rebuilt residual: the
    dual norm runs over every usable input, the rest over the support only."""
    dual_norm, wc, wr, l1 = 0.0, 0.0, 0.0, 0.0
    for k in range(len(w)):
        if usable[k]:
            dual_norm = max(dual_norm, abs(rt[k] + mu[k] * s))
    for t in range(n_act):
        k = order[t]
        wc += w[k] * c[k]
        wr += w[k] * (rt[k] + mu[k] * s)
        l1 += abs(w[k])
    return _gap(m2, wc, wr, l1, dual_norm, lj, scale)


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
    n_nz = _nonzero_slots(x, n_act, nzs)
    c_act = np.empty(n_act)  # c = r + G w on the active set
    for u in range(n_act):
        acc = r_act[u]
        gu = g[u]
        for i in range(n_nz):
            acc += gu[nzs[i]] * x[nzs[i]]
        c_act[u] = acc
    before = _objective(x, c_act, r_act, lj, n_act)
    r = r_act[:n_act].copy()
    keep = np.empty(n_act, dtype=np.int64)
    sign = np.zeros(n_act)
    gd = np.empty(n_act)
    moved = False
    for _ in range(max_pieces):
        q = _signed_support(x, n_act, keep, sign)
        if q == 0:
            break
        d, slope = _newton_direction(g, c_act, x, r, keep, sign, q, lj)
        curv = _curvature(g, d, keep, q, n_act, gd)
        if not (slope < 0.0 and curv > 0.0):
            break
        hit = _newton_step(x, r, d, gd, keep, q, n_act, slope, curv)
        moved = True
        if hit < 0:
            break
        x[keep[hit]] = 0.0
    if moved:
        _accept_if_lower(g, c_act, x, nzs, r_act, w, order, n_act, lj, before)


@njit(cache=True)
def _nonzero_slots(x, n_act, nzs):
    """The slots where x is non-zero, into nzs; returns their count. Products with G then
    run over the support only."""
    n_nz = 0
    for t in range(n_act):
        if x[t] != 0.0:
            nzs[n_nz] = t
            n_nz += 1
    return n_nz


@njit(cache=True)
def _objective(x, c_act, r, lj, n_act):
    """Objective on the active set, ½xᵀGx − cᵀx + λ‖x‖₁ = −½ xᵀ(c + r) + λ‖x‖₁ with
    r = c − G x: O(|A|) given r, so a Newton jump can be judged without another product."""
    total = 0.0
    for t in range(n_act):
        total += -0.5 * x[t] * (c_act[t] + r[t]) + lj * abs(x[t])
    return total


@njit(cache=True)
def _signed_support(x, n_act, keep, sign):
    """The non-zero slots of x into keep, with their signs into sign (their orthant fixes
    the L1 term's gradient); returns their count."""
    q = 0
    for t in range(n_act):
        if x[t] != 0.0:
            keep[q] = t
            sign[t] = 1.0 if x[t] > 0 else -1.0
            q += 1
    return q


@njit(cache=True)
def _newton_direction(g, c_act, x, r, keep, sign, q, lj):
    """d = (solution of G_nz z = c_nz − λ·sign) − x_nz, with a 1e-12 relative ridge so a
    singular G_nz still solves, and the slope of the objective along d in this orthant."""
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
    return d, slope


@njit(cache=True)
def _curvature(g, d, keep, q, n_act, gd):
    """gd = G d on every active slot (to update r after the step) and dᵀG d, the
    objective's curvature along d."""
    for u in range(n_act):
        acc = 0.0
        gu = g[u]
        for a in range(q):
            acc += gu[keep[a]] * d[a]
        gd[u] = acc
    curv = 0.0
    for a in range(q):
        curv += d[a] * gd[keep[a]]
    return curv


@njit(cache=True)
def _newton_step(x, r, d, gd, keep, q, n_act, slope, curv):
    """Move x and r along d to the optimum on the segment, or to where the first input
    reaches zero, whichever is nearer; returns that input's index in keep, or −1."""
    step, hit = min(1.0, -slope / curv), -1
    for a in range(q):
        xa = x[keep[a]]
        if d[a] * xa < 0.0 and -xa / d[a] < step:
            step, hit = -xa / d[a], a
    for a in range(q):
        x[keep[a]] += step * d[a]
    for u in range(n_act):
        r[u] -= step * gd[u]
    return hit


@njit(cache=True)
def _accept_if_lower(g, c_act, x, nzs, r_act, w, order, n_act, lj, before):
    """Write x into w and r_act only if the objective, with r recomputed afresh as c − G x
    (not the updated r, which drifts when G_nz is nearly singular), went below `before`."""
    r_new = np.empty(n_act)
    n_nz = _nonzero_slots(x, n_act, nzs)
    for u in range(n_act):  # r = c − G w afresh
        acc = c_act[u]
        gu = g[u]
        for i in range(n_nz):
            acc -= gu[nzs[i]] * x[nzs[i]]
        r_new[u] = acc
    after = _objective(x, c_act, r_new, lj, n_act)
    if after < before:
        for t in range(n_act):
            w[order[t]] = x[t]
            r_act[t] = r_new[t]
