"""Linearity metrics pinned by hand-computed examples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from coact.linearity.table import LinearityConfig, linearity_table, percent_linear, seed_scale


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
    given = {k: v for k, v in share.to_dict().items() if v is not None}
    assert given == {"percent_linear": 100 * 2 / 3, "linear": 2, "nonlinear": 1, "dead": 1,
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
    assert math.isnan(share.percent_linear) and share.dead == 3 and share.alive == 0


def test_feature_stats_by_hand() -> None:
    import scipy.sparse as sp

    from coact.linearity.table import feature_stats

    codes = sp.csr_matrix(np.array([[1.0, 0.0, 0.0], [3.0, 2.0, 0.0]]))
    active, mean, variance = feature_stats(codes)
    assert active.tolist() == [2, 1, 0]
    assert mean.tolist() == [2.0, 1.0, 0.0]
    assert variance.tolist() == [1.0, 1.0, 0.0]  # (1 + 9)/2 − 4 = 1; (0 + 4)/2 − 1 = 1


def test_bootstrap_replicate_is_the_resampled_ratio_by_hand() -> None:
    from coact.linearity.table import HeldoutContexts

    # Context 0: 2 tokens with Σ(e_lin² − e_mlp²) = 0.4; context 1: 3 tokens, 0.9.
    contexts = HeldoutContexts(diff=np.array([[0.4], [0.9]]), tokens=np.array([2.0, 3.0]))
    reps = contexts.replicates(200, seed=1)
    # Any resample (k copies of context 0, 2 − k of context 1) gives one of three values.
    by_hand = {(k * 0.4 + (2 - k) * 0.9) / (k * 2 + (2 - k) * 3) for k in range(3)}
    assert {round(v, 12) for v in reps[:, 0]} == {round(v, 12) for v in by_hand}
    counts = np.random.default_rng(1).multinomial(2, [0.5, 0.5], size=200)
    brute = [(c @ contexts.diff[:, 0]) / (c @ contexts.tokens) for c in counts]
    np.testing.assert_allclose(reps[:, 0], brute)


def test_verdict_needs_the_whole_interval_on_one_side_of_tau() -> None:
    from coact.linearity.table import HeldoutContexts, relabel

    tokens = np.full(40, 10.0)
    # Feature 0: every context gains 0.0001 per token (tight, under τ); feature 1: 0.01
    # per token (tight, over τ); feature 2: mean 0.001 but ±0.05 between contexts; dead 3.
    noisy = 0.001 + 0.05 * np.resize([1.0, -1.0], 40)
    diff = np.stack([np.full(40, 0.0001), np.full(40, 0.01), noisy, np.zeros(40)], 1) * 10
    contexts = HeldoutContexts(diff=diff, tokens=tokens)
    d = diff.sum(0) / tokens.sum()
    config = LinearityConfig(tau=0.001, form="raw", n_boot=300)
    table = linearity_table(
        mse_linear=d + 1.0, mse_mlp=np.ones(4), variance=np.array([1.0, 1.0, 1.0, 0.0]),
        active_count=np.array([9, 9, 9, 0]), config=config, contexts=contexts,
    )  # fmt: skip
    assert table["verdict"].to_list() == ["linear", "nonlinear", "undecided", "dead"]
    np.testing.assert_allclose(table["d_low"][:2].to_numpy(), [0.0001, 0.01])
    share = percent_linear(table)
    assert (share.confident_linear, share.confident_nonlinear, share.undecided) == (
        1,
        1,
        1,
    )
    assert share.mlp_gain_beyond_noise == 2 and share.mlp_loss_beyond_noise == 0
    # Feature 2 could be either: between 1/3 and 2/3 of the alive features are linear.
    assert share.percent_linear_confident == pytest.approx(100 / 3)
    assert share.percent_linear_possible == pytest.approx(200 / 3)
    # Just above feature 1's d (τ = 0.011; at exactly 0.01 its bootstrap replicates sit
    # within rounding of τ) both tight features are confidently linear; the noisy one is not.
    looser = relabel(table, LinearityConfig(tau=0.011, form="raw"))
    assert looser["verdict"].to_list() == ["linear", "linear", "undecided", "dead"]
