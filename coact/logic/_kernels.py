"""Numba counting kernels: one target per thread, merging its columns' sorted token lists."""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True)
def _start(x_ptr, y_ptr, targets, inputs, t):
    """Target t's inputs (the row of `inputs` up to its first −1) and where each input's and
    the target's sorted token lists begin (p, py) and end (e, ey)."""
    width = inputs.shape[1]
    k = 0
    while k < width and inputs[t, k] >= 0:
        k += 1
    cols = inputs[t, :k].copy()
    p, e = np.empty(k, np.int64), np.empty(k, np.int64)
    for j in range(k):
        p[j], e[j] = x_ptr[cols[j]], x_ptr[cols[j] + 1]
    return k, cols, p, e, y_ptr[targets[t]], y_ptr[targets[t] + 1]


@njit(cache=True)
def _advance(x_ptr, x_idx, x_val, x_floor, y_idx, y_val, cols, k, p, e, py, ey, n_tokens, xs):
    """The next token where any input or the target has an entry: (token, code, y, py)."""
    tok = n_tokens
    for j in range(k):
        if p[j] < e[j] and x_idx[p[j]] < tok:
            tok = x_idx[p[j]]
    if py < ey and y_idx[py] < tok:
        tok = y_idx[py]
    code = 0
    for j in range(k):
        xs[j] = 0.0
        if p[j] < e[j] and x_idx[p[j]] == tok:
            v = x_val[p[j]]
            if v > x_floor[cols[j]]:
                code |= 1 << j
                xs[j] = v
            p[j] += 1
    yv = 0.0
    if py < ey and y_idx[py] == tok:
        yv = y_val[py]
        py += 1
    return tok, code, yv, py


@njit(parallel=True, cache=True)
def _count_kernel(x_ptr, x_idx, x_val, x_floor, y_ptr, y_idx, y_val, y_floor, targets, inputs,
                  n_tokens, n, act, ysum, ysum_act, sxy, sxx, x_unit, x_edges, mom,
                  bins):  # fmt: skip
    """Per target and truth-table row (rows ≠ 0 fully; row 0 only where y > 0): tokens,
    target-active tokens, Σy, Σy when active; per input on its one-input row: Σxy and Σx²,
    the moments of (x / unit, y) where the target is active (n, Σx..Σx⁴, Σy, Σxy, Σx²y, Σy²)
    and per tertile of x (edges x_edges) tokens, active tokens, Σy and Σy²."""
    n_targets = inputs.shape[0]
    for t in prange(n_targets):
        k, cols, p, e, py, ey = _start(x_ptr, y_ptr, targets, inputs, t)
        floor_t = y_floor[targets[t]]
        xs = np.zeros(max(k, 1))
        while True:
            tok, code, yv, py = _advance(
                x_ptr, x_idx, x_val, x_floor, y_idx, y_val, cols, k, p, e, py, ey, n_tokens, xs
            )
            if tok >= n_tokens:
                break
            if code == 0 and yv == 0.0:
                continue  # inputs below their floors only: counted with the empty row later
            n[t, code] += 1
            ysum[t, code] += yv
            on = yv > floor_t
            if on:
                act[t, code] += 1
                ysum_act[t, code] += yv
            if code != 0 and code & (code - 1) == 0:
                j = 0
                while (1 << j) != code:
                    j += 1
                sxy[t, j] += xs[j] * yv
                sxx[t, j] += xs[j] * xs[j]
                b = 0
                if xs[j] > x_edges[cols[j], 0]:
                    b = 1
                if xs[j] > x_edges[cols[j], 1]:
                    b = 2
                bins[t, j, b, 0] += 1
                bins[t, j, b, 2] += yv
                bins[t, j, b, 3] += yv * yv
                if on:
                    bins[t, j, b, 1] += 1
                    u = xs[j] / x_unit[cols[j]]
                    m = mom[t, j]
                    m[0] += 1
                    m[1] += u
                    m[2] += u * u
                    m[3] += u * u * u
                    m[4] += u * u * u * u
                    m[5] += yv
                    m[6] += u * yv
                    m[7] += u * u * yv
                    m[8] += yv * yv


@njit(cache=True)
def _flush(sums, t, part):
    """Close a context's part sums (a, b) into Σa, Σb, Σa², Σb², Σab at sums[t, 1:6]."""
    a, b = part[0], part[1]
    sums[t, 1] += a
    sums[t, 2] += b
    sums[t, 3] += a * a
    sums[t, 4] += b * b
    sums[t, 5] += a * b
    part[0], part[1] = 0.0, 0.0


@njit(parallel=True, cache=True)
def _events_kernel(x_ptr, x_idx, x_val, x_floor, y_ptr, y_idx, y_val, y_floor, targets, inputs,
                   n_tokens, beta, beta_ok, stride, offsets, points, values, additive, ratio,
                   context):  # fmt: skip
    """Per target, on tokens where two or more inputs are active: the additivity's parts
    (num = y − max βx, den = Σβx − max βx over inputs with β > 0; `additive`) and the
    ratio's (y, Σβx; `ratio`), each as count, Σa, Σb and the second moments of the
    per-context sums (so its error is over contexts); and a systematic sample (every
    stride-th token) of the input vectors where the target fires (kind 0) and where some
    input fires but the target does not (kind 1)."""
    n_targets = inputs.shape[0]
    for t in prange(n_targets):
        k, cols, p, e, py, ey = _start(x_ptr, y_ptr, targets, inputs, t)
        floor_t = y_floor[targets[t]]
        xs = np.zeros(max(k, 1))
        seen = np.zeros(2, np.int64)
        part_s, part_r = np.zeros(2), np.zeros(2)
        last = -1
        while True:
            tok, code, yv, py = _advance(
                x_ptr, x_idx, x_val, x_floor, y_idx, y_val, cols, k, p, e, py, ey, n_tokens, xs
            )
            if tok >= n_tokens:
                break
            kind = -1
            if yv > floor_t:
                kind = 0
            elif code != 0:
                kind = 1
            if kind >= 0:
                if seen[kind] % stride[t, kind] == 0:
                    slot = offsets[kind, t] + seen[kind] // stride[t, kind]
                    if slot < offsets[kind, t + 1]:
                        for j in range(k):
                            points[kind, slot, j] = xs[j]
                        values[kind, slot] = yv
                seen[kind] += 1
            if code == 0 or code & (code - 1) == 0:
                continue
            usable, positive, total, top = True, 0, 0.0, 0.0
            for j in range(k):
                if code & (1 << j):
                    if not beta_ok[t, j]:
                        usable = False
                    elif beta[t, j] > 0:
                        positive += 1
                        part = beta[t, j] * xs[j]
                        total += part
                        top = max(top, part)
            if not usable or positive == 0:
                continue
            if context[tok] != last:
                _flush(additive, t, part_s)
                _flush(ratio, t, part_r)
                last = context[tok]
            ratio[t, 0] += 1
            part_r[0] += yv
            part_r[1] += total
            if positive >= 2:
                additive[t, 0] += 1
                part_s[0] += yv - top
                part_s[1] += total - top
        _flush(additive, t, part_s)
        _flush(ratio, t, part_r)


@njit(parallel=True, cache=True)
def _context_kernel(x_ptr, x_idx, x_val, x_floor, y_ptr, y_idx, y_val, y_floor, targets, inputs,
                    n_tokens, context, offsets, out_context, out_cell, out_count,
                    fill):  # fmt: skip
    """Per target, its truth-table cells (2·row + active) counted per run of one context:
    with `fill` False only how many entries each target has (offsets[t + 1]); with it
    True the entries, written from offsets[t]. Row 0's inactive tokens are not walked."""
    n_targets = inputs.shape[0]
    cells = 2 << inputs.shape[1]
    for t in prange(n_targets):
        k, cols, p, e, py, ey = _start(x_ptr, y_ptr, targets, inputs, t)
        floor_t = y_floor[targets[t]]
        xs = np.zeros(max(k, 1))
        local = np.zeros(cells, np.int64)
        touched = np.empty(cells, np.int64)
        n_touched, written, last = 0, 0, -1
        while True:
            tok, code, yv, py = _advance(
                x_ptr, x_idx, x_val, x_floor, y_idx, y_val, cols, k, p, e, py, ey, n_tokens, xs
            )
            ctx = context[tok] if tok < n_tokens else -2
            if ctx != last and n_touched > 0:
                for u in range(n_touched):
                    c = touched[u]
                    if fill:
                        at = offsets[t] + written
                        out_context[at], out_cell[at], out_count[at] = last, c, local[c]
                    local[c] = 0
                    written += 1
                n_touched = 0
            last = ctx
            if tok >= n_tokens:
                break
            on = 1 if yv > floor_t else 0
            if code == 0 and on == 0:
                continue
            c = 2 * code + on
            if local[c] == 0:
                touched[n_touched] = c
                n_touched += 1
            local[c] += 1
        if not fill:
            offsets[t + 1] = written


@njit(cache=True)
def _incidence(fire_tok, n_fire, r_ptr, r_idx, r_val, x_floor, slot, width):
    """Which of `width` columns (slot[input], −1: none) is on at each firing token: per
    token its columns (row_ptr, row_col), per column its count and tokens (col_ptr,
    col_tok)."""
    row_ptr = np.zeros(n_fire + 1, np.int64)
    row_col = np.empty(n_fire * 64, np.int64)
    col_n = np.zeros(width, np.int64)
    at = 0
    for f in range(n_fire):
        tok = fire_tok[f]
        for r in range(r_ptr[tok], r_ptr[tok + 1]):
            i = r_idx[r]
            if r_val[r] > x_floor[i] and slot[i] >= 0:
                if at == len(row_col):
                    row_col = np.concatenate((row_col, np.empty(len(row_col), np.int64)))
                row_col[at] = slot[i]
                col_n[slot[i]] += 1
                at += 1
        row_ptr[f + 1] = at
    col_ptr = np.zeros(width + 1, np.int64)
    col_ptr[1:] = np.cumsum(col_n)
    col_tok = np.empty(at, np.int64)
    fill = col_ptr[:-1].copy()
    for f in range(n_fire):
        for q in range(row_ptr[f], row_ptr[f + 1]):
            col_tok[fill[row_col[q]]] = f
            fill[row_col[q]] += 1
    return row_ptr, row_col, col_n, col_ptr, col_tok


@njit(parallel=True, cache=True)
def _cover_kernel(x_floor, r_ptr, r_idx, r_val, x_total, y_ptr, y_idx, y_val, y_floor, targets,
                  chosen, pool_lo, pool_hi, pool_idx, n_tokens, min_lift, target, limit,
                  curve):  # fmt: skip
    """Per target, greedily: add to its `chosen` inputs (−1 padded; filled in place up to
    `limit`) the pool input (pool_idx[pool_lo[t]:pool_hi[t]], lift P(T | X) / P(T) at
    least min_lift) that covers most of its still uncovered activation mass, until the
    covered share reaches `target`. curve[t, m] is the share covered by its first m inputs
    (NaN past the last; all NaN for a target that never fires)."""
    n_targets = chosen.shape[0]
    for t in prange(n_targets):
        j_t = targets[t]
        lo, hi = y_ptr[j_t], y_ptr[j_t + 1]
        fire_tok = np.empty(hi - lo, np.int64)
        fire_y = np.empty(hi - lo)
        n_fire = 0
        for q in range(lo, hi):
            if y_val[q] > y_floor[j_t]:
                fire_tok[n_fire], fire_y[n_fire] = y_idx[q], y_val[q]
                n_fire += 1
        if n_fire == 0:
            continue
        mass = fire_y[:n_fire].sum()
        n_pool = pool_hi[t] - pool_lo[t]
        k = 0
        while k < chosen.shape[1] and chosen[t, k] >= 0:
            k += 1
        # one column per chosen input, then one per pool input: the firing tokens it is on
        cols = np.empty(k + n_pool, np.int64)
        cols[:k] = chosen[t, :k]
        cols[k:] = pool_idx[pool_lo[t] : pool_hi[t]]
        slot = np.full(len(x_total), -1, np.int64)
        for c in range(k + n_pool - 1, -1, -1):  # a repeated input: its first column
            slot[cols[c]] = c
        width = k + n_pool
        row_ptr, row_col, col_n, col_ptr, col_tok = _incidence(
            fire_tok, n_fire, r_ptr, r_idx, r_val, x_floor, slot, width
        )
        covered = np.zeros(n_fire, np.bool_)
        for c in range(k):
            for q in range(col_ptr[c], col_ptr[c + 1]):
                covered[col_tok[q]] = True
        gain = np.zeros(width)
        share = 0.0
        for f in range(n_fire):
            if covered[f]:
                share += fire_y[f]
            else:
                for q in range(row_ptr[f], row_ptr[f + 1]):
                    gain[row_col[q]] += fire_y[f]
        share /= mass
        curve[t, k] = share
        usable = np.zeros(width, np.bool_)
        base = n_fire / n_tokens
        k0 = k  # columns k0.. are the pool's
        for c in range(k0, width):
            total = x_total[cols[c]]
            both = col_n[c]
            usable[c] = slot[cols[c]] == c and total > 0 and both >= min_lift * base * total
        while share < target and k < limit:
            best, most = -1, 0.0
            for c in range(k0, width):
                if usable[c] and gain[c] > most:
                    best, most = c, gain[c]
            if best < 0:
                break
            usable[best] = False
            for q in range(col_ptr[best], col_ptr[best + 1]):
                f = col_tok[q]
                if not covered[f]:
                    covered[f] = True
                    for u in range(row_ptr[f], row_ptr[f + 1]):
                        gain[row_col[u]] -= fire_y[f]
            chosen[t, k] = cols[best]
            k += 1
            share += most / mass
            curve[t, k] = share


@njit(parallel=True, cache=True)
def _gain_kernel(x_ptr, x_idx, x_val, x_floor, r_ptr, r_idx, r_val, x_total, y_ptr, y_idx, y_val,
                 y_floor, targets, inputs, n_tokens, n, act, best, gain, best_mag,
                 gain_mag, xlogx):  # fmt: skip
    """Per target: the input (not yet among its inputs) with the largest conditional mutual
    information I(T; X_i | row) given its current truth-table row, from counts; and the
    one that splits the target's activation within its rows most (`gain_mag`: the
    between-groups sum of squares over the within-row one, on firing tokens). Targets are
    dealt to chunks that reuse their buffers, clearing only what a target touched."""
    n_targets = inputs.shape[0]
    n_in = len(x_total)
    rows = n.shape[1]
    n_chunks = min(n_targets, 64)
    for c in prange(n_chunks):
        cnt = np.zeros((n_in, rows), np.int64)
        hit = np.zeros((n_in, rows), np.int64)
        y_on = np.zeros((n_in, rows))
        touched = np.zeros(n_in, np.bool_)
        order = np.empty(n_in, np.int64)
        for t in range(c, n_targets, n_chunks):
            _gain_one(x_ptr, x_idx, x_val, x_floor, r_ptr, r_idx, r_val, x_total, y_ptr, y_idx,
                      y_val, y_floor, targets, inputs, n_tokens, n, act, best, gain, best_mag,
                      gain_mag, t, cnt, hit, y_on, touched, order, xlogx)  # fmt: skip


@njit(cache=True)
def _gain_one(x_ptr, x_idx, x_val, x_floor, r_ptr, r_idx, r_val, x_total, y_ptr, y_idx, y_val,
              y_floor, targets, inputs, n_tokens, n, act, best, gain, best_mag, gain_mag, t, cnt,
              hit, y_on, touched, order, xlogx):  # fmt: skip
    """`_gain_kernel` for target t, with zeroed buffers it leaves zeroed; xlogx[c] is
    c·log2(c) for every count c up to n_tokens."""
    rows = n.shape[1]
    best[t], gain[t] = -1, 0.0
    k, cols, p, e, py, ey = _start(x_ptr, y_ptr, targets, inputs, t)
    floor_t = y_floor[targets[t]]
    xs = np.zeros(max(k, 1))
    s1, s2 = np.zeros(rows), np.zeros(rows)
    best_mag[t], gain_mag[t] = -1, 0.0
    n_touched = 0
    while True:
        tok, code, yv, py = _advance(
            x_ptr, x_idx, x_val, x_floor, y_idx, y_val, cols, k, p, e, py, ey, n_tokens, xs
        )
        if tok >= n_tokens:
            break
        if code == 0 and yv <= floor_t:
            continue  # the empty row's inactive tokens: by complement below
        on = 1 if yv > floor_t else 0
        if on:
            s1[code] += yv
            s2[code] += yv * yv
        for q in range(r_ptr[tok], r_ptr[tok + 1]):
            i = r_idx[q]
            if r_val[q] <= x_floor[i]:
                continue
            cnt[i, code] += 1
            hit[i, code] += on
            if on:
                y_on[i, code] += yv
            if not touched[i]:
                touched[i] = True
                order[n_touched] = i
                n_touched += 1
    own = np.zeros(n_touched, np.bool_)
    for u in range(n_touched):
        for j in range(k):
            if order[u] == cols[j]:
                own[u] = True
    for u in range(n_touched):
        i = order[u]
        if own[u]:
            continue
        c0 = x_total[i]
        for r in range(1, rows):
            c0 -= cnt[i, r]
        info = 0.0
        for r in range(rows):  # n_r · I_r = Σ L(cells) − Σ L(margins) + L(n_r), L = x log2 x
            on_n = c0 if r == 0 else cnt[i, r]
            on_a, n_r, a_r = hit[i, r], n[t, r], act[t, r]
            if on_n <= 0 or on_n >= n_r or on_a > a_r or n_r - on_n < a_r - on_a:
                continue
            cells = xlogx[on_a] + xlogx[on_n - on_a] + xlogx[a_r - on_a]
            cells += xlogx[n_r - on_n - a_r + on_a]
            margins = xlogx[on_n] + xlogx[n_r - on_n] + xlogx[a_r] + xlogx[n_r - a_r]
            info += max(cells - margins + xlogx[n_r], 0.0) / n_tokens
        if info > gain[t]:
            best[t], gain[t] = i, info
        between = 0.0
        for r in range(rows):
            m_r, k_on = act[t, r], hit[i, r]
            if k_on > 0 and m_r - k_on > 0:
                d = y_on[i, r] / k_on - s1[r] / m_r
                between += k_on * m_r / (m_r - k_on) * d * d
        if between > gain_mag[t]:
            best_mag[t], gain_mag[t] = i, between
    for u in range(n_touched):
        i = order[u]
        touched[i] = False
        for r in range(rows):
            cnt[i, r], hit[i, r], y_on[i, r] = 0, 0, 0.0
    within = 0.0
    for r in range(rows):
        if act[t, r] > 0:
            within += s2[r] - s1[r] * s1[r] / act[t, r]
    gain_mag[t] = gain_mag[t] / within if within > 0 else 0.0
