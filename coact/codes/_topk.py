"""The TopK encoder's selection as one compiled pass (numba): per row, the k largest of
pre-activation + encoder bias, sorted by feature index, ReLU'd, zeros dropped, as CSR.

`torch.topk` over an SAE's width costs about as much as the encoder's product on CPU,
and the path around it (bias add, topk, sort, gather, ReLU, dropping zeros) copies the
dense (tokens × width) matrix twice; this pass reads it once and writes only the codes.
The bias is added here in float32, the same IEEE sum `pre + b_enc` gives, so the codes
are bit for bit those of the torch path. Ties at the k-th value keep the lower index.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True)
def _weakest(values, index):
    """The pick that goes first: the least value, and of equal ones the highest index."""
    best = 0
    for j in range(1, len(values)):
        if values[j] < values[best] or (values[j] == values[best] and index[j] > index[best]):
            best = j
    return best


@njit(cache=True)
def _select(row, bias, k, out_index, out_value):
    """The k largest of row + bias into (out_index, out_value), in no order; of equal
    values the lower index (a later one never displaces an equal one, and the weakest pick
    is the highest index of its value). Returns the k-th value."""
    for j in range(k):
        out_value[j] = row[j] + bias[j]
        out_index[j] = j
    low = _weakest(out_value, out_index)
    for j in range(k, len(row)):
        v = row[j] + bias[j]
        if v > out_value[low]:
            out_value[low] = v
            out_index[low] = j
            low = _weakest(out_value, out_index)
    return out_value[low]


@njit(cache=True)
def _top_row(row, bias, k, out_index, out_value):
    """The k largest of row + bias into (out_index, out_value), sorted by index, ReLU'd."""
    _select(row, bias, k, out_index, out_value)
    _finish(k, out_index, out_value)


@njit(cache=True)
def _finish(k, out_index, out_value):
    """Sort the picks by feature index and ReLU them."""
    for a in range(1, k):  # insertion sort by feature index
        i, v = out_index[a], out_value[a]
        b = a - 1
        while b >= 0 and out_index[b] > i:
            out_index[b + 1], out_value[b + 1] = out_index[b], out_value[b]
            b -= 1
        out_index[b + 1], out_value[b + 1] = i, v
    for j in range(k):
        if not out_value[j] > 0:  # ReLU; NaN and -0.0 drop too
            out_value[j] = 0


@njit(parallel=True, cache=True)
def topk_rows(pre, bias, k):
    """(indices, values), each rows × k, of the k largest of pre[i] + bias per row."""
    n = pre.shape[0]
    indices = np.empty((n, k), dtype=np.int32)
    values = np.empty((n, k), dtype=np.float32)
    for i in prange(n):
        _top_row(pre[i], bias, k, indices[i], values[i])
    return indices, values


def topk_csr(
    pre: np.ndarray, bias: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR parts (indptr, indices, values) of the TopK codes of float32 pre-activations."""
    if pre.dtype != np.float32 or bias.dtype != np.float32:
        raise TypeError("topk_csr reads float32 pre-activations and bias")
    if not 0 < k <= pre.shape[1]:
        raise ValueError(f"need 0 < k <= width, got k={k}, width={pre.shape[1]}")
    indices, values = topk_rows(np.ascontiguousarray(pre), np.ascontiguousarray(bias), k)
    return compact(indices, values)


def compact(indices: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR parts of rows × k picks, the zeros dropped."""
    keep = values > 0
    indptr = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(keep.sum(axis=1), out=indptr[1:])
    return indptr, indices[keep], values[keep]
