"""Supernodes: groups of output features that share inputs and computation.

Two labelled features (not UNEXPLAINED or DEAD) are linked when they carry the same label
(and NONLINEAR kind), their input sets overlap by Jaccard ≥ `min_inputs_jaccard`, and they
fire together: the Jaccard of their firing tokens is ≥ `min_coactivation`. A supernode is
a connected group of two or more linked features; its shared formula is its label over
the inputs that at least half of its members read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from coact.logic.counts import activation_floors

SCHEMA: dict[str, pl.DataType] = {
    "supernode": pl.Int64(), "label": pl.String(), "kind": pl.String(), "size": pl.Int64(),
    "members": pl.List(pl.Int64), "shared_inputs": pl.List(pl.Int64),
    "mean_inputs_jaccard": pl.Float64(), "mean_coactivation": pl.Float64(),
}  # fmt: skip


@dataclass(frozen=True)
class SupernodeConfig:
    min_inputs_jaccard: float = 0.5
    min_coactivation: float = 0.1
    floor: float = 0.1  # as the labeller binarises


def supernodes(
    features: pl.DataFrame, y: sp.spmatrix, config: SupernodeConfig = SupernodeConfig()
) -> pl.DataFrame:
    """One row per supernode (see the module doc), largest first."""
    kinds = features["kind"] if "kind" in features.columns else pl.Series([None] * features.height)
    labelled = features.with_columns(kinds.fill_null("").alias("_kind")).filter(
        ~pl.col("label").is_in(["UNEXPLAINED", "DEAD"]) & (pl.col("inputs").list.len() > 0)
    )
    if labelled.height < 2:
        return pl.DataFrame(schema=SCHEMA)
    outputs = labelled["output"].to_numpy()
    inputs = labelled["inputs"].to_list()
    n_in = max(max(i) for i in inputs) + 1
    rows = np.repeat(np.arange(len(inputs)), [len(i) for i in inputs])
    member = sp.csr_matrix((np.ones(len(rows)), (rows, np.concatenate(inputs))),
                           shape=(len(inputs), n_in))  # fmt: skip
    shared = (member @ member.T).tocoo()
    sizes = np.asarray(member.sum(axis=1)).ravel()
    a, b, both = shared.row, shared.col, shared.data
    keep = a < b
    a, b, both = a[keep], b[keep], both[keep]
    jaccard = both / (sizes[a] + sizes[b] - both)
    group = (labelled["label"] + "/" + labelled["_kind"]).to_numpy()
    keep = (jaccard >= config.min_inputs_jaccard) & (group[a] == group[b])
    a, b, jaccard = a[keep], b[keep], jaccard[keep]
    co = _coactivation(y, outputs, a, b, config.floor)
    keep = co >= config.min_coactivation
    return _groups(labelled, len(outputs), a[keep], b[keep], jaccard[keep], co[keep])


def _coactivation(
    y: sp.spmatrix, outputs: np.ndarray, a: np.ndarray, b: np.ndarray, floor: float
) -> np.ndarray:
    """Jaccard of the firing tokens of outputs[a] and outputs[b], pair by pair."""
    if len(a) == 0:
        return np.zeros(0)
    cols = sp.csc_matrix(y)[:, outputs]
    fires = cols.copy()
    fires.data = (cols.data > activation_floors(cols, floor)[np.repeat(
        np.arange(cols.shape[1]), np.diff(cols.indptr))]).astype(np.float64)  # fmt: skip
    fires.eliminate_zeros()
    count = np.asarray(fires.sum(axis=0)).ravel()
    both = np.asarray(fires[:, a].multiply(fires[:, b]).sum(axis=0)).ravel()
    union = count[a] + count[b] - both
    return np.where(union > 0, both / np.maximum(union, 1), 0.0)


def _groups(
    labelled: pl.DataFrame, n: int, a: np.ndarray, b: np.ndarray, jaccard: np.ndarray,
    co: np.ndarray,
) -> pl.DataFrame:  # fmt: skip
    graph = sp.coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component)
    records = []
    for c in np.flatnonzero(sizes >= 2):
        members = np.flatnonzero(component == c)
        rows = labelled[members]
        counts: dict[int, int] = {}
        for inputs in rows["inputs"].to_list():
            for i in inputs:
                counts[i] = counts.get(i, 0) + 1
        edges = component[a] == c
        records.append({
            "label": rows["label"][0], "kind": rows["kind"][0] if "kind" in rows.columns else None,
            "size": len(members), "members": sorted(int(o) for o in rows["output"]),
            "shared_inputs": sorted(i for i, k in counts.items() if 2 * k >= len(members)),
            "mean_inputs_jaccard": float(jaccard[edges].mean()),
            "mean_coactivation": float(co[edges].mean()),
        })  # fmt: skip
    records.sort(key=lambda r: (-r["size"], r["members"][0]))
    frame = pl.DataFrame(records, schema={k: v for k, v in SCHEMA.items() if k != "supernode"})
    return frame.with_row_index("supernode").with_columns(pl.col("supernode").cast(pl.Int64))


def describe_supernode(row: dict) -> str:
    """One line: `{out 3, out 7} = in 1 OR in 2`."""
    members = ", ".join(f"out {o}" for o in row["members"])
    inputs = [f"in {i}" for i in row["shared_inputs"]]
    joiner = {"OR": " OR ", "AND": " AND ", "WEIGHTED-SUM": " + "}.get(row["label"], ", ")
    body = joiner.join(inputs) if row["label"] in ("OR", "AND", "WEIGHTED-SUM") else (
        f"{row['label']}{' (' + row['kind'] + ')' if row.get('kind') else ''} of "
        + ", ".join(inputs))  # fmt: skip
    return f"{{{members}}} = {body}"
