"""Readable connections: an output feature as a short weighted sum of input features,
and the tokens on which a feature fires hardest (the evidence a reader checks first)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import polars as pl
import scipy.sparse as sp


def top_terms(
    weights: sp.spmatrix | np.ndarray, output: int, k: int = 5
) -> list[tuple[int, float]]:
    """The k largest-|w| inputs of `output` in an (n_in × n_out) weight matrix."""
    if sp.issparse(weights):
        dense = sp.csc_matrix(weights).getcol(output).toarray().ravel()
    else:
        dense = np.asarray(weights)[:, output]
    nonzero = np.flatnonzero(dense)
    order = nonzero[np.argsort(-np.abs(dense[nonzero]), kind="stable")][:k]
    return [(int(i), float(dense[i])) for i in order]


def formula(weights: sp.spmatrix | np.ndarray, output: int, bias: float = 0.0, k: int = 5) -> str:
    """E.g. ``out 30 = 0.26·in 2797 + 0.23·in 259 − 0.10·in 946``; ``out 7 = 0`` if empty."""
    terms = top_terms(weights, output, k)
    text = ""
    for i, (index, w) in enumerate(terms):
        sign = "−" if w < 0 else "+"
        lead = ("−" if w < 0 else "") if i == 0 else f" {sign} "
        text += f"{lead}{abs(w):.2f}·in {index}"
    if abs(bias) >= 0.005:
        text += f" {'−' if bias < 0 else '+'} {abs(bias):.2f}" if text else f"{bias:.2f}"
    return f"out {output} = {text or '0'}"


def top_activating_tokens(
    codes: sp.csr_matrix,
    tokens: pl.DataFrame,
    feature: int,
    decode: Callable[[list[int]], str] | None = None,
    k: int = 5,
) -> list[tuple[str | int, float]]:
    """The k tokens where `feature` is largest: (token text or id, activation)."""
    column = codes[:, feature].tocoo()
    order = np.argsort(-column.data, kind="stable")[:k]
    ids: Sequence[int] = tokens["token_id"].to_numpy()[column.row[order]].tolist()
    labels = [decode([t]) if decode else t for t in ids]
    return [(label, float(v)) for label, v in zip(labels, column.data[order], strict=True)]


def top_tokens_table(
    codes: sp.spmatrix,
    tokens: pl.DataFrame,
    features: Sequence[int] | np.ndarray,
    decode: Callable[[list[int]], str] | None = None,
    k: int = 5,
) -> pl.DataFrame:
    """For many features at once: their k largest activations, one row each (feature, rank,
    activation, token id and text, context, position), from one column-major copy."""
    csc = sp.csc_matrix(codes)
    token_ids = tokens["token_id"].to_numpy()
    rows: dict[str, list[int] | list[float]] = {
        key: [] for key in ("feature", "rank", "row", "activation")
    }
    for feature in np.asarray(features, dtype=np.int64):
        lo, hi = csc.indptr[feature], csc.indptr[feature + 1]
        values = csc.data[lo:hi]
        order = np.argsort(-values, kind="stable")[:k]
        rows["feature"] += [int(feature)] * len(order)
        rows["rank"] += list(range(len(order)))
        rows["row"] += csc.indices[lo:hi][order].tolist()
        rows["activation"] += values[order].astype(float).tolist()
    at = np.asarray(rows["row"], dtype=np.int64)
    ids = token_ids[at]
    text = {int(t): decode([int(t)]) for t in np.unique(ids)} if decode else {}
    return pl.DataFrame(
        {
            "feature": np.asarray(rows["feature"], dtype=np.int64),
            "rank": np.asarray(rows["rank"], dtype=np.int64),
            "activation": np.asarray(rows["activation"], dtype=np.float64),
            "token_id": ids.astype(np.int64),
            "token": [text.get(int(t)) for t in ids] if decode else [None] * len(ids),
            "context": tokens["context"].to_numpy()[at].astype(np.int64),
            "position": tokens["position"].to_numpy()[at].astype(np.int64),
        },
        schema_overrides={"token": pl.String},
    )
