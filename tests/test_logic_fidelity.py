"""Label fidelity and what labels rest on: magnitude tests, the superadditive ratio,
context resampling, the held-out AUC, coverage by a greedy search, and supernodes — each
against a hand-computed or brute-force answer."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score

from coact.logic.config import LogicConfig
from coact.logic.contexts import _auc
from coact.logic.counts import _Codes
from coact.logic.cover import Pool, _Rows, grow
from coact.logic.feature import label_feature
from coact.logic.layer import label_layer
from coact.logic.magnitude import curvature
from coact.logic.supernodes import supernodes

N = 4000


def _pair(seed: int = 0, rate: float = 0.1, both: float = 0.05) -> tuple:
    """Two inputs with values in [0.5, 1.5], coupled by a shared cause."""
    rng = np.random.default_rng(seed)
    cause = rng.random(N) < both
    a_on, b_on = (rng.random(N) < rate) | cause, (rng.random(N) < rate) | cause
    return a_on * rng.uniform(0.5, 1.5, N), b_on * rng.uniform(0.5, 1.5, N)


def test_curvature_matches_polynomial_fits() -> None:
    rng = np.random.default_rng(0)
    u = rng.uniform(0.5, 2.0, 300)
    y = u**2 + 0.3 * rng.standard_normal(300)
    moments = np.array([[[300, *(np.sum(u**p) for p in (1, 2, 3, 4)), y.sum(),
                          (u * y).sum(), (u * u * y).sum(), (y * y).sum()]]])  # fmt: skip
    gain, curved = curvature(moments, LogicConfig())
    sse = [np.sum((np.polyval(np.polyfit(u, y, d), u) - y) ** 2) for d in (1, 2)]
    assert gain[0, 0] == pytest.approx((sse[0] - sse[1]) / sse[0], rel=1e-6)
    assert not curved[0, 0]  # noisy: the square term removes only a few % of the residual
    exact = moments.copy()
    exact[..., 5:] = [(u**2).sum(), (u**3).sum(), (u**4).sum(), (u**4).sum()]
    gain, curved = curvature(exact, LogicConfig())
    assert gain[0, 0] == pytest.approx(1.0) and curved[0, 0]


def test_square_is_curved_and_a_straight_sum_is_not() -> None:
    a, b = _pair()
    square = label_feature(np.stack([a, b], 1), a**2 + b**2)
    assert square.label == "NONLINEAR" and square.features["kind"][0] == "curved"
    assert min(square.features["curvature"][0]) > 0.9
    line = label_feature(np.stack([a, b], 1), a + b)
    assert line.label == "WEIGHTED-SUM" and max(line.features["curvature"][0]) < 0.05


def test_a_gain_that_multiplies_is_superadditive_not_a_sum() -> None:
    a, b = _pair()
    y = a * (1 + 1.5 * b)
    result = label_feature(np.stack([a, b], 1), y)
    assert result.label == "NONLINEAR" and result.features["kind"][0] == "superadditive"
    assert result.inputs == [0, 1]  # B changes only the magnitude: kept, not pruned
    # By hand: β_A from A's one-input row (β_B = 0), ratio Σy / Σ β_A·a over rows with both.
    alone, together = (a > 0) & (b == 0), (a > 0) & (b > 0)
    beta = (a[alone] * y[alone]).sum() / (a[alone] ** 2).sum()
    assert result.features["ratio"][0] == pytest.approx(
        y[together].sum() / (beta * a[together]).sum(), rel=1e-5
    )


def test_a_band_is_non_monotone() -> None:
    rng = np.random.default_rng(1)
    a = (rng.random(N) < 0.3) * rng.uniform(0.5, 1.5, N)
    y = np.where((a > 0.83) & (a < 1.17), a, 0.0)
    result = label_feature(a[:, None], y)
    assert result.label == "NONLINEAR" and result.features["kind"][0] == "non-monotone"


def test_confidence_resamples_contexts_not_tokens() -> None:
    """20 contexts of A's tokens, the target all on or all off within each: 12 of 20 on,
    so P(fires | A) = 0.6. Counting tokens, that rests on 400 tokens; it rests on 20."""
    tokens_per_context, n_ctx = 20, 20
    contexts = np.repeat(np.arange(200), tokens_per_context)  # 4000 tokens
    a = np.zeros(len(contexts))
    on_ctx = np.arange(n_ctx) * 10  # A is active in every token of 20 contexts
    a[np.isin(contexts, on_ctx)] = 1.0
    fires = np.isin(contexts, on_ctx[:12])
    y = a * fires
    x, target = sp.csr_matrix(a[:, None]), sp.csr_matrix(y[:, None])
    weights = pl.DataFrame({"output": [0], "input": [0], "weight_refit": [1.0],
                            "standardised": [1.0]})  # fmt: skip
    config = LogicConfig(prune=False, complete=False)
    by_token = label_layer(x, target, weights, config, progress=False)
    by_context = label_layer(x, target, weights, config, progress=False, contexts=contexts)
    assert by_token.features["label"][0] == by_context.features["label"][0] == "WEIGHTED-SUM"
    assert by_token.features["confidence"][0] > 0.99
    assert 0.6 < by_context.features["confidence"][0] < 0.95


def test_auc_of_row_scores_matches_scikit_learn() -> None:
    rng = np.random.default_rng(2)
    train, test = rng.integers(0, 50, (1, 8)), rng.integers(0, 50, (1, 8))
    score = (train[0, 1::2] + train[0, 1::2].sum() / train.sum()) / (
        train[0, 0::2] + train[0, 1::2] + 1
    )
    labels, scores, weights = [], [], []
    for r in range(4):
        for active in (0, 1):
            labels.append(active)
            scores.append(score[r])
            weights.append(test[0, 2 * r + active])
    expected = roc_auc_score(labels, scores, sample_weight=weights)
    assert _auc(train.astype(float), test.astype(float))[0] == pytest.approx(expected)


def test_greedy_coverage_matches_brute_force() -> None:
    rng = np.random.default_rng(3)
    x = sp.random(3000, 30, density=0.08, format="csr", random_state=4, dtype=np.float32)
    drive = np.asarray(x[:, :6].sum(axis=1)).ravel() + (rng.random(3000) < 0.01)
    y = sp.csr_matrix((drive * (drive > 0.4))[:, None].astype(np.float32))
    config = LogicConfig(min_lift=1.5, coverage_target=0.95)
    xc, yc = _Codes.of(x, config.floor), _Codes.of(y, config.floor)
    weights = pl.DataFrame({"output": [0] * 30, "input": list(range(30)),
                            "weight_refit": [1.0] * 30})  # fmt: skip
    pool = Pool.of(np.array([0]), weights, None, config)
    chosen, curve = grow(_Rows.of(x, xc), xc, yc, np.array([0]), np.full((1, 0), -1),
                         pool, config, 10)  # fmt: skip
    # brute force: the same greedy over dense arrays
    on = x.toarray() > xc.floors[None, :]
    v = y.toarray().ravel()
    fire = v > yc.floors[0]
    lift = (on[fire].sum(0) / np.maximum(on.sum(0), 1)) / fire.mean()
    covered, picks, shares = np.zeros(len(v), bool), [], [0.0]
    while shares[-1] < 0.95 and len(picks) < 10:
        gains = [(v * (fire & ~covered & on[:, i])).sum() if lift[i] >= 1.5 and i not in picks
                 else 0.0 for i in range(30)]  # fmt: skip
        if max(gains) <= 0:
            break
        picks.append(int(np.argmax(gains)))
        covered |= on[:, picks[-1]]
        shares.append(v[fire & covered].sum() / v[fire].sum())
    assert chosen[0][chosen[0] >= 0].tolist() == picks
    np.testing.assert_allclose(curve[0, : len(shares)], shares, rtol=1e-5)


def test_supernodes_group_shared_inputs_and_computation() -> None:
    a, b = _pair(seed=5)
    c, d = _pair(seed=6)
    y = np.stack([np.maximum(a, b), np.maximum(1.2 * a, b), np.maximum(a, 0.8 * b),
                  np.maximum(c + d - 1.3, 0), np.maximum(c + d - 1.2, 0), a + c], 1)  # fmt: skip
    features = pl.DataFrame({
        "output": np.arange(6), "label": ["OR"] * 3 + ["AND"] * 2 + ["WEIGHTED-SUM"],
        "kind": [None] * 6, "inputs": [[0, 1]] * 3 + [[2, 3]] * 2 + [[0, 2]],
    }, schema_overrides={"kind": pl.String})  # fmt: skip
    groups = supernodes(features, sp.csr_matrix(y))
    assert groups["members"].to_list() == [[0, 1, 2], [3, 4]]
    assert groups["shared_inputs"].to_list() == [[0, 1], [2, 3]]
    assert groups["label"].to_list() == ["OR", "AND"]
    # By hand: the Jaccard of the firing tokens (above a tenth of the median) of outputs 3, 4.
    f3, f4 = (y[:, j] > 0.1 * np.median(y[y[:, j] > 0, j]) for j in (3, 4))
    assert groups["mean_coactivation"][1] == pytest.approx((f3 & f4).sum() / (f3 | f4).sum())
