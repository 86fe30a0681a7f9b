"""A bfloat16 screen for the TopK encoder: the product x @ W_enc in bfloat16 (on CPUs with
AMX about 4× faster than float32's) picks candidates, and only they are scored in float32.

The selection stays exact. For every feature j a proven bound e_j covers the gap between
the screened value s_j and the value v_j = fl(x · W_j + b_j) this module computes for a
candidate in float32 (x̂, Ŵ: x, W rounded to bfloat16, unit roundoff u = 2⁻⁸; γ_d = d·2⁻²⁴):
  |x̂·Ŵ_j − x·W_j| ≤ ‖x − x̂‖ ‖Ŵ_j‖ + ‖x‖ ‖W_j − Ŵ_j‖          (Cauchy–Schwarz)
  float32 accumulation of x̂·Ŵ_j and of our own x·W_j: γ_d (‖x̂‖ ‖Ŵ_j‖ + ‖x‖ ‖W_j‖)
  the product's output rounded to bfloat16: u / (1 − u) · |s_j|
  denormals flushed by the hardware, the final + b_j, and the float32 evaluation of
  U_j = s_j + b_j + e_j itself (`_row_terms`): small terms, all counted.
The features are cut into blocks; a floor under the largest block maxima picks about
k + MARGIN candidates, which are scored; T is the k-th largest candidate value. Any other
feature has v_j ≤ U_j; when every one has U_j < T none can enter the top k, so the top k of
the candidates is the top k of the row. Otherwise the row is widened: every feature with
U_j ≥ T is scored too (the k-th value can only rise, so one widening settles it). A row
with a non-finite input or bound is scored in full. The bound assumes the bfloat16 product
accumulates in float32 (oneDNN's AMX and AVX512-BF16 kernels do; a test checks U_j against
float64 products).

Values are float32 dot products (summed in a different order than the float32 matmul, so
they may differ from it in the last bits); the chosen features are those of the float32
path except where two values tie within float32 rounding at the k-th place.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import numba
import numpy as np
import torch
from numba import njit, prange

from coact.codes._candidates import _candidates, _normal_cut
from coact.codes._topk import _finish, _select, compact
from coact.codes.scratch import scratch
from coact.errors import CoactError

SCREENS = ("auto", "bf16", "off")
MARGIN = 12  # candidates beyond k per row: fewer widened rows against more dots per row
UNIT = 2.0**-8  # bfloat16's unit roundoff
MIN_ROWS_PER_THREAD = 256
ROWS = 8  # features per block in the candidate search (see _candidates)
RANKED = 96  # candidates up to which `_top_ranked` picks the top k (its work grows as count²)


def bf16_is_fast() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX tiles): where the screen pays."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(probe()) if probe is not None else False


def resolve_screen(choice: str, device: torch.device | str) -> str:
    """ "bf16" or "off": what a collection on `device` does for `choice` ("auto" screens
    on CPUs with AMX only; the GPU keeps the float32 product)."""
    if choice not in SCREENS:
        raise CoactError(f"screen must be one of {list(SCREENS)}, got {choice!r}")
    on_cpu = torch.device(device).type == "cpu"
    if choice == "bf16" and not on_cpu:
        raise CoactError("the bfloat16 screen runs on CPU only; use screen 'off' or 'auto'")
    if choice == "auto":
        return "bf16" if on_cpu and bf16_is_fast() else "off"
    return choice


@dataclass
class ScreenCounts:
    """How often the screen settled a row by its candidates alone."""

    rows: int = 0
    widened_rows: int = 0  # rows where features beyond the candidates could still win
    full_rows: int = 0  # rows scored in full (a non-finite input or bound)
    scored: int = 0  # float32 dot products computed, all rows together

    def add(self, other: ScreenCounts) -> None:
        self.rows += other.rows
        self.widened_rows += other.widened_rows
        self.full_rows += other.full_rows
        self.scored += other.scored

    def fallback_rate(self) -> float:
        return (self.widened_rows + self.full_rows) / max(self.rows, 1)


COUNTS = ScreenCounts()  # every screened encoding in this process adds to it


@dataclass(frozen=True)
class ScreenWeights:
    """An encoder's weights as the screen reads them (prepared once per weights)."""

    w_bf16: torch.Tensor  # d × width, bfloat16
    w_rows: np.ndarray  # width × d float32: W_enc's columns, contiguous
    norm_hat: np.ndarray  # ‖Ŵ_j‖, float32 rounded up
    norm_err: np.ndarray  # ‖W_j − Ŵ_j‖, float32 rounded up
    abs_max: float  # the largest |W_ij|
    signature: tuple[int, ...] = field(repr=False)


_PREPARED: weakref.WeakKeyDictionary[object, ScreenWeights] = weakref.WeakKeyDictionary()


def screen_weights(owner: object, w_enc: torch.Tensor) -> ScreenWeights | None:
    """The prepared weights of `w_enc` (cached on `owner` while the tensor is unchanged);
    None when they are not finite (the screen then stands aside)."""
    signature = (w_enc.data_ptr(), w_enc._version)
    hit = _PREPARED.get(owner)
    if hit is not None and hit.signature == signature:
        return hit
    w = w_enc.detach().to("cpu", torch.float32).contiguous()
    if not bool(torch.isfinite(w).all()):
        return None
    w_bf16 = w.to(torch.bfloat16)
    w64, hat64 = w.double(), w_bf16.double()
    prepared = ScreenWeights(
        w_bf16=w_bf16,
        w_rows=w.T.contiguous().numpy(),
        norm_hat=_up32(hat64.norm(dim=0).numpy()),
        norm_err=_up32((w64 - hat64).norm(dim=0).numpy()),
        abs_max=float(w.abs().max()),
        signature=signature,
    )
    _PREPARED[owner] = prepared
    return prepared


def _up32(values: np.ndarray) -> np.ndarray:
    """float32 values no smaller than the float64 ones."""
    rounded = values.astype(np.float32)
    low = rounded.astype(np.float64) < values
    rounded[low] = np.nextafter(rounded[low], np.float32(np.inf))
    return rounded


def screened_topk_csr(
    x: torch.Tensor, weights: ScreenWeights, bias: np.ndarray, k: int, margin: int = MARGIN
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ScreenCounts]:
    """CSR parts (indptr, indices, values) of the TopK codes of float32 rows x (n × d), and
    how the screen fared; adds to COUNTS too."""
    if x.dtype != torch.float32 or bias.dtype != np.float32:
        raise TypeError("the screen reads float32 inputs and bias")
    width, d = weights.w_rows.shape
    if not 0 < k <= width:
        raise ValueError(f"need 0 < k <= width, got k={k}, width={width}")
    x = x.detach().to("cpu").contiguous()
    n = len(x)
    x_bf16 = scratch("screen-x", (n, d), torch.bfloat16).copy_(x)
    product = scratch("screen-product", (n, width), torch.bfloat16)
    torch.matmul(x_bf16, weights.w_bf16, out=product)
    gamma = d * 2.0**-24 / (1 - d * 2.0**-24)
    indices, values = np.empty((n, k), dtype=np.int32), np.empty((n, k), dtype=np.float32)
    kinds, scored = np.zeros(n, dtype=np.int8), np.zeros(n, dtype=np.int64)
    bias = np.ascontiguousarray(bias)
    bits = (x_bf16.view(torch.int16).numpy(), product.view(torch.int16).numpy())
    inputs = (x.numpy(), *bits, weights.w_rows, bias)
    norms = (weights.norm_hat, weights.norm_err, float(np.abs(bias).max()))
    rule = (k, min(width, k + margin), gamma, UNIT / (1 - UNIT), weights.abs_max)
    outputs = (indices, values, kinds, scored)
    parts = min(torch.get_num_threads(), numba.get_num_threads(), max(1, n // MIN_ROWS_PER_THREAD))
    if parts == 1:
        _screen_rows(*inputs, *norms, *rule, *outputs, 0, n)
    else:
        _screen_parts(*inputs, *norms, *rule, *outputs, parts)
    counts = ScreenCounts(
        rows=len(kinds),
        widened_rows=int((kinds > 0).sum()),
        full_rows=int((kinds < 0).sum()),
        scored=int(scored.sum()),
    )
    COUNTS.add(counts)
    return compact(indices, values), counts


@njit(fastmath={"reassoc", "contract"}, cache=True)
def _dots4(x, w_rows, chosen, m, dots):
    """dots[m : m + 4] = x · W_j for the features chosen[m : m + 4]: `_pairs4`'s four
    independent float32 sums, each in whatever order the compiler vectorises it to."""
    w0, w1 = w_rows[chosen[m]], w_rows[chosen[m + 1]]
    w2, w3 = w_rows[chosen[m + 2]], w_rows[chosen[m + 3]]
    dots[m], dots[m + 1], dots[m + 2], dots[m + 3] = _pairs4(x, x, x, x, w0, w1, w2, w3)


@njit(cache=True)
def _widen_bits(bf16_bits, out):
    """bfloat16 values (as int16 bits) into `out` (uint32) as float32 bits: the high half."""
    for j in range(len(bf16_bits)):  # a flat loop: the compiler vectorises it
        out[j] = np.uint32(np.uint16(bf16_bits[j])) << np.uint32(16)
    return out.view(np.float32)


@njit(fastmath={"reassoc", "contract"}, cache=True)
def _norms(x, x_hat):
    """‖x‖, ‖x̂‖, ‖x − x̂‖ in float64 (summed in any order: off by less than 2⁻⁴⁰ of each,
    far inside the bound's 2⁻²⁰ margins)."""
    nx = nh = ne = 0.0
    for t in range(len(x)):
        a, h = np.float64(x[t]), np.float64(x_hat[t])
        nx += a * a
        nh += h * h
        ne += (a - h) * (a - h)
    return np.sqrt(nx), np.sqrt(nh), np.sqrt(ne)


@njit(cache=True)
def _row_terms(x, x_hat, b_max, nh_max, ne_max, gamma, out_unit, w_max):
    """Float32 (A, B, D, C) with e_j ≤ A‖Ŵ_j‖ + B‖W_j − Ŵ_j‖ + D|s_j| + C for every feature
    of the row, C also covering float32's rounding where upper_j = s_j + b_j + A‖Ŵ_j‖ +
    B‖W_j − Ŵ_j‖ + D|s_j| + C is evaluated (under eight operations, each within 2⁻²⁴ of a
    sum below the bound M, which takes |s_j| ≤ (1 + u)(1 + γ_d)‖x̂‖‖Ŵ_j‖)."""
    nx, nh, ne = _norms(x, x_hat)
    c = gamma * nx  # our own float32 dot's accumulation, times ‖W_j‖ ≤ ‖Ŵ_j‖ + ‖W_j − Ŵ_j‖
    up = 1 + 2.0**-20  # float64's own rounding in these terms
    a = up * (ne + gamma * nh + c)  # x's rounding and the screen's accumulation
    b = up * (nx + c)  # W's rounding
    tiny = up * 2.0**-118 * len(x) * (2.0 + nh + w_max)  # denormals flushed; max|x̂| ≤ ‖x̂‖
    s_bound = up * (1 + 2.0**-8) * (1 + gamma) * nh * nh_max + tiny
    spread = a * nh_max + b * ne_max + up * out_unit * s_bound + tiny  # ≥ |d_j − s_j|
    d = up * (out_unit + 2.0**-24)  # the output's rounding to bfloat16; 2⁻²⁴: the final + b_j
    c0 = tiny + up * 2.0**-24 * (spread + b_max)  # the rest of the final + b_j's rounding
    total = s_bound + b_max + a * nh_max + b * ne_max + d * s_bound + c0
    c0 += 2.0**-21 * total  # float32 evaluation of upper_j
    grow = 1 + 2.0**-20  # a cast to float32 moves a value by at most 2⁻²⁴ of it
    terms = (np.float32(a * grow), np.float32(b * grow), np.float32(d * grow))
    return terms, np.float32(c0 * grow), total < np.inf


@njit(fastmath={"contract"}, cache=True)
def _bounds(s, bias, norm_hat, norm_err, terms, c, upper, blocks, block_top):
    """upper[j] = s_j + b_j + a‖Ŵ_j‖ + b‖W_j − Ŵ_j‖ + d|s_j| + c in float32, an upper bound
    of every value feature j can have, and block_top[k] = the largest upper[j] with
    j ≡ k (mod blocks); False when one is not finite (an inf or NaN among the s_j too)."""
    a, b, d = terms
    finite = True
    for j in range(len(s)):  # flat loops: the compiler vectorises them
        u = s[j] + bias[j] + a * norm_hat[j] + b * norm_err[j] + d * abs(s[j]) + c
        upper[j] = u
        finite &= abs(u) < np.inf
    _block_max(upper, blocks, block_top)
    return finite


@njit(cache=True)
def _block_max(upper, blocks, out):
    """out[k] = the largest of upper[k], upper[k + blocks], upper[k + 2·blocks], …"""
    width = len(upper)
    out[:] = upper[:blocks]
    whole = width - width % blocks
    for start in range(blocks, whole, blocks):
        row = upper[start : start + blocks]
        for k in range(blocks):
            out[k] = max(out[k], row[k])
    for j in range(max(whole, blocks), width):
        out[j - whole] = max(out[j - whole], upper[j])


@njit(cache=True)
def _score(x, w_rows, bias, chosen, count, k, dots, biases, local, out_index, out_value):
    """Score chosen[:count] (sorted by feature) in float32 and keep the top k of them;
    returns the k-th value."""
    whole = count - count % 4
    for m in range(0, whole, 4):
        _dots4(x, w_rows, chosen, m, dots)
    if whole < count:  # the last few through the same four sums: one value per feature
        tail, tail_dots = np.empty(4, dtype=np.int32), np.empty(4, dtype=np.float32)
        for t in range(4):
            tail[t] = chosen[min(whole + t, count - 1)]
        _dots4(x, w_rows, tail, 0, tail_dots)
        dots[whole:count] = tail_dots[: count - whole]
    picks = (biases, local, out_index, out_value)
    return _select_candidates(dots[:count], chosen[:count], bias, k, *picks)


@njit(cache=True)
def _select_candidates(dots, chosen, bias, k, biases, local, out_index, out_value):
    """`_select` over the candidates `chosen` (sorted by feature) by dots + bias, their
    features into out_index (in no order); returns the k-th value."""
    count = len(chosen)
    for m in range(count):
        biases[m] = bias[chosen[m]]
    kth = _select(dots, biases[:count], k, local, out_value)
    for m in range(k):
        out_index[m] = chosen[local[m]]
    return kth


@njit(cache=True)
def _top_ranked(dots, chosen, bias, k, scratch, out_index, out_value):
    """The top k of the candidates `chosen` (sorted by feature) by dots + bias, into
    out_index, out_value in feature order, ReLU'd; returns the k-th value.

    Each value is ranked by counting the larger ones (count² comparisons that vectorise,
    no branch to mispredict: for ~50 candidates half of `_select`'s time), and the
    ranks below k are written out in order. NaN when ranks do not pick exactly k (values
    equal at the k-th place, or a NaN): the caller then uses `_select`, whose rule for
    equal values (the lower index) this one shares wherever it answers."""
    values, picked_index, picked_value = scratch
    count = len(chosen)
    for m in range(count):
        values[m] = dots[m] + bias[chosen[m]]
    taken = 0
    for m in range(count):
        v, above = values[m], np.int32(0)
        for other in range(count):
            above += np.int32(values[other] > v)
        taken += above < k
        picked_index[m] = above  # the rank, until the pass below
    if taken != k:
        return np.float32(np.nan)
    kth, at = np.float32(np.inf), 0
    for m in range(count):  # every candidate written at `at`; only the picks advance it
        keep = picked_index[m] < k
        v = values[m]
        kth = min(kth, v if keep else np.float32(np.inf))
        picked_index[at], picked_value[at] = chosen[m], v if v > 0 else np.float32(0)
        at += keep
    out_index[:k] = picked_index[:k]
    out_value[:k] = picked_value[:k]
    return kth


@njit(cache=True)
def _top_candidates(dots, chosen, bias, k, ranked, biases, local, out_index, out_value):
    """The top k of a row's scored candidates into out_*; returns the k-th value.
    `_top_ranked` where it answers, else `_select` (and `_finish` then orders them)."""
    count = len(chosen)
    if count <= RANKED:
        kth = _top_ranked(dots, chosen, bias, k, ranked, out_index, out_value)
        if kth == kth:
            return kth
    return _select_candidates(dots, chosen, bias, k, biases, local, out_index, out_value)


@njit(cache=True)
def _sort_ints(values, count):
    for a in range(1, count):
        v = values[a]
        b = a - 1
        while b >= 0 and values[b] > v:
            values[b + 1] = values[b]
            b -= 1
        values[b + 1] = v


@njit(cache=True)
def _widen(upper, kth, chosen, count, member):
    """Add every feature not yet chosen whose bound reaches kth; returns the new count."""
    for m in range(count):
        member[chosen[m]] = True
    added = count
    for j in range(len(upper)):
        if not member[j] and upper[j] >= kth:
            chosen[added] = j
            added += 1
    for m in range(count):
        member[chosen[m]] = False
    _sort_ints(chosen, added)
    return added


@njit(fastmath={"reassoc", "contract"}, cache=True)
def _pairs4(x0, x1, x2, x3, w0, w1, w2, w3):
    """x0 · w0, x1 · w1, x2 · w2, x3 · w3: four independent float32 sums (`_dots4` passes
    one x four times), so a value is summed in the same order wherever it is scored."""
    t0 = t1 = t2 = t3 = np.float32(0)
    for t in range(len(x0)):
        t0 += x0[t] * w0[t]
        t1 += x1[t] * w1[t]
        t2 += x2[t] * w2[t]
        t3 += x3[t] * w3[t]
    return t0, t1, t2, t3


@njit(cache=True)
def _score_block(x, w_rows, chosen, offsets, dots, starts, entry_row, entry_at):
    """dots[e] = x[r] · W_j for j = chosen[e], e in offsets[r]..offsets[r + 1], for a block
    of rows (each row's candidates side by side in chosen).

    Scored per row, each row fetches ~50 scattered columns of W (megabytes, beyond the
    cache) again; here the block's (row, candidate) pairs are sorted by feature, so a
    column comes from memory once per block and its rows' x stay in cache. Each value is
    the sum `_dots4` computes, in the same order. `starts` holds width + 1 counters;
    entry_row, entry_at a slot per pair."""
    width = len(starts) - 1
    starts[:] = 0
    for e in range(offsets[-1]):
        starts[chosen[e] + 1] += 1
    for j in range(width):
        starts[j + 1] += starts[j]
    for r in range(len(offsets) - 1):  # rows in order: each feature's pairs by row
        for e in range(offsets[r], offsets[r + 1]):
            slot = starts[chosen[e]]
            entry_row[slot], entry_at[slot] = r, e
            starts[chosen[e]] = slot + 1
    pairs = offsets[-1]
    for e in range(0, pairs, 4):  # by feature: each W_j read from cache for its rows
        a0, a1 = entry_at[e], entry_at[min(e + 1, pairs - 1)]  # the last group repeats
        a2, a3 = entry_at[min(e + 2, pairs - 1)], entry_at[min(e + 3, pairs - 1)]
        r0, r1 = entry_row[e], entry_row[min(e + 1, pairs - 1)]
        r2, r3 = entry_row[min(e + 2, pairs - 1)], entry_row[min(e + 3, pairs - 1)]
        w0, w1, w2, w3 = (
            w_rows[chosen[a0]],
            w_rows[chosen[a1]],
            w_rows[chosen[a2]],
            w_rows[chosen[a3]],
        )
        t0, t1, t2, t3 = _pairs4(x[r0], x[r1], x[r2], x[r3], w0, w1, w2, w3)
        dots[a0], dots[a1], dots[a2], dots[a3] = t0, t1, t2, t3


@njit(cache=True)
def _prepare(screened_row, x_row, x_hat_row, bias, norm_hat, norm_err, terms, bits, upper,
             blocks, block_top):  # fmt: skip
    """The row's bounds into upper and block_top (inputs as bfloat16 bits: s_j and x̂);
    False when an input or a bound is not finite."""
    b_max, nh_max, ne_max, gamma, out_unit, w_max = terms
    x_hat = _widen_bits(x_hat_row, bits[: len(x_hat_row)])  # used before s overwrites it
    row_terms, c, finite = _row_terms(x_row, x_hat, b_max, nh_max, ne_max, gamma, out_unit, w_max)
    if not finite:
        return False
    s = _widen_bits(screened_row, bits[: len(screened_row)])
    return _bounds(s, bias, norm_hat, norm_err, row_terms, c, upper, blocks, block_top)


BLOCK = 256  # rows whose candidates are scored together (their x stays in cache)


@njit(nogil=True, cache=True)
def _screen_rows(
    x, x_hat, screened, w_rows, bias, norm_hat, norm_err, b_max, k, c, gamma, out_unit, w_max,
    indices, values, kinds, scored, lo, hi,
):  # fmt: skip
    """Rows lo..hi into (indices, values, kinds, scored); kind 0: settled by the
    candidates, 1: widened, -1: scored in full; scored: the float32 dot products it took.
    A block of rows at a time: bounds and candidates per row, the candidates' dots for the
    whole block (`_score_block`), then each row's top k and, where needed, its widening."""
    width = screened.shape[1]
    bits = np.empty(max(width, x.shape[1]), dtype=np.uint32)  # s_j, or x̂ before them
    upper = np.empty(width, dtype=np.float32)
    blocks = -(-width // max(1, min(ROWS, width // c)))
    block_top = np.empty(blocks, dtype=np.float32)
    cut = _normal_cut(c / blocks)  # the share of blocks the candidates' floor leaves above
    chosen = np.empty(width + blocks, dtype=np.int32)  # block ids, then features
    dots = np.empty(width, dtype=np.float32)
    biases = np.empty(width, dtype=np.float32)
    local = np.empty(k, dtype=np.int32)
    member = np.zeros(width, dtype=np.bool_)
    ranked = (np.empty(RANKED, np.float32), np.empty(RANKED + 1, np.int32),
              np.empty(RANKED + 1, np.float32))  # fmt: skip
    terms = (b_max, np.float64(norm_hat.max()), np.float64(norm_err.max()), gamma, out_unit,
             w_max)  # fmt: skip
    rows = min(BLOCK, max(hi - lo, 1))
    block_chosen = np.empty(rows * width, dtype=np.int32)  # row after row, side by side
    block_dots = np.empty(rows * width, dtype=np.float32)
    offsets = np.zeros(rows + 1, dtype=np.int64)
    full = np.empty(rows, dtype=np.bool_)
    floors = np.empty(rows, dtype=np.float32)  # rounding is monotone: θ ≥ kth stays so
    starts = np.empty(width + 1, dtype=np.int64)
    entry_row = np.empty(rows * width, dtype=np.int32)
    entry_at = np.empty(rows * width, dtype=np.int32)
    for first in range(lo, hi, rows):
        last = min(first + rows, hi)
        for i in range(first, last):  # bounds and candidates
            r, at = i - first, offsets[i - first]
            inputs = (screened[i], x[i], x_hat[i], bias, norm_hat, norm_err, terms, bits)
            full[r] = not _prepare(*inputs, upper, blocks, block_top)
            count = 0
            if not full[r]:
                count, floors[r] = _candidates(upper, blocks, c, block_top, chosen, cut)
                block_chosen[at : at + count] = chosen[:count]
            offsets[r + 1] = at + count
        n_rows = last - first
        _score_block(x[first:last], w_rows, block_chosen, offsets[: n_rows + 1], block_dots,
                     starts, entry_row, entry_at)  # fmt: skip
        for i in range(first, last):  # each row's top k; widened or in full where needed
            r, at = i - first, offsets[i - first]
            count = offsets[r + 1] - at
            scratch = (dots, biases, local, indices[i], values[i])
            finite = not full[r]
            if finite:
                picks = (block_dots[at : at + count], block_chosen[at : at + count], bias, k)
                kth = _top_candidates(*picks, ranked, biases, local, indices[i], values[i])
                scored[i] = count
                finite = abs(kth) < np.inf
                if finite and not floors[r] < kth:
                    inputs = (screened[i], x[i], x_hat[i], bias, norm_hat, norm_err, terms, bits)
                    _prepare(*inputs, upper, blocks, block_top)  # as before: finite
                    chosen[:count] = block_chosen[at : at + count]
                    wider = _widen(upper, kth, chosen, count, member)
                    if wider > count:  # else no feature left out reaches kth: settled
                        _score(x[i], w_rows, bias, chosen, wider, k, *scratch)
                        kinds[i], scored[i] = 1, scored[i] + wider
            if not finite:
                for j in range(width):
                    chosen[j] = j
                _score(x[i], w_rows, bias, chosen, width, k, *scratch)
                kinds[i], scored[i] = -1, scored[i] + width
            _finish(k, indices[i], values[i])


@njit(parallel=True, cache=True)
def _screen_parts(
    x, x_hat, screened, w_rows, bias, norm_hat, norm_err, b_max, k, c, gamma, out_unit, w_max,
    indices, values, kinds, scored, parts,
):  # fmt: skip
    """`_screen_rows` over `parts` equal slices of the rows at once. numba's OpenMP layer
    (its default where TBB is not installed) runs them on the GNU OpenMP pool torch uses:
    its threads, still spinning after the encoder's product, take the slices at once
    (threads of our own waited for those cores: a fifth more time on 2 cores)."""
    n = x.shape[0]
    for p in prange(parts):
        _screen_rows(x, x_hat, screened, w_rows, bias, norm_hat, norm_err, b_max, k, c, gamma,
                     out_unit, w_max, indices, values, kinds, scored, n * p // parts,
                     n * (p + 1) // parts)  # fmt: skip
