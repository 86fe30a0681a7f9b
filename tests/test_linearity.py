"""Linearity metrics pinned by hand-computed examples."""

from __future__ import annotations

import math

import numpy as np

from coact.linearity import LinearityConfig, linearity_table, percent_linear, seed_scale


def test_hand_computed_table_and_share() -> None:
    # Four features: linear (d = 0.0005), nonlinear (d = 0.02), dead (never active),
    # and one where the linear fit is better than the MLP (d < 0: linear).
    table = linearity_table(
        mse_linear=np.array([0.0105, 0.05, 0.0, 0.010]),
        mse_mlp=np.array([0.0100, 0.03, 0.0, 0.012]),
        variance=np.array([0.5, 0.2, 0.0, 0.1]),
        active_count=np.array([40, 12, 0, 7]),
        config=LinearityConfig(tau=0.001, form="raw"),
    )
    assert table["status"].to_list() == ["linear", "nonlinear", "dead", "linear"]
    d_fvu = table["d_fvu"].to_list()
    assert math.isclose(d_fvu[0], 0.0005 / 0.5) and math.isclose(d_fvu[1], 0.02 / 0.2)
    assert math.isnan(d_fvu[2])
    share = percent_linear(table)
    assert share == {"percent_linear": 100 * 2 / 3, "linear": 2, "nonlinear": 1, "dead": 1,
                     "alive": 3}  # fmt: skip


def test_seed_normalisation_by_hand() -> None:
    # Layer norm 4, smallest layer norm 2: MSEs scale by (2/4)² = 0.25.
    assert seed_scale(4.0, 2.0) == 0.25
    table = linearity_table(
        np.array([0.006]), np.array([0.002]), np.array([1.0]), np.array([5]),
        layer_norm=4.0, min_layer_norm=2.0, config=LinearityConfig(tau=0.001, form="seed"),
    )  # fmt: skip
    assert math.isclose(table["d_seed"][0], 0.004 * 0.25)
    assert table["status"][0] == "linear"  # 0.001 ≤ τ; raw d = 0.004 would not be
    raw = linearity_table(np.array([0.006]), np.array([0.002]), np.array([1.0]), np.array([5]),
                          config=LinearityConfig(tau=0.001, form="raw"))  # fmt: skip
    assert raw["status"][0] == "nonlinear"


def test_all_dead_layer_has_no_share() -> None:
    table = linearity_table(np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(3, dtype=int))
    share = percent_linear(table)
    assert math.isnan(share["percent_linear"]) and share["dead"] == 3 and share["alive"] == 0


def test_feature_stats_by_hand() -> None:
    import scipy.sparse as sp

    from coact.linearity import feature_stats

    codes = sp.csr_matrix(np.array([[1.0, 0.0, 0.0], [3.0, 2.0, 0.0]]))
    active, mean, variance = feature_stats(codes)
    assert active.tolist() == [2, 1, 0]
    assert mean.tolist() == [2.0, 1.0, 0.0]
    assert variance.tolist() == [1.0, 1.0, 0.0]  # (1 + 9)/2 − 4 = 1; (0 + 4)/2 − 1 = 1
