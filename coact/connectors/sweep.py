"""The α sweep: Pareto frontier of error against connector size, and its elbow.

Each α gives one point (normalised MSE, size), where size is the mean ‖w‖₁ per output or
the number of weights above a magnitude. The frontier keeps the points no other point
beats on both axes; the elbow is the frontier point farthest from the straight line
joining the frontier's ends, with both axes scaled to [0, 1] (the "knee" of the curve).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Frontier:
    """Indices (into the sweep) of the Pareto-optimal points, by increasing size; the elbow."""

    indices: np.ndarray
    elbow: int  # index into the sweep


def pareto_frontier(error: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Indices of non-dominated points (lower error and lower size are better)."""
    error, size = np.asarray(error, float), np.asarray(size, float)
    order = np.lexsort((error, size))  # by size, ties by error
    kept: list[int] = []
    best = np.inf
    for i in order:
        if error[i] < best:
            kept.append(int(i))
            best = error[i]
    return np.array(kept, dtype=int)


def elbow(error: np.ndarray, size: np.ndarray) -> Frontier:
    """The frontier and its point of maximum distance below the chord between its ends."""
    front = pareto_frontier(error, size)
    if len(front) <= 2:
        return Frontier(front, int(front[-1]) if len(front) else -1)
    x, y = np.asarray(size, float)[front], np.asarray(error, float)[front]
    xs = (x - x[0]) / (x[-1] - x[0]) if x[-1] > x[0] else np.zeros_like(x)
    ys = (y - y[-1]) / (y[0] - y[-1]) if y[0] > y[-1] else np.zeros_like(y)
    # Chord from (0, 1) to (1, 0): distance of (xs, ys) below it is (1 − xs − ys) / √2.
    gap = 1.0 - xs - ys
    return Frontier(front, int(front[int(np.argmax(gap))]))
