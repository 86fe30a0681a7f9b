"""Compiled sparse-matrix kernels of the exact linear path (numba): the sufficient
statistics that the coordinate-descent solver (`coact.connectors._cd`) reads, and the
held-out errors of its fits.

XᵀX and XᵀY come from one pass over the sparse codes: `transpose`, then `cross_products`
into CSR or `cross_dense` into a dense array, with `symmetrise` for the full matrix from
its upper triangle; `dense_to_csr` takes the non-zeros of a dense array. `quadratic_terms`
gives the terms of a sparse map's MSE from held-out statistics alone, without predictions.
Each works on CSR parts (indptr, indices, data) so numba can compile it, with rows in
parallel where the work is large. Kept apart from the solver: these build and read
matrices, the solver works one output at a time on what they built.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


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


@njit(cache=True)
def _csr_alloc(counts):
    """Row pointers from per-row counts (counts[k + 1] = entries of row k), and index and
    float64 value arrays of that size: the second pass of each two-pass CSR builder below
    fills them."""
    ptr = np.cumsum(counts)
    n = ptr[len(ptr) - 1]
    return ptr, np.empty(n, dtype=np.int64), np.empty(n)


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
    out_ptr, out_ind, out_val = _csr_alloc(counts)
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
    ptr, ind, val = _csr_alloc(counts)
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
    ptr, ind, val = _csr_alloc(counts)
    fill = ptr[:-1].copy()
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
