"""Planted circuits: the generator keeps its promises, and the connector → labeller path
meets its targets (≥ 95 % label accuracy, ≥ 0.95 support F1) at the default settings."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from coact.logic.config import LABELS
from coact.logic.planted import PlantedCircuits, PlantedConfig, planted_circuits, run_planted

CONFIG = PlantedConfig(seed=0)


@pytest.fixture(scope="module")
def circuits() -> PlantedCircuits:
    return planted_circuits(CONFIG)


def _dense_columns(circuits: PlantedCircuits, cols: list[int]) -> np.ndarray:
    return circuits.x.tocsc()[:, cols].toarray()


def test_shapes_sparsity_and_contexts(circuits) -> None:
    x, y = circuits.x, circuits.y
    assert x.shape == (CONFIG.n_tokens, CONFIG.n_inputs) and y.shape[1] == CONFIG.n_outputs
    assert x.dtype == np.float32 and x.data.min() > 0 and y.data.min() > 0
    rates = np.diff(x.tocsc().indptr) / CONFIG.n_tokens
    assert rates.min() >= CONFIG.rate_range[0] * 0.5 and rates.max() <= 0.1  # 0.2–10 %
    n_contexts = -(-CONFIG.n_tokens // CONFIG.context_length)
    assert np.array_equal(np.unique(circuits.context_ids), np.arange(n_contexts))
    assert circuits.truth["label"].to_list().count("DEAD") == CONFIG.n_dead
    assert set(circuits.truth["label"]) == set(LABELS)


def test_same_seed_same_codes(circuits) -> None:
    again = planted_circuits(CONFIG)
    assert (again.x != circuits.x).nnz == 0 and (again.y != circuits.y).nnz == 0
    other = planted_circuits(PlantedConfig(seed=1))
    assert (other.x != circuits.x).nnz > 0


def test_a_shared_cause_raises_co_firing(circuits) -> None:
    on = _dense_columns(circuits, [0, 1, 2, 3, 4]) > 0  # 0–3 one group, 4 the next
    same = on[:, 1][on[:, 0]].mean()
    other = on[:, 4][on[:, 0]].mean()
    assert same > 5 * on[:, 1].mean() and other < 2 * on[:, 4].mean()


def test_rules_hold_by_construction(circuits) -> None:
    truth = circuits.truth
    y = circuits.y.tocsc()
    u_min, u_max = CONFIG.u_range
    for row in truth.iter_rows(named=True):
        target = y[:, [row["output"]]].toarray().ravel()
        on = _dense_columns(circuits, row["inputs"]) > 0 if row["inputs"] else None
        if row["label"] == "DEAD":
            assert (target == 0).all()
        elif row["label"] == "AND":  # neither alone fires it (up to background firing)
            alone = on[:, 0] ^ on[:, 1]
            assert (target[alone] > 0).mean() < 0.05 and row["threshold"] == u_max
        elif row["label"] == "A-AND-NOT-B":  # B cancels A
            both = on.all(axis=1)
            assert both.sum() > 20 and (target[both] > 0).mean() < 0.05
            assert row["negated"] == row["inputs"][1]
    assert u_min == pytest.approx(np.exp(-2 * CONFIG.magnitude_sigma))


def test_planted_benchmark_meets_its_targets() -> None:
    """The whole path: connector fitted and its α chosen as `connect` does, then labels."""
    _, labels, score, info = run_planted(CONFIG)
    assert score.accuracy >= 0.95, score.confusion
    assert score.f1 >= 0.95 and score.precision >= 0.95 and score.recall >= 0.95
    assert min(score.per_class.values()) >= 0.95, score.per_class  # NONLINEAR kinds too
    assert 0 < info["alpha_index"] < 19  # the elbow, not an end of the grid
    alive = labels.features.filter(pl.col("label") != "DEAD")
    assert alive["confidence"].mean() > 0.9
    assert score.confusion.height == len(LABELS)
    assert int(score.confusion.drop("true").sum_horizontal().sum()) == CONFIG.n_outputs
    # The clusters table covers the firing tokens of every alive circuit output.
    fires = labels.clusters.filter(pl.col("kind") == "fires")
    assert fires["output"].n_unique() >= 0.8 * alive.height
