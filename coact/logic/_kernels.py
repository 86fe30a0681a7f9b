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
                  n_tokens, n, act, ysum, ysum_act, sxy, sxx):  # fmt: skip
    """Per target and truth-table row (rows ≠ 0 fully; row 0 only where y > 0): tokens,
    target-active tokens, Σy, Σy when active; per input Σxy and Σx² on its one-input row."""
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
            if yv > floor_t:
                act[t, code] += 1
                ysum_act[t, code] += yv
            if code != 0 and code & (code - 1) == 0:
                j = 0
                while (1 << j) != code:
                    j += 1
                sxy[t, j] += xs[j] * yv
                sxx[t, j] += xs[j] * xs[j]


@njit(parallel=True, cache=True)
def _events_kernel(x_ptr, x_idx, x_val, x_floor, y_ptr, y_idx, y_val, y_floor, targets, inputs,
                   n_tokens, beta, beta_ok, stride, offsets, points, values, additive):  # fmt: skip
    """Additivity sums per target (count, Σnum, Σden, Σnum², Σden², Σnum·den) and a
    systematic sample (every stride-th token) of the input vectors where the target fires
    (kind 0) and where some input fires but the target does not (kind 1)."""
    n_targets = inputs.shape[0]
    for t in prange(n_targets):
        k, cols, p, e, py, ey = _start(x_ptr, y_ptr, targets, inputs, t)
        floor_t = y_floor[targets[t]]
        xs = np.zeros(max(k, 1))
        seen = np.zeros(2, np.int64)
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
            if usable and positive >= 2:
                num, den = yv - top, total - top
                additive[t, 0] += 1
                additive[t, 1] += num
                additive[t, 2] += den
                additive[t, 3] += num * num
                additive[t, 4] += den * den
                additive[t, 5] += num * den


@njit(cache=True, inline="always")
def _plogp(count: float, total: float) -> float:
    if count <= 0 or total <= 0:
        return 0.0
    q = count / total
    return q * np.log2(q)


@njit(cache=True)
def _table_mi(n1: float, a1: float, n0: float, a0: float) -> float:
    """I(T; X) in bits of the 2×2 table: n1 tokens with X on (a1 with T active), n0 off."""
    total = n1 + n0
    if total <= 0:
        return 0.0
    h_t = -_plogp(a1 + a0, total) - _plogp(total - a1 - a0, total)
    h_t_given = 0.0
    for n_x, a_x in ((n1, a1), (n0, a0)):
        if n_x > 0:
            h_t_given += (n_x / total) * (-_plogp(a_x, n_x) - _plogp(n_x - a_x, n_x))
    return max(h_t - h_t_given, 0.0)


@njit(parallel=True, cache=True)
def _gain_kernel(x_ptr, x_idx, x_val, x_floor, r_ptr, r_idx, r_val, x_total, y_ptr, y_idx, y_val,
                 y_floor, targets, inputs, n_tokens, n, act, best, gain):  # fmt: skip
    """Per target: the input (not yet among its inputs) with the largest conditional mutual
    information I(T; X_i | row) given its current truth-table row, from counts."""
    n_targets = inputs.shape[0]
    n_in = len(x_total)
    rows = n.shape[1]
    for t in prange(n_targets):
        best[t], gain[t] = -1, 0.0
        k, cols, p, e, py, ey = _start(x_ptr, y_ptr, targets, inputs, t)
        floor_t = y_floor[targets[t]]
        xs = np.zeros(max(k, 1))
        cnt = np.zeros((n_in, rows), np.int64)
        hit = np.zeros((n_in, rows), np.int64)
        touched = np.zeros(n_in, np.bool_)
        order = np.empty(n_in, np.int64)
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
            for q in range(r_ptr[tok], r_ptr[tok + 1]):
                i = r_idx[q]
                if r_val[q] <= x_floor[i]:
                    continue
                cnt[i, code] += 1
                hit[i, code] += on
                if not touched[i]:
                    touched[i] = True
                    order[n_touched] = i
                    n_touched += 1
        for j in range(k):
            touched[cols[j]] = False
        for u in range(n_touched):
            i = order[u]
            if not touched[i]:
                continue
            c0 = x_total[i]
            for r in range(1, rows):
                c0 -= cnt[i, r]
            info = 0.0
            for r in range(rows):
                on_n = float(c0 if r == 0 else cnt[i, r])
                on_a = float(hit[i, r])
                info += (n[t, r] / n_tokens) * _table_mi(
                    on_n, on_a, n[t, r] - on_n, act[t, r] - on_a
                )
            if info > gain[t]:
                best[t], gain[t] = i, info
