"""How a target's activation follows one input's magnitude on that input's one-input row:
straight (a sum's term), curved (a square) or rising then falling (non-monotone)."""

from __future__ import annotations

import numpy as np

from coact.logic.config import LogicConfig


def _sse(gram: np.ndarray, rhs: np.ndarray, syy: np.ndarray) -> np.ndarray:
    """Σy² − bᵀG⁻¹b: the residual sum of squares of a least-squares fit from its normal
    equations (stacked), NaN where G is singular."""
    out = np.full(syy.shape, np.nan)
    det = np.linalg.det(gram)
    ok = np.abs(det) > 1e-12 * np.abs(gram).max(axis=(-2, -1)) ** gram.shape[-1]
    if ok.any():
        sol = np.linalg.solve(gram[ok], rhs[ok][..., None])[..., 0]
        out[ok] = syy[ok] - (sol * rhs[ok]).sum(-1)
    return out


def curvature(moments: np.ndarray, config: LogicConfig) -> tuple[np.ndarray, np.ndarray]:
    """(gain, curved) per target and input from the moments (n, Σu, Σu², Σu³, Σu⁴, Σy, Σuy,
    Σu²y, Σy²) of the active tokens of its one-input row: gain is the share of the affine
    fit's residual (y = a + b·u) that a square term removes; curved when it reaches
    `curvature_cut` and its F statistic (1 and n − 3 degrees of freedom) `min_g`."""
    n, s1, s2, s3, s4, sy, sxy, sx2y, syy = np.moveaxis(moments, -1, 0)
    affine = np.stack([np.stack([n, s1], -1), np.stack([s1, s2], -1)], -2)
    quad = np.stack(
        [np.stack([n, s1, s2], -1), np.stack([s1, s2, s3], -1), np.stack([s2, s3, s4], -1)], -2
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        sse_a = _sse(affine, np.stack([sy, sxy], -1), syy)
        sse_q = np.maximum(_sse(quad, np.stack([sy, sxy, sx2y], -1), syy), 0.0)
        drop = np.maximum(sse_a - sse_q, 0.0)
        gain = np.where(sse_a > 1e-9 * syy, drop / sse_a, 0.0)  # an exact line: 0
        gain = np.where(np.isnan(sse_a), np.nan, gain)
        f = drop / (sse_q / np.maximum(n - 3, 1))
    enough = n >= config.min_tokens
    gain = np.where(enough, gain, np.nan)
    curved = enough & (np.nan_to_num(gain) >= config.curvature_cut)
    return gain, curved & (np.nan_to_num(f, nan=np.inf, posinf=np.inf) >= config.min_g)


def non_monotone(tertiles: np.ndarray, config: LogicConfig) -> np.ndarray:
    """Per target and input: the mean activation (zeros included) over the middle tertile of
    the input's values exceeds both outer tertiles' by `nonmonotone_cut` of the larger, and
    by three standard errors (tokens as units), each tertile with `min_tokens` tokens."""
    n, _, sy, syy = np.moveaxis(tertiles, -1, 0)  # (T, K, 3)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sy / n
        var = np.maximum(syy / n - mean**2, 0.0) / np.maximum(n - 1, 1)
    enough = (n >= config.min_tokens).all(-1)
    side = np.where(mean[..., 0] >= mean[..., 2], 0, 2)[..., None]
    m_side = np.take_along_axis(mean, side, -1)[..., 0]
    v_side = np.take_along_axis(var, side, -1)[..., 0]
    rise = mean[..., 1] - m_side
    with np.errstate(invalid="ignore", divide="ignore"):
        z = rise / np.sqrt(var[..., 1] + v_side)
    big = rise > config.nonmonotone_cut * m_side
    return enough & big & (np.nan_to_num(z, nan=0.0, posinf=np.inf) >= 3.0) & (rise > 0)
