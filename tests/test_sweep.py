"""Pareto frontier and elbow on hand-made sweeps."""

from __future__ import annotations

import numpy as np

from coact.connectors.sweep import elbow, pareto_frontier


def test_frontier_drops_dominated_points() -> None:
    error = np.array([0.9, 0.5, 0.6, 0.2, 0.1])
    size = np.array([0.0, 1.0, 2.0, 3.0, 10.0])
    # (0.6, 2.0) is beaten by (0.5, 1.0) on both axes.
    assert pareto_frontier(error, size).tolist() == [0, 1, 3, 4]


def test_elbow_by_hand() -> None:
    # Frontier (size, error): (0, 1.0), (1, 0.2), (2, 0.1), (4, 0.0). Scaled x = size / 4,
    # y = error: gaps 1 − x − y = 0, 0.55, 0.4, 0 → the elbow is the second point.
    error = np.array([1.0, 0.2, 0.1, 0.0])
    size = np.array([0.0, 1.0, 2.0, 4.0])
    result = elbow(error, size)
    assert result.indices.tolist() == [0, 1, 2, 3] and result.elbow == 1


def test_elbow_order_free_and_degenerate() -> None:
    error = np.array([0.0, 1.0, 0.2, 0.1])  # same sweep as above, shuffled
    size = np.array([4.0, 0.0, 1.0, 2.0])
    assert elbow(error, size).elbow == 2
    assert elbow(np.array([0.5]), np.array([1.0])).elbow == 0
