"""Logic labels on hand-built examples: truth tables, mutual information, rules, clusters."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from sklearn.metrics import mutual_info_score

from coact.logic.config import LogicConfig
from coact.logic.counts import activation_floors, information, mutual_information
from coact.logic.feature import clusters, label_feature, truth_table
from coact.logic.hidden import hidden_targets
from coact.logic.layer import label_layer

N = 4000


def _pair(seed: int = 0, rate: float = 0.1, both: float | None = None) -> tuple:
    """Two sparse inputs with values in [0.8, 1.2]; `both`: P(A ∧ B) if they are coupled."""
    rng = np.random.default_rng(seed)
    a_on = rng.random(N) < rate
    b_on = rng.random(N) < rate
    if both is not None:  # a shared cause makes them fire together
        cause = rng.random(N) < both
        a_on |= cause
        b_on |= cause
    a = a_on * rng.uniform(0.8, 1.2, N)
    b = b_on * rng.uniform(0.8, 1.2, N)
    return a, b


def _h(p: float) -> float:
    return -sum(q * math.log2(q) for q in (p, 1 - p) if q > 0)


# --- truth tables ------------------------------------------------------------------------


def test_truth_table_counts_by_hand() -> None:
    # 8 tokens; A on tokens 0–3, B on 2–5; target on 1, 2, 3 (values 1, 2, 4) and 6 (0.5).
    a = np.array([1, 1, 1, 1, 0, 0, 0, 0], float)
    b = np.array([0, 0, 1, 1, 1, 1, 0, 0], float)
    y = np.array([0, 1, 2, 4, 0, 0, 0.5, 0], float)
    table = truth_table(np.stack([a, b], 1), y, floor=0.1, names=["A", "B"]).sort("pattern")
    assert table["pattern"].to_list() == ["00", "01", "10", "11"]
    assert table["A"].to_list() == [False, False, True, True]
    assert table["B"].to_list() == [False, True, False, True]
    assert table["count"].to_list() == [2, 2, 2, 2]
    assert table["n_active"].to_list() == [1, 0, 1, 2]
    assert table["p_active"].to_list() == [0.5, 0.0, 0.5, 1.0]
    assert table["mean_activation"].to_list() == [0.25, 0.0, 0.5, 3.0]
    assert table["mean_activation_when_active"].to_list()[2:] == [1.0, 3.0]


def test_floor_counts_slivers_as_inactive() -> None:
    # Median active value of A is 1; 0.05 is under its floor of 0.1 and counts as off.
    a = np.array([1.0, 1.0, 1.0, 0.05, 0.0])
    y = np.array([1.0, 1.0, 1.0, 1.0, 0.0])
    np.testing.assert_allclose(activation_floors(sp.csc_matrix(a[:, None]), 0.1), [0.1])
    table = truth_table(a[:, None], y, floor=0.1).sort("pattern")
    assert table["count"].to_list() == [2, 3]  # token 3 joins the empty row
    assert table["n_active"].to_list() == [1, 3]


# --- mutual information ------------------------------------------------------------------


def test_mutual_information_by_hand() -> None:
    assert mutual_information(np.array([[5, 0], [0, 5]])) == pytest.approx(1.0)
    assert mutual_information(np.array([[3, 3], [1, 1]])) == pytest.approx(0.0, abs=1e-12)
    # [[2, 1], [1, 2]]: H(T) = 1, H(T | U) = H(1/3) → I = 1 − H(1/3) = 0.08170 bits.
    assert mutual_information(np.array([[2, 1], [1, 2]])) == pytest.approx(1 - _h(1 / 3))
    assert mutual_information(np.zeros((2, 2))) == 0.0


def test_mutual_information_matches_scikit_learn() -> None:
    rng = np.random.default_rng(1)
    u = rng.integers(0, 4, 5000)
    v = (u + rng.integers(0, 3, 5000)) % 5
    table = np.zeros((4, 5))
    np.add.at(table, (u, v), 1)
    expected = mutual_info_score(u, v) / math.log(2)  # nats → bits
    assert mutual_information(table) == pytest.approx(expected, rel=1e-10)
    batch = mutual_information(np.stack([table, table[::-1]]))  # a row permutation: same I
    np.testing.assert_allclose(batch, [expected, expected], rtol=1e-10)


def _exact(rows: dict[int, tuple[int, int]]) -> tuple:
    """Truth-table counts (T = 1, R = 4) from {row: (tokens, active)}."""
    n, a = np.zeros((1, 4), np.int64), np.zeros((1, 4), np.int64)
    for r, (tokens, active) in rows.items():
        n[0, r], a[0, r] = tokens, active
    return information(n, a, np.array([2]))


def test_synergy_of_and_with_independent_inputs_is_positive() -> None:
    # Uniform independent A, B; T = A AND B: I(T; A, B) = H(1/4), I(T; A) = H(1/4) − 1/2.
    whole, parts, synergy = _exact({0: (1, 0), 1: (1, 0), 2: (1, 0), 3: (1, 1)})
    assert whole[0] == pytest.approx(_h(0.25))
    np.testing.assert_allclose(parts[0], [_h(0.25) - 0.5] * 2)
    assert synergy[0] == pytest.approx(1 - _h(0.25)) and synergy[0] > 0.18
    # XOR is pure synergy: 1 bit together, nothing apart.
    _, parts, synergy = _exact({0: (1, 0), 1: (1, 1), 2: (1, 1), 3: (1, 0)})
    np.testing.assert_allclose(parts[0], [0, 0], atol=1e-12)
    assert synergy[0] == pytest.approx(1.0)


def test_synergy_of_or_with_redundant_inputs_is_negative() -> None:
    # A and B always fire together (rows 01 and 10 empty): T = A OR B repeats each.
    whole, parts, synergy = _exact({0: (3, 0), 3: (1, 1)})
    assert whole[0] == pytest.approx(_h(0.25))
    np.testing.assert_allclose(parts[0], [_h(0.25)] * 2)
    assert synergy[0] == pytest.approx(-_h(0.25))


def test_synergy_cannot_tell_and_from_or_on_independent_inputs() -> None:
    """Why labels come from the truth table: complementing the bits maps AND to OR."""
    _, _, syn_and = _exact({0: (1, 0), 1: (1, 0), 2: (1, 0), 3: (1, 1)})
    _, _, syn_or = _exact({0: (1, 0), 1: (1, 1), 2: (1, 1), 3: (1, 1)})
    assert syn_and[0] == pytest.approx(syn_or[0])


# --- one label per rule ------------------------------------------------------------------


def test_or_is_saturating() -> None:
    a, b = _pair(both=0.05)
    result = label_feature(np.stack([a, b], 1), np.maximum(a, 1.3 * b))
    assert result.label == "OR" and result.inputs == [0, 1]
    assert result.confidence > 0.95
    row = result.features.row(0, named=True)
    assert row["rule"] == "saturating" and abs(row["additivity"]) < 0.2


def test_weighted_sum_is_additive() -> None:
    a, b = _pair(both=0.05)
    result = label_feature(np.stack([a, b], 1), 0.7 * a + 1.3 * b)
    assert result.label == "WEIGHTED-SUM" and result.confidence > 0.95
    assert result.features["additivity"][0] == pytest.approx(1.0, abs=0.05)


def test_sum_of_inputs_that_never_meet_is_untested() -> None:
    rng = np.random.default_rng(3)
    on = rng.integers(0, 3, N)  # 0: none, 1: A, 2: B, never both
    a, b = (on == 1) * rng.uniform(0.8, 1.2, N), (on == 2) * rng.uniform(0.8, 1.2, N)
    result = label_feature(np.stack([a, b], 1), a + b)
    assert result.label == "WEIGHTED-SUM"
    row = result.features.row(0, named=True)
    assert row["rule"] == "additivity untested" and np.isnan(row["additivity"])


def test_and_needs_both() -> None:
    a, b = _pair(both=0.05)
    result = label_feature(np.stack([a, b], 1), np.maximum(a + b - 1.3, 0))
    assert result.label == "AND" and result.confidence > 0.95
    assert result.features["rule"][0] == "conjunction"
    # Coupled inputs repeat each other (synergy < 0); independent ones do not (> 0).
    assert result.features["synergy"][0] < 0
    a, b = _pair(rate=0.3)
    independent = label_feature(np.stack([a, b], 1), np.maximum(a + b - 1.3, 0))
    assert independent.label == "AND" and independent.features["synergy"][0] > 0


def test_a_and_not_b_names_the_negated_input() -> None:
    a, b = _pair(both=0.05)
    # Column 0 is B (the veto), column 1 is A: the negated input is column 0.
    result = label_feature(np.stack([b, a], 1), np.maximum(a - 3 * b, 0))
    assert result.label == "A-AND-NOT-B" and result.negated == 0
    assert result.confidence > 0.95
    row = result.features.row(0, named=True)
    assert row["alone_active"][1] == row["alone_tokens"][1]  # A alone always fires it


def test_xor_is_nonlinear_xor_like() -> None:
    a, b = _pair(both=0.05)
    result = label_feature(np.stack([a, b], 1), np.where((a > 0) != (b > 0), a + b, 0))
    assert result.label == "NONLINEAR" and result.features["rule"][0] == "xor-like"
    assert result.features["kind"][0] == "xor-like"
    assert result.features["synergy"][0] > 0


def test_target_without_its_inputs_is_unexplained() -> None:
    a, b = _pair()
    noise = (np.random.default_rng(9).random(N) < 0.1) * 1.0  # independent of a, b
    result = label_feature(np.stack([a, b], 1), noise)
    assert result.label == "UNEXPLAINED"
    assert result.inputs == []  # neither input changes the truth table: both pruned


def test_dead_target() -> None:
    a, b = _pair()
    result = label_feature(np.stack([a, b], 1), np.zeros(N))
    assert result.label == "DEAD" and result.confidence == 1.0


def test_confidence_is_low_on_a_borderline_rule() -> None:
    # The target fires on every other token of A: P(fires | A) = 0.5 = p_fire exactly, so
    # "A fires it" (WEIGHTED-SUM) against "mixed" (UNEXPLAINED) is a coin flip.
    rng = np.random.default_rng(5)
    a = np.zeros(N)
    a[rng.choice(N, 160, replace=False)] = 1.0
    y = a.copy()
    y[np.flatnonzero(a)[::2]] = 0
    result = label_feature(a[:, None], y, LogicConfig(prune=False))
    assert result.features["alone_active"][0][0] * 2 == result.features["alone_tokens"][0][0]
    assert 0.3 < result.confidence < 0.7


def test_clean_labels_are_confident() -> None:
    a, b = _pair(seed=2, both=0.05)
    for y in (np.maximum(a, b), a + b, np.maximum(a + b - 1.3, 0), np.maximum(a - 3 * b, 0)):
        assert label_feature(np.stack([a, b], 1), y).confidence >= 0.95


# --- clusters ----------------------------------------------------------------------------


def test_hdbscan_finds_the_two_modes_of_an_or() -> None:
    rng = np.random.default_rng(4)
    which = rng.integers(0, 8, N)  # 1: A large with B small, 2: B large with A small
    a = np.where(which == 1, rng.uniform(2, 2.5, N), np.where(which == 2, 0.3, 0.0))
    b = np.where(which == 2, rng.uniform(2, 2.5, N), np.where(which == 1, 0.3, 0.0))
    found = clusters(np.stack([a, b], 1), np.maximum(a, b)).filter(
        (pl.col("kind") == "fires") & (pl.col("cluster") >= 0)
    )
    assert found.height == 2
    centroids = np.array(found.sort("cluster")["centroid"].to_list())
    modes = sorted(centroids.tolist())
    assert modes[0][0] == pytest.approx(0.3, abs=0.05) and modes[0][1] > 2
    assert modes[1][0] > 2 and modes[1][1] == pytest.approx(0.3, abs=0.05)
    assert found["share"].sum() > 0.9 and (found["target_mean"] > 2).all()


def test_suppressed_tokens_cluster_on_the_veto() -> None:
    a, b = _pair(both=0.05)
    found = clusters(np.stack([a, b], 1), np.maximum(a - 3 * b, 0))
    suppressed = found.filter((pl.col("kind") == "suppressed") & (pl.col("cluster") >= 0))
    # Every suppressed token has B active (alone or with A): each cluster's B is large.
    assert suppressed.height >= 1
    assert all(c[1] > 0.7 for c in suppressed["centroid"].to_list())


# --- a layer -----------------------------------------------------------------------------


def _layer() -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Inputs 0–3 (0, 1 coupled; 2, 3 coupled), 4–5 noise; outputs: OR(0, 1),
    0 AND-NOT 3 ... see below."""
    a, b = _pair(seed=6, both=0.05)
    c, d = _pair(seed=7, both=0.05)
    rng = np.random.default_rng(8)
    e, f = ((rng.random((2, N)) < 0.1) * rng.uniform(0.8, 1.2, (2, N))).astype(float)
    x = np.stack([a, b, c, d, e, f], 1)
    y = np.stack([np.maximum(a, b), np.maximum(c - 3 * d, 0), np.zeros(N)], 1)
    return sp.csr_matrix(x), sp.csr_matrix(y)


def test_layer_uses_top_connections_prunes_and_completes() -> None:
    x, y = _layer()
    weights = pl.DataFrame(
        {
            "output": [0, 0, 0, 1, 1, 2],
            "input": [0, 1, 4, 2, 5, 3],
            "weight_refit": [1.0, 1.0, 0.3, 1.0, 0.01, 0.5],
            "standardised": [0.6, 0.5, 0.2, 0.7, 0.1, 0.3],
        }
    )
    result = label_layer(x, y, weights, progress=False)
    f = result.features.sort("output")
    assert f["label"].to_list() == ["OR", "A-AND-NOT-B", "DEAD"]
    # Output 0: input 4 (noise) was a candidate but never changes the table: pruned.
    assert f["candidates"][0].to_list() == [0, 1, 4] and f["inputs"][0].to_list() == [0, 1]
    # Output 1: input 5 is under the relative cut; the veto 3 was missing: completed.
    assert f["candidates"][1].to_list() == [2] and sorted(f["inputs"][1].to_list()) == [2, 3]
    assert f["negated"][1] == 3
    tables = result.truth_tables.filter(pl.col("output") == 0)
    assert tables.height == 4 and tables["count"].sum() == N
    without = label_layer(x, y, weights, LogicConfig(complete=False), progress=False)
    assert without.features.sort("output")["label"][1] != "A-AND-NOT-B"


def test_layer_without_standardised_column_ranks_by_effect() -> None:
    x, y = _layer()
    weights = pl.DataFrame({"output": [0, 0], "input": [1, 0], "weight_refit": [1.0, 1.0]})
    f = label_layer(x, y, weights, LogicConfig(complete=False), outputs=[0], progress=False)
    assert f.features["label"].to_list() == ["OR"] and f.features.height == 1


def test_hidden_latents_of_an_sae_connector() -> None:
    import torch

    from coact.connectors.families import SparseConnector

    x, _ = _layer()
    connector = SparseConnector("sae-connector", 6, 2, hidden=3)
    with torch.no_grad():  # hidden unit 0 = ReLU(a + b − 1.3): an AND of inputs 0 and 1
        connector.weight_in.zero_()
        connector.weight_in[[0, 1], 0] = 1.0
        connector.bias_in[:] = torch.tensor([-1.3, 0.0, 0.0])
        connector.weight_in[2, 1] = 1.0  # unit 1 copies input 2; unit 2 is dead
    hidden, weights = hidden_targets(connector, x)
    assert hidden.shape == (N, 3)
    assert set(weights.filter(pl.col("output") == 0)["input"].to_list()) == {0, 1}
    labels = label_layer(x, hidden, weights, progress=False).features.sort("output")
    assert labels["label"].to_list() == ["AND", "WEIGHTED-SUM", "DEAD"]
