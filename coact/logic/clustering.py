"""HDBSCAN modes of a target's sampled input vectors: where it fires, where it is suppressed."""

from __future__ import annotations

import numpy as np
import polars as pl

from coact.logic.config import LogicConfig
from coact.logic.counts import _Codes, _Counts, _Events
from coact.progress import tqdm

# --- clusters ----------------------------------------------------------------------------


def _cluster_rows(
    points: np.ndarray, values: np.ndarray, unit: np.ndarray, config: LogicConfig
) -> list[tuple[int, int, np.ndarray, float]]:
    """(cluster, size, centroid, target mean) per HDBSCAN cluster (−1: noise)."""
    from sklearn.cluster import HDBSCAN

    size = max(config.min_cluster_size, int(np.ceil(config.min_cluster_share * len(points))))
    if len(points) < 2 * size or points.shape[1] == 0:
        return []
    scaled = points / np.where(unit > 0, unit, 1.0)
    if np.ptp(scaled, axis=0).max() == 0:
        labels = np.zeros(len(points), dtype=np.int64)
    else:
        labels = HDBSCAN(min_cluster_size=size, copy=True).fit(scaled).labels_
    return [
        (int(c), int((labels == c).sum()), points[labels == c].mean(axis=0),
         float(values[labels == c].mean()))
        for c in np.unique(labels)
    ]  # fmt: skip


def _all_clusters(
    counts: _Counts,
    events: _Events,
    xc: _Codes,
    config: LogicConfig,
    progress: bool,
    which: np.ndarray | None = None,
) -> tuple[pl.DataFrame, np.ndarray]:
    """Cluster each target's sampled co-activation vectors, both kinds (only the targets
    `which` marks, when given: the modes of inputs that do not cover a target say little)."""
    n_targets = len(counts.targets)
    n_clusters = np.zeros((n_targets, 2), np.int64)
    records: dict[str, list] = {
        k: [] for k in ("output", "kind", "cluster", "size", "share", "tokens", "centroid",
                        "target_mean", "inputs")
    }  # fmt: skip
    if config.cluster:
        k_all = counts.k
        chosen = np.arange(n_targets) if which is None else np.flatnonzero(which)
        for t in tqdm(chosen, desc="clusters", disable=not progress):
            k = int(k_all[t])
            cols = counts.inputs[t, :k]
            for kind, name in ((0, "fires"), (1, "suppressed")):
                lo, hi = events.offsets[kind, t], events.offsets[kind, t + 1]
                pts = events.points[kind, lo:hi, :k].astype(np.float64)
                found = _cluster_rows(pts, events.values[kind, lo:hi], xc.median[cols], config)
                n_clusters[t, kind] = sum(1 for c, *_ in found if c >= 0)
                for c, size, centroid, mean in found:
                    records["output"].append(int(counts.targets[t]))
                    records["kind"].append(name)
                    records["cluster"].append(c)
                    records["size"].append(size)
                    records["share"].append(size / max(hi - lo, 1))
                    records["tokens"].append(size / max(hi - lo, 1) * events.totals[t, kind])
                    records["centroid"].append([float(v) for v in centroid])
                    records["target_mean"].append(mean)
                    records["inputs"].append([int(i) for i in cols])
    schema: dict[str, pl.DataType] = {
        "output": pl.Int64(), "kind": pl.String(), "cluster": pl.Int64(), "size": pl.Int64(),
        "share": pl.Float64(), "tokens": pl.Float64(), "centroid": pl.List(pl.Float64),
        "target_mean": pl.Float64(), "inputs": pl.List(pl.Int64),
    }  # fmt: skip
    return pl.DataFrame(records, schema=schema), n_clusters
