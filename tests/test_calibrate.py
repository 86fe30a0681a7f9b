"""Calibration of τ: the threshold rule by hand, and on planted models end to end."""

from __future__ import annotations

import numpy as np

from coact.calibrate import candidate_taus, pick_tau
from coact.linearity import SEED_TAU


def test_candidate_taus_span_all_mlp_to_all_linear() -> None:
    d = np.array([0.004, 0.0, 0.002, 0.01, np.nan])
    taus = candidate_taus(d, n_taus=2)
    # One under every d, the quantiles 0, ½, 1 (0, 0.003, 0.01) and the seed's 0.001.
    assert taus[0] < 0.0 and (d[np.isfinite(d)] > taus[0]).all()
    np.testing.assert_allclose(taus[1:], [0.0, SEED_TAU, 0.003, 0.01])
    assert (np.diff(taus) > 0).all()


def test_pick_tau_is_the_largest_with_every_smaller_one_within_tolerance() -> None:
    taus = np.array([-1.0, 0.0, 0.001, 0.003, 0.01])
    extra = np.array([0.0, 0.002, 0.004, 0.02, 0.005])  # 0.003 breaks it; 0.01 is not reached
    assert pick_tau(taus, extra, tolerance=0.005) == 0.001
    assert pick_tau(taus[::-1], extra[::-1], tolerance=0.005) == 0.001  # order-free
    assert pick_tau(taus, extra, tolerance=0.1) == 0.01
    assert pick_tau(taus, np.full(5, 0.5), tolerance=0.1) == -1.0  # nothing passes: all mlp
