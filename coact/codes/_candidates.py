"""The bfloat16 screen's candidate search (`screen`): a floor under a row's block maxima,
and the features of the blocks that reach it.

Feature j lies in block j mod `blocks`; each block's largest bound is its maximum. Any
floor with at least m block maxima at or above it gives at least m candidates, and every
feature left out is below it: the floor's value only decides how many are scored.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True)
def _count_at_least(values, floor):
    count = np.int32(0)  # an int32 sum vectorises; numba's default int64 one does not
    for j in range(len(values)):
        count += np.int32(values[j] >= floor)
    return count


@njit(fastmath=True, cache=True)
def _spread(values):
    """Mean and standard deviation of finite values (float64 sums, in any order)."""
    total = squares = 0.0
    for j in range(len(values)):
        v = np.float64(values[j])
        total += v
        squares += v * v
    mean = total / len(values)
    return mean, np.sqrt(max(squares / len(values) - mean * mean, 0.0))


@njit(cache=True)
def _normal_cut(share):
    """z with P(Z ≥ z) = share for a standard normal Z, and the density there (Newton;
    shares are kept within 10⁻⁶ of 0 and 1, z within ±5)."""
    share, z = min(max(share, 1e-6), 1 - 1e-6), 0.0
    for _ in range(60):
        density = math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
        z = min(max(z + (0.5 * math.erfc(z / math.sqrt(2.0)) - share) / density, -5.0), 5.0)
    return z, math.exp(-z * z / 2) / math.sqrt(2 * math.pi)


@njit(cache=True)
def _floor(block_top, m, cut):
    """A value θ with at least m of block_top at or above it, and not many more.

    A row's block maxima spread alike from row to row: θ starts where a normal spread of
    them would leave m above (mean + z·sd, `cut` = (z, the density there)) and moves by
    secant steps on the count (the normal density's slope), inside the bracket of values
    whose counts are known to be above and below m. Each count is one vectorised pass;
    about two are needed (a histogram took six times as long). The least value, every
    block reaching it, where no step settles. The values are finite (`_bounds`)."""
    n = len(block_top)
    if m >= n:
        return block_top.min()
    mean, sd = _spread(block_top)
    z, density = cut
    slope = n * density / sd if sd > 0 else np.inf  # counts per unit of θ near the cut
    low, high, theta = -np.inf, np.inf, mean + z * sd
    for _ in range(40):
        count = _count_at_least(block_top, theta)
        if count >= m:
            low = theta
            if count <= m + m // 8:
                return theta
        else:
            high = theta
        step = theta + (count - (m + m // 16)) / slope
        if not low < step < high:  # outside the bracket: halve it, or widen by a sd
            inside = low > -np.inf and high < np.inf
            step = low + (high - low) / 2 if inside else theta + (sd if count >= m else -sd)
        if step == theta or not low <= step <= high:
            break
        theta = step
    return low if low > -np.inf else block_top.min()


@njit(cache=True)
def _candidates(upper, blocks, m, block_top, chosen, cut):
    """Candidates into chosen (sorted); returns (their count, the floor θ they reach).

    Feature j lies in block j mod `blocks`. A floor θ is put under the m-th largest of the
    blocks' maxima; the candidates are the features at or above θ in the blocks that reach
    it (at least m of them). Every other feature is below θ, which is returned with them:
    once the k-th candidate value exceeds θ, no feature left out can enter the top k."""
    width = len(upper)
    floor = _floor(block_top, m, cut)
    reached = 0
    for b in range(blocks):  # the blocks that reach the floor, in order
        chosen[reached] = b
        reached += block_top[b] >= floor
    count = reached
    for start in range(0, width - blocks + 1, blocks):  # their features, in index order
        for q in range(reached):
            j = start + chosen[q]
            chosen[count] = j
            count += upper[j] >= floor
    for q in range(reached):  # the last, partial row of the grid
        j = width - width % blocks + chosen[q]
        if width % blocks and j < width:
            chosen[count] = j
            count += upper[j] >= floor
    count -= reached
    for q in range(count):  # forward: each read is ahead of the write
        chosen[q] = chosen[reached + q]
    return count, floor
